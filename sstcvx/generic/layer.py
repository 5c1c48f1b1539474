"""The cvxpylayers layer of the generic path, with checked solutions and checked derivatives.

For a polytope P declared with CVXPY constraints on ``x`` and a regularizer f with a
CVXPY form, :class:`GenericRelaxation` builds once

    maximize  <u, x> - f(x)   subject to the constraints of P,

with ``u`` a ``cp.Parameter`` (so tau, applied to U in torch, never enters the DPP
question), wraps it as a ``CvxpyLayer`` and solves whole batches with it.  Every solution
is checked against P's affine constraints and every vector-Jacobian product for
plausibility; a defective element is re-solved with the fallback settings
(:mod:`sstcvx.generic.settings`), and a :class:`~sstcvx.SolverError` names it if that
fails too.

The layer is built with its cvxpylayers backend named, never cvxpylayers' default: ``DIFFCP``
(``settings.BACKEND``), whose settings are diffcp's, or, opt-in (``solver="moreau"``, the
``moreau`` extra), ``MOREAU`` with Moreau's settings (``settings.MOREAU_ARGS``); an element that
Moreau gets wrong is re-solved through diffcp with its default settings.  It is differentiable once:
a double backward (``create_graph=True``) raises :class:`SecondDerivativeError` instead of
returning a first derivative without a graph.

Cost: one conic solve per element (milliseconds).  Accuracy: the conic solver's tolerance.
"""

from __future__ import annotations

import time
import warnings

import cvxpy as cp
import torch

from ..errors import SecondDerivativeError, SolverError
from .lp import AffineFeasibility
from .settings import (
    BACKEND,
    FEASIBILITY_TOLERANCE,
    GRADIENT_SLACK,
    MOREAU_ARGS,
    MOREAU_BACKEND,
    check_moreau_args,
    check_solver_args,
    default_solver_args,
    fallback_solver_args,
)


