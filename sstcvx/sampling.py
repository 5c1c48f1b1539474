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
everything else; ``"fast"`` and ``"cvxpylayers"`` force one of them.  The hard
sample (``argmax``) on the generic path is always the LP.
"""

from __future__ import annotations

import torch

from . import registry
from ._checks import all_finite, check_mode, check_polytope, check_solver, check_tau, check_utility
from .enumeration import gibbs_marginals
from .errors import SolverError
from .generic import fast_relaxation, generic_argmax, generic_relaxation
from .noise import get_noise
from .regularizers import get_regularizer


def _flatten(P, U):
    batch_shape = U.shape[: U.dim() - P.event_dim]
    return batch_shape, U.reshape((-1,) + tuple(P.event_shape))


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
    (the cvxpylayers path), or ``"enumeration"`` (``exp_family_entropy`` with ``solver="auto"`` on a
    polytope that lists its vertices and has no specialized solver)."""
    reg = get_regularizer(regularizer)
    solver = check_solver(solver)
    if solver in ("auto", "specialized"):
        fn = registry.find_relaxation(P, reg.name)
        if fn is not None:
            return (lambda Z, **_: fn(P, Z)), "specialized"
        if solver == "specialized":
            raise ValueError(
                f"solver='specialized': no specialized solver for regularizer {reg.name!r} on {P.name}; "
                f"registered: {registry.specialized_regularizers(P) or 'none'}. Use solver='generic' or 'auto'"
            )
        if reg.name == "exp_family_entropy" and P.vertices is not None:
            # exact, and one matmul instead of the generic path's conic problem over the vertex weights
            return (lambda Z, **_: gibbs_marginals(P, Z)), "enumeration"
    if solver in ("auto", "generic", "fast"):
        fast = fast_relaxation(P, reg)
        if fast is not None:
            return fast, "fast"
        if solver == "fast":
            raise ValueError(
                f"solver='fast': the fast generic solver serves the built-in 'entropy', 'binary_entropy' and "
                f"'euclidean' on a linear declaration; got regularizer {reg.name!r} on {P.name}. "
                "Use solver='generic' or 'cvxpylayers'"
            )
    layer = generic_relaxation(P, reg)
    return layer, "generic"


def relax(P, U, tau=1.0, regularizer="entropy", solver: str = "auto", solver_args: dict | None = None):
    """The stochastic softmax trick's relaxed sample X_tau = argmax_{x in P} <U, x> - tau f(x).

    Args:
        P: an :class:`sstcvx.Polytope`.
        U: utilities, a floating tensor ``(*batch, *P.event_shape)``.
        tau: temperature > 0, a number or a tensor broadcastable to the batch shape
            (differentiable).
        regularizer: ``"entropy"``, ``"binary_entropy"``, ``"euclidean"``,
            ``"exp_family_entropy"`` or a :class:`sstcvx.Regularizer`.
        solver: ``"auto"``, ``"generic"``, ``"specialized"``, ``"fast"`` or ``"cvxpylayers"`` (see the
            module docstring).
        solver_args: conic solver settings for the cvxpylayers path (default
            :func:`sstcvx.generic.default_solver_args`: SCS for "euclidean", Clarabel otherwise); the
            fast solver uses them only for an element it re-solves on that path.

    Returns X_tau with U's shape, dtype and device, differentiable in U (and tau).
    Cost: the specialized solver's; on the generic path, tens of microseconds per element on
    the fast torch solver, or one conic solve per element on the cvxpylayers path.
    Reference: Paulus et al., "Gradient Estimation with Stochastic Softmax Tricks", 2020.
    """
    check_polytope(P)
    U = check_utility(P, U, "U", finite=False)  # U / tau is checked below, which covers U
    tau_b = check_tau(tau, U, P.event_dim)
    fn, path = relaxation_solver(P, regularizer, solver)
    Z = U / tau_b
    if not all_finite(Z):
        check_utility(P, U, "U")  # names U if U itself is not finite
        raise ValueError(f"tau: U / tau overflows {U.dtype} (tau too small for |U|); use a larger tau or float64")
    batch_shape, Zf = _flatten(P, Z)
    if Zf.shape[0] == 0:
        return Z * 0
    X = fn(Zf, solver_args=solver_args) if path in ("generic", "fast") else fn(Zf)
    _check_finite_output(X, P, f"{path} relaxation")
    return X.reshape(U.shape)


def argmax(P, U, solver: str = "auto") -> torch.Tensor:
    """The stochastic argmax trick's hard sample: the LP solution argmax_{x in P} <U, x>, a vertex of P.

    ``U``: ``(*batch, *P.event_shape)``; returns a detached tensor of the same
    shape, dtype and device.  The generic path solves one LP per element with
    HiGHS and snaps entries within 1e-6 of an integer (see
    :class:`sstcvx.generic.GenericArgmax`); specialized oracles are exact.
    """
    check_polytope(P)
    U = check_utility(P, U, "U").detach()
    solver = check_solver(solver)
    fn = registry.find_argmax(P) if solver in ("auto", "specialized") else None
    if fn is None and solver == "specialized":
        raise ValueError(f"solver='specialized': no specialized argmax is registered for {P.name}")
    batch_shape, Uf = _flatten(P, U)
    if Uf.shape[0] == 0:
        return U.clone()
    X = fn(P, Uf) if fn is not None else generic_argmax(P)(Uf)
    _check_finite_output(X, P, "argmax")
    return X.reshape(U.shape).to(dtype=U.dtype, device=U.device)


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
):
    """Draw U = theta + noise and return the relaxed, hard or straight-through sample.

    ``mode="relaxed"``: X_tau (see :func:`relax`); ``"hard"``: the vertex X
    (see :func:`argmax`), detached; ``"straight_through"``: forward X, backward
    the Jacobian of X_tau, both from the same U.  ``theta``: ``(*batch,
    *P.event_shape)``; ``noise``: ``"gumbel"``, ``"gaussian"``, ``"logistic"``,
    ``"exponential"`` or a :class:`sstcvx.Noise`; ``generator`` makes it
    reproducible.
    """
    check_polytope(P)
    check_mode(mode)
    solver = check_solver(solver)
    theta = check_utility(P, theta, "theta")
    if mode != "hard":
        check_tau(tau, theta, P.event_dim)
        get_regularizer(regularizer)
    U = perturb(theta, noise, generator)
    if mode == "hard":
        return argmax(P, U, solver)
    soft = relax(P, U, tau, regularizer, solver, solver_args)
    if mode == "relaxed":
        return soft
    return straight_through(argmax(P, U, solver), soft)
