"""relax, argmax and sample: the stochastic argmax and softmax tricks on any polytope.

All three take inputs of shape ``(*batch, *P.event_shape)`` (any number of batch
dimensions, none included) and return that shape, dtype and device.  Dispatch
(``solver``): ``"auto"`` uses a registered specialized solver when one exists
and the generic path otherwise (except ``exp_family_entropy`` on a polytope that
lists its vertices: exact enumeration, one matmul); ``"generic"`` and
``"specialized"`` force one path (an error if no specialized solver is
registered).  The generic path has two backends: the fast batched torch solver
(:mod:`sstcvx.generic.dual_newton`) for the built-in ``entropy``,
``binary_entropy`` and ``euclidean`` on a linear declaration, and cvxpylayers for
everything else; ``"fast"`` and ``"cvxpylayers"`` force one of them, and ``"moreau"``
selects cvxpylayers with Moreau instead of diffcp (opt-in, the ``moreau`` extra).  The hard
sample (``argmax``) on the generic path is always the LP.
"""

from __future__ import annotations

import torch

from . import registry
from .enumeration import vertex_marginals
from .errors import SolverError
from .generic import fast_relaxation, generic_argmax, generic_relaxation, moreau_relaxation
from .generic.settings import check_moreau_args, check_solver_args
from .noise import get_noise
from .regularizers import get_regularizer
from .validation import (
    all_finite,
    check_mode,
    check_polytope,
    check_solver,
    check_tau,
    check_utility,
    shape_tau,
    validation_enabled,
)


def _flatten(P, U):
    """U as a (B, *event_shape) batch (no view is made when it already is one)."""
    if U.dim() == P.event_dim + 1:
        return U
    return U.reshape((-1,) + tuple(P.event_shape))


def _check_finite_output(X, P, what):
    if all_finite(X):
        return
    bad = ~torch.isfinite(X.detach().reshape(X.shape[0], -1)).all(dim=-1)
    if bad.any():
        element = int(bad.nonzero()[0])
        raise SolverError(
            f"{what} on {P.name}: batch element {element} (of the flattened batch) is not finite",
            element=element,
            solver=what,
            status="non-finite",
        )


def relaxation_solver(P, regularizer, solver: str = "auto"):
    """The function ``fn(Z) -> X`` (flattened batch) that ``relax`` would use, and its path name:
    ``"specialized"``, ``"fast"`` (the batched torch solver of the generic path), ``"generic"``
    (the cvxpylayers path), ``"moreau"`` (the cvxpylayers path on Moreau), or ``"enumeration"``
    (``exp_family_entropy`` with ``solver="auto"`` on a polytope that lists its vertices and has no
    specialized solver)."""
    reg = get_regularizer(regularizer)
    solver = check_solver(solver)
    if solver == "moreau":
        return moreau_relaxation(P, reg), "moreau"
    if solver in ("auto", "specialized"):
        fn = registry.find_relaxation(P, reg)
        if fn is not None:
            return (lambda Z, **_: fn(P, Z)), "specialized"
        if solver == "specialized":
            raise ValueError(
                f"solver='specialized': no specialized solver for regularizer {reg.name!r} on {P.name}; "
                f"registered: {registry.specialized_regularizers(P) or 'none'}. Use solver='generic' or 'auto'"
            )
        if reg.name == "exp_family_entropy" and P.vertices is not None:
            # exact, and one matmul instead of the generic path's conic problem over the vertex weights
            return (lambda Z, **_: vertex_marginals(P, Z)), "enumeration"
    if solver in ("auto", "generic", "fast"):
        fast = fast_relaxation(P, reg)
        if fast is not None:
            return fast, "fast"
        if solver == "fast":
            raise ValueError(
                f"solver='fast': the fast generic solver serves the built-in 'entropy', 'binary_entropy', "
                f"'euclidean' and Regularizer.separable on a linear declaration; got regularizer {reg.name!r} on {P.name}. "
                "Use solver='generic' or 'cvxpylayers'"
            )
    layer = generic_relaxation(P, reg)
    return layer, "generic"