class GenericRelaxation:
    """X_tau = argmax_{x in P} <Z, x> - f(x) for a batch Z, through one CvxpyLayer.

    ``build_time`` is the one-off cost of building the layer (seconds).  The regularizer
    must have a CVXPY form (``regularizer.has_cvxpy_form``); ``exp_family_entropy`` is
    solved over the vertex weights instead (:mod:`sstcvx.generic.lifted`).  ``backend``:
    cvxpylayers' ``"DIFFCP"`` (``settings.BACKEND``) or ``"MOREAU"`` (``settings.MOREAU_BACKEND``,
    which needs the ``moreau`` package).
    """

    def __init__(self, P, regularizer, backend: str = BACKEND):
        self.polytope = P
        self.regularizer = regularizer
        start = time.perf_counter()
        from cvxpylayers.torch import CvxpyLayer

        x, constraints = P.cvxpy_declaration()
        self.u = cp.Parameter(x.shape)
        objective = cp.Maximize(cp.sum(cp.multiply(self.u, x)) - regularizer.cvxpy(x))
        problem = cp.Problem(objective, constraints)
        if not problem.is_dcp():
            raise ValueError(f"regularizer {regularizer.name!r} on {P.name}: the relaxed problem is not DCP")
        if not problem.is_dpp():
            raise ValueError(
                f"regularizer {regularizer.name!r} on {P.name}: the relaxed problem is not DPP "
                "(the regularizer or the constraints must not multiply parameters)"
            )
        self.backend = backend
        # Moreau's method is fixed when its solver is first built, from the layer's construction settings
        options = dict(MOREAU_ARGS) if backend == MOREAU_BACKEND else None
        self.layer = CvxpyLayer(problem, parameters=[self.u], variables=[x], solver=backend, solver_args=options)
        # the diffcp layer that re-solves defective elements: the layer itself, or built on first need
        self._diffcp_layer = self.layer if backend == BACKEND else None
        self._problem, self._x = problem, x
        self.feasibility = AffineFeasibility(x, constraints)
        self.build_time = time.perf_counter() - start

    def __call__(self, Z: torch.Tensor, solver_args: dict | None = None) -> torch.Tensor:
        """Z: (B, *event_shape) -> X_tau of the same shape, dtype and device; differentiable.

        Every solution is checked against the polytope's affine constraints on x;
        an element that violates them by more than ``FEASIBILITY_TOLERANCE`` (or
        is not finite) is re-solved with the fallback solver, and a
        :class:`SolverError` names it if that fails too.
        """
        if self.backend == MOREAU_BACKEND:
            args = dict(MOREAU_ARGS if solver_args is None else check_moreau_args(solver_args))
        else:
            if solver_args is not None:
                check_solver_args(solver_args)
            args = dict(default_solver_args(self.regularizer) if solver_args is None else solver_args)
        Z64 = Z.to(device="cpu", dtype=torch.float64)
        if torch.is_grad_enabled() and Z64.requires_grad:
            X = _CheckedBackward.apply(Z64, self, args)
        else:
            X = self.solve(Z64, args)
        return X.to(dtype=Z.dtype, device=Z.device)

    def solve(self, Z64: torch.Tensor, args: dict) -> torch.Tensor:
        """The layer on a float64 CPU batch, with failed or infeasible elements re-solved."""
        try:
            (X,) = self.layer(Z64, solver_args=args)
        except Exception:  # diffcp fails the whole batch when one element fails
            return torch.cat([self._solve_one(Z64, i, args) for i in range(Z64.shape[0])])
        defects = self._defects(X)
        if defects:
            rows = list(X.unbind(0))
            for i, problem in defects.items():  # normally empty: one re-solve per defective element
                rows[i] = self._fallback(Z64[i : i + 1], i, args, problem)[0]
            X = torch.stack(rows)
        return X

    def implausible_gradients(self, X, G, grad) -> torch.Tensor:
        """Rows whose vector-Jacobian product cannot be right: (B,) bool.

        X_tau is the gradient of a convex function of Z, so its Jacobian J is symmetric
        positive semidefinite: <G, J G> >= 0.  For regularizers with ``bounded_jacobian``
        also ||J G|| <= max(1, max|X|) ||G||.  The slack allows for solver tolerance.
        """
        G, grad = G.reshape(G.shape[0], -1), grad.reshape(grad.shape[0], -1)
        g_norm = G.norm(dim=-1)
        slack = GRADIENT_SLACK * g_norm + 1e-12
        bad = (G * grad).sum(-1) < -slack * g_norm
        if self.regularizer.bounded_jacobian:
            scale = X.detach().reshape(X.shape[0], -1).abs().amax(-1).clamp_min(1.0)
            bad |= grad.norm(dim=-1) > scale * g_norm + slack
        return bad | ~torch.isfinite(grad).all(-1)

    def _defects(self, X: torch.Tensor) -> dict:
        """{element: what is wrong} for the non-finite or infeasible rows of a batch X."""
        X = X.detach()
        finite = torch.isfinite(X.reshape(X.shape[0], -1)).all(dim=-1)
        violation = self.feasibility.violations(torch.where(finite.reshape((-1,) + (1,) * (X.dim() - 1)), X, 0))
        defects = {int(i): "non-finite solution" for i in (~finite).nonzero().flatten()}
        for i in (finite & (violation > FEASIBILITY_TOLERANCE)).nonzero().flatten():
            defects[int(i)] = f"solution violates the constraints by {float(violation[i]):.2e}"
        return defects

    def _solve_one(self, Z64, i, args):
        try:
            (row,) = self.layer(Z64[i : i + 1], solver_args=args)
            problem = self._defects(row).get(0)
        except Exception as error:
            problem = error
        return row if problem is None else self._fallback(Z64[i : i + 1], i, args, problem)

    def solver_name(self, args: dict) -> str:
        """The conic solver that ``args`` select on this layer, for messages."""
        return "Moreau" if self.backend == MOREAU_BACKEND else str(args.get("solve_method"))

    def fallback_plan(self, args: dict):
        """``(layer, settings)`` that re-solve an element that ``args`` got wrong: diffcp with the other
        solver of its pair, or, after Moreau, diffcp with its default settings for this regularizer."""
        if self.backend == MOREAU_BACKEND:
            if self._diffcp_layer is None:  # (two threads may both build it: either layer serves)
                from cvxpylayers.torch import CvxpyLayer

                self._diffcp_layer = CvxpyLayer(self._problem, parameters=[self.u], variables=[self._x], solver=BACKEND)
            return self._diffcp_layer, dict(default_solver_args(self.regularizer))
        return self.layer, fallback_solver_args(args)

    def _fallback(self, z, i, args, problem):
        layer, fallback_args = self.fallback_plan(args)
        fallback = fallback_args["solve_method"]
        try:
            (row,) = layer(z, solver_args=dict(fallback_args))
            second = self._defects(row).get(0)
        except Exception as error:
            second = error
        if second is not None:
            raise SolverError(
                f"generic path on {self.polytope.name} with regularizer {self.regularizer.name!r}: "
                f"batch element {i} failed with solver {self.solver_name(args)} ({problem}) and "
                f"with the fallback {fallback} ({second})",
                element=i,
                solver=self.solver_name(args),
                status=str(problem),
            )
        warnings.warn(
            f"generic path on {self.polytope.name}: batch element {i} failed with "
            f"{self.solver_name(args)} ({problem}); solved with the fallback {fallback}",
            RuntimeWarning,
            stacklevel=4,
        )
        return row


