"""Validation of user input, once per public call, and the switch that turns it off.

Every public entry point (``relax``, ``argmax``, ``sample``, the distribution objects) checks
its arguments once, in the manner of ``torch.distributions``: ``validate_args=None`` follows
the global default (:func:`set_validate_args`, on unless changed), ``True``/``False`` decide
for one call.  With validation on, the utilities are checked to be finite (one reduction and
one host synchronisation) and so are the solver's outputs; with it off, nothing is checked
that needs a host synchronisation, so a straight-through sample on an accelerator makes none
that its solvers do not need themselves.
"""

from __future__ import annotations

import math

import torch

from .polytope import Polytope

_validate_default = True


def set_validate_args(value: bool) -> None:
    """Turn argument validation of the public calls on (the default) or off, globally."""
    global _validate_default
    if not isinstance(value, bool):
        raise TypeError(f"value: expected a bool, got {type(value).__name__}")
    _validate_default = value


def validation_enabled(validate_args: bool | None = None) -> bool:
    """Whether a call with ``validate_args`` validates: the global default when ``None``."""
    if validate_args is None:
        return _validate_default
    if not isinstance(validate_args, bool):
        raise TypeError(f"validate_args: expected None or a bool, got {type(validate_args).__name__}")
    return validate_args


#: "generic" is the fast torch solver where it applies (built-in entropy, binary_entropy or euclidean on a
#: linear declaration) and the cvxpylayers path otherwise; "fast" and "cvxpylayers" force one backend, and
#: "moreau" the opt-in one (cvxpylayers with Moreau, the ``moreau`` extra).
SOLVERS = ("auto", "generic", "specialized", "fast", "cvxpylayers", "moreau")
#: Other spellings accepted for ``solver=`` values, mapped to the canonical (American) one.
SOLVER_ALIASES = {"specialised": "specialized"}
MODES = ("relaxed", "hard", "straight_through")


def check_polytope(P) -> None:
    if not isinstance(P, Polytope):
        raise TypeError(
            f"P: expected an sstcvx.Polytope (Polytope.from_cvxpy, Polytope.from_vertices or a "
            f"polytopes family), got {type(P).__name__}"
        )


def all_finite(t: torch.Tensor) -> bool:
    """Whether every entry of ``t`` is finite, in one reduction and one host sync when it is.

    NaN and infinities propagate through a sum, so a finite sum proves every entry
    finite; only a non-finite sum (a bad entry, or finite entries whose sum overflows)
    sends the test entry by entry.  (``torch.isfinite(t).all()`` costs three to four
    times as much on the small tensors of a training step.)
    """
    t = t.detach()
    if math.isfinite(float(t.sum())):
        return True
    return bool(torch.isfinite(t).all())


def check_utility(P, U, argument: str = "U", finite: bool = True) -> torch.Tensor:
    """U must be a floating tensor of shape (*batch, *P.event_shape), finite unless ``finite=False``
    (for callers that check a quantity computed from U instead)."""
    if not isinstance(U, torch.Tensor):
        raise TypeError(f"{argument}: expected a torch.Tensor, got {type(U).__name__}")
    if not U.is_floating_point():
        raise TypeError(f"{argument}: expected a floating-point tensor, got dtype {U.dtype}")
    event = tuple(P.event_shape)
    if U.dim() < len(event) or tuple(U.shape[U.dim() - len(event) :]) != event:
        raise ValueError(
            f"{argument}: expected shape (*batch, {', '.join(map(str, event))}) for {P.name}, got {tuple(U.shape)}"
        )
    if finite and not all_finite(U):
        raise ValueError(f"{argument}: expected finite values, found NaN or infinity")
    return U


def check_solver(solver: str) -> str:
    """The canonical name of a ``solver=`` value (``"specialised"`` is accepted for ``"specialized"``)."""
    solver = SOLVER_ALIASES.get(solver, solver) if isinstance(solver, str) else solver
    if solver not in SOLVERS:
        raise ValueError(f"solver: expected one of {SOLVERS}, got {solver!r}")
    return solver


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    return mode


def shape_tau(tau, U: torch.Tensor, event_dim: int):
    """tau shaped to divide U, without checks: a float, or a tensor with the event dims appended."""
    if isinstance(tau, torch.Tensor):
        return tau.to(dtype=U.dtype, device=U.device).reshape(tau.shape + (1,) * event_dim)
    return float(tau)


def check_tau(tau, U: torch.Tensor, event_dim: int):
    """tau > 0: a number, or a tensor broadcastable to U's batch shape. Returns it shaped to divide U."""
    if isinstance(tau, torch.Tensor):
        if not tau.is_floating_point():
            raise TypeError(f"tau: expected a floating-point tensor, got dtype {tau.dtype}")
        if not (torch.isfinite(tau.detach()).all() and (tau.detach() > 0).all()):
            raise ValueError("tau: expected every temperature to be finite and > 0")
        batch_shape = U.shape[: U.dim() - event_dim]
        try:
            ok = torch.broadcast_shapes(tau.shape, batch_shape) == batch_shape
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(
                f"tau: expected a scalar or a tensor broadcastable to the batch shape {tuple(batch_shape)}, "
                f"got shape {tuple(tau.shape)}"
            )
        return tau.to(dtype=U.dtype, device=U.device).reshape(tau.shape + (1,) * event_dim)
    if isinstance(tau, bool) or not isinstance(tau, (int, float)):
        raise TypeError(f"tau: expected a positive number or tensor, got {type(tau).__name__}")
    if not (math.isfinite(tau) and tau > 0):
        raise ValueError(f"tau: expected a finite temperature > 0, got {tau!r}")
    return float(tau)