def _relaxed(P, U, tau, fn, path, solver_args, validate: bool, utility_name: str = "U"):
    """X_tau for utilities U and a shaped tau (see ``check_tau``), by ``fn`` of ``relaxation_solver``.

    With ``validate``, U / tau must be finite (a non-finite U is named as ``utility_name``) and so
    must the solver's output.
    """
    Z = U if isinstance(tau, float) and tau == 1.0 else U / tau
    if validate and not all_finite(Z):
        check_utility(P, U, utility_name)  # names U if U itself is not finite
        raise ValueError(f"tau: U / tau overflows {U.dtype} (tau too small for |U|); use a larger tau or float64")
    Zf = _flatten(P, Z)
    if Zf.shape[0] == 0:
        return Z * 0
    X = fn(Zf, solver_args=solver_args) if path in ("generic", "fast", "moreau") else fn(Zf)
    if validate:
        _check_finite_output(X, P, f"{path} relaxation")
    return X if X.shape == U.shape else X.reshape(U.shape)


def _hard(P, U, solver: str, validate: bool) -> torch.Tensor:
    """The LP argmax for detached utilities U and a canonical ``solver`` name."""
    fn = registry.find_argmax(P) if solver in ("auto", "specialized") else None
    if fn is None and solver == "specialized":
        raise ValueError(f"solver='specialized': no specialized argmax is registered for {P.name}")
    Uf = _flatten(P, U)
    if Uf.shape[0] == 0:
        return U.clone()
    X = fn(P, Uf) if fn is not None else generic_argmax(P)(Uf)
    if validate:
        _check_finite_output(X, P, "argmax")
    if X.shape != U.shape:
        X = X.reshape(U.shape)
    return X.to(dtype=U.dtype, device=U.device)


def relax(
    P,
    U,
    tau=1.0,
    regularizer="entropy",
    solver: str = "auto",
    solver_args: dict | None = None,
    validate_args: bool | None = None,
):
    """The stochastic softmax trick's relaxed sample X_tau = argmax_{x in P} <U, x> - tau f(x).

    Args:
        P: an :class:`sstcvx.Polytope`.
        U: utilities, a floating tensor ``(*batch, *P.event_shape)``.
        tau: temperature > 0, a number or a tensor broadcastable to the batch shape
            (differentiable).
        regularizer: ``"entropy"``, ``"binary_entropy"``, ``"euclidean"``,
            ``"exp_family_entropy"`` or a :class:`sstcvx.Regularizer`.
        solver: ``"auto"``, ``"generic"``, ``"specialized"``, ``"fast"``, ``"cvxpylayers"`` or
            ``"moreau"`` (see the module docstring).
        solver_args: conic solver settings for the cvxpylayers path (default
            :func:`sstcvx.generic.default_solver_args`: SCS for "euclidean", Clarabel otherwise); the
            fast solver uses them only for an element it re-solves on that path.  With
            ``solver="moreau"``, Moreau's settings (fields of ``moreau.Settings``; default
            ``{"solver": "ipm"}``).
        validate_args: check the arguments and the output (``None``: the global default, see
            :func:`sstcvx.set_validate_args`).

    Returns X_tau with U's shape, dtype and device, differentiable in U (and tau).
    Cost: the specialized solver's; on the generic path, tens of microseconds per element on
    the fast torch solver, or one conic solve per element on the cvxpylayers path.
    Reference: Paulus et al., "Gradient Estimation with Stochastic Softmax Tricks", 2020.
    """
    validate = validation_enabled(validate_args)
    if validate:
        check_polytope(P)
        U = check_utility(P, U, "U", finite=False)  # U / tau is checked in _relaxed, which covers U
        tau = check_tau(tau, U, P.event_dim)
    else:
        tau = shape_tau(tau, U, P.event_dim)
    # checked even without validation: a misspelt setting would silently fall back to another solver
    solver_args = _checked_solver_args(solver, solver_args)
    fn, path = relaxation_solver(P, regularizer, solver)
    return _relaxed(P, U, tau, fn, path, solver_args, validate)