def refuse_double_backward(path: str) -> None:
    """Raise :class:`SecondDerivativeError` when a backward runs with ``create_graph=True``.

    Autograd runs a backward with grad mode on exactly when ``create_graph=True``; a
    once-differentiable backward would then return a first derivative that is silently
    constant in the inputs (its second-order terms dropped).
    """
    if torch.is_grad_enabled():
        raise SecondDerivativeError(
            f"{path} is differentiable only once: its backward (the solver's derivative at its "
            "solution) has no derivative of its own, so create_graph=True (a gradient penalty, a Hessian-vector "
            "product, a meta-learning step) would silently miss its second-order terms. Use a "
            "specialized solver that is twice differentiable (solver='specialized' where the family "
            "has one), a closed form in torch, or finite differences of first derivatives"
        )


class _CheckedBackward(torch.autograd.Function):
    """The generic layer with its vector-Jacobian products checked element by element.

    diffcp's derivative can be far off where an exponential-cone constraint is nearly active
    and the conic solver's dual is not accurate enough, while the forward value is right
    (docs/generic.md has the measured cases).  The backward tests every row with
    :meth:`GenericRelaxation.implausible_gradients` and recomputes the rows that fail
    from a fallback-solver solve of that element, with a warning.
    """

    @staticmethod
    def forward(ctx, Z64, relaxation, args):
        with torch.enable_grad():
            z = Z64.detach().requires_grad_(True)
            X = relaxation.solve(z, args)
        ctx.inner = (z, X, relaxation, args)
        return X.detach()

    @staticmethod
    def backward(ctx, G):
        z, X, relaxation, args = ctx.inner
        refuse_double_backward(
            f"the generic path (cvxpylayers) on {relaxation.polytope.name} with regularizer "
            f"{relaxation.regularizer.name!r}"
        )
        (grad,) = torch.autograd.grad(X, z, G, retain_graph=True)  # backward may run again (jacobian)
        bad = relaxation.implausible_gradients(X, G, grad)
        rows = bad.nonzero().flatten().tolist()
        if rows:  # normally none: one re-solve per bad row
            fallback_layer, fallback_args = relaxation.fallback_plan(args)
        for i in rows:
            with torch.enable_grad():
                zi = z[i : i + 1].detach().requires_grad_(True)
                (xi,) = fallback_layer(zi, solver_args=dict(fallback_args))
                (gi,) = torch.autograd.grad(xi, zi, G[i : i + 1])
            if relaxation.implausible_gradients(xi, G[i : i + 1], gi).any():
                raise SolverError(
                    f"generic path on {relaxation.polytope.name} with regularizer "
                    f"{relaxation.regularizer.name!r}: the derivative of batch element {i} is "
                    f"implausible with the default solver and with the fallback {fallback_args['solve_method']}",
                    element=i,
                    solver=fallback_args["solve_method"],
                    status="implausible derivative",
                )
            warnings.warn(
                f"generic path on {relaxation.polytope.name}: the derivative of batch element {i} "
                f"was implausible (|vjp| {float(grad[i].norm()):.3g} for |G| {float(G[i].norm()):.3g}); "
                f"recomputed with {fallback_args['solve_method']}",
                RuntimeWarning,
                stacklevel=2,
            )
            grad[i] = gi[0]
        return grad, None, None