def _checked_solver_args(solver: str, solver_args):
    """``solver_args`` checked against the settings of the backend that ``solver`` names: Moreau's for
    ``"moreau"`` (a name without aliases: compared as given, the name itself is checked by the solver's
    lookup), diffcp's otherwise."""
    if solver == "moreau":
        return None if solver_args is None else check_moreau_args(solver_args)
    return check_solver_args(solver_args)


def argmax(P, U, solver: str = "auto", validate_args: bool | None = None) -> torch.Tensor:
    """The stochastic argmax trick's hard sample: the LP solution argmax_{x in P} <U, x>, a vertex of P.

    ``U``: ``(*batch, *P.event_shape)``; returns a detached tensor of the same
    shape, dtype and device.  The generic path solves one LP per element and snaps
    entries within 1e-6 of an integer (see :class:`sstcvx.generic.GenericArgmax`);
    specialized oracles are exact.  ``validate_args`` as in :func:`relax`.
    """
    validate = validation_enabled(validate_args)
    if validate:
        check_polytope(P)
        U = check_utility(P, U, "U")
    return _hard(P, U.detach(), check_solver(solver), validate)


def perturb(theta: torch.Tensor, noise="gumbel", generator: torch.Generator | None = None) -> torch.Tensor:
    """Random utilities U = theta + eps with eps i.i.d. from ``noise``; differentiable in theta."""
    law = get_noise(noise)
    if not isinstance(theta, torch.Tensor) or not theta.is_floating_point():
        raise TypeError(f"theta: expected a floating-point torch.Tensor, got {type(theta).__name__}")
    return theta + law.sample(theta.shape, dtype=theta.dtype, device=theta.device, generator=generator)


def straight_through(hard: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
    """Forward value ``hard``, gradient of ``soft``: hard + soft - stopgrad(soft)."""
    return hard + (soft - soft.detach())


def sample(
    P,
    theta,
    tau=1.0,
    regularizer="entropy",
    noise="gumbel",
    mode: str = "relaxed",
    solver: str = "auto",
    generator: torch.Generator | None = None,
    solver_args: dict | None = None,
    validate_args: bool | None = None,
):
    """Draw U = theta + noise and return the relaxed, hard or straight-through sample.

    ``mode="relaxed"``: X_tau (see :func:`relax`); ``"hard"``: the vertex X
    (see :func:`argmax`), detached; ``"straight_through"``: forward X, backward
    the Jacobian of X_tau, both from the same U.  ``theta``: ``(*batch,
    *P.event_shape)``; ``noise``: ``"gumbel"``, ``"gaussian"``, ``"logistic"``,
    ``"exponential"`` or a :class:`sstcvx.Noise`; ``generator`` makes it
    reproducible.  The arguments are validated once (``validate_args`` as in :func:`relax`).
    """
    validate = validation_enabled(validate_args)
    mode = check_mode(mode)
    solver = check_solver(solver)
    if validate:
        check_polytope(P)
        # for the relaxed modes U / tau is checked in _relaxed, which covers theta
        theta = check_utility(P, theta, "theta", finite=mode == "hard")
        tau = check_tau(tau, theta, P.event_dim) if mode != "hard" else tau
    elif mode != "hard":
        tau = shape_tau(tau, theta, P.event_dim)
    if mode != "hard":
        solver_args = _checked_solver_args(solver, solver_args)
    U = perturb(theta, noise, generator)
    if mode == "hard":
        return _hard(P, U.detach(), solver, validate)
    fn, path = relaxation_solver(P, regularizer, solver)
    soft = _relaxed(P, U, tau, fn, path, solver_args, validate, utility_name="theta")
    if mode == "relaxed":
        return soft
    return straight_through(_hard(P, U.detach(), solver, validate), soft)
