"""The generic path: any CVXPY-declared polytope, solved by cvxpylayers/diffcp.

For a polytope P (declared with CVXPY constraints on ``x``) and a regularizer f
with a CVXPY form, :class:`GenericRelaxation` builds once

    maximize  <u, x> - f(x)   subject to the constraints of P,

with ``u`` a ``cp.Parameter`` (so tau, applied to U in torch, never enters the
DPP question), wraps it as a ``CvxpyLayer`` and solves whole batches with it.
``exp_family_entropy`` has no CVXPY form in x; on a polytope that lists its vertices
V it is solved lifted to the vertex weights (see :class:`GenericRelaxation`).
:class:`GenericArgmax` solves the LP (f removed) with a simplex-type LP solver
that returns a vertex.  Both are cached on the polytope per regularizer.

Cost: milliseconds per instance (one conic solve each; DESIGN.md §5).  Accuracy
is the conic solver's tolerance: the defaults below (SCS at eps 1e-9) agree
with closed forms to about 1e-9, and diffcp's derivative to about 1e-7.
"""

from __future__ import annotations

import time
import warnings

import cvxpy as cp
import numpy as np
import torch

from .errors import SolverError
from .polytope import LP_SOLVER, Polytope, solve_linear_objective
from .regularizers import CvxpyRegularizer, get_regularizer

#: Clarabel at tight tolerances: about 1e-8 from the closed forms on exponential cones (the entropies).
CLARABEL_ARGS = {
    "solve_method": "Clarabel",
    "tol_gap_abs": 1e-12,
    "tol_gap_rel": 1e-12,
    "tol_feas": 1e-12,
    "tol_ktratio": 1e-10,
    "max_iter": 400,
}
#: SCS at eps 1e-9: about 1e-8 on the second-order cone of 1/2 ||x||^2, where Clarabel through
#: diffcp stops near 3e-6; but off by up to 1e-4 on exponential cones.
SCS_ARGS = {"solve_method": "SCS", "eps_abs": 1e-9, "eps_rel": 1e-9, "max_iters": 100_000}
#: The default settings for regularizers other than "euclidean" (which defaults to SCS_ARGS).
DEFAULT_SOLVER_ARGS = CLARABEL_ARGS
#: Settings retried, element by element, when a Clarabel solve fails or is infeasible.
FALLBACK_SOLVER_ARGS = SCS_ARGS


def default_solver_args(regularizer) -> dict:
    """The conic solver settings that are most accurate for ``regularizer`` (measured, see above)."""
    return SCS_ARGS if regularizer.name == "euclidean" else DEFAULT_SOLVER_ARGS


def fallback_solver_args(args: dict) -> dict:
    """The settings to retry an element with: the other solver of the pair."""
    return CLARABEL_ARGS if args.get("solve_method") == "SCS" else FALLBACK_SOLVER_ARGS


#: Entries of an LP solution closer than this to an integer are snapped to it.
SNAP_TOLERANCE = 1e-6
#: A relaxed solution violating P's affine constraints by more than this is re-solved.
FEASIBILITY_TOLERANCE = 1e-6
#: Relative slack of the plausibility tests on vector-Jacobian products (see implausible_gradients).
GRADIENT_SLACK = 1e-3


def _cache_key(regularizer):
    if isinstance(regularizer, CvxpyRegularizer):
        return ("user", id(regularizer))
    return ("builtin", regularizer.name)


def generic_relaxation(P, regularizer) -> "GenericRelaxation":
    """The cached generic layer of ``(P, regularizer)``, built on first use."""
    key = ("relax",) + _cache_key(regularizer)
    layer = P._generic_cache.get(key)
    if layer is None:
        layer = GenericRelaxation(P, regularizer)
        P._generic_cache[key] = layer
    return layer


def generic_argmax(P) -> "GenericArgmax":
    """The cached LP of ``P``, built on first use."""
    lp = P._generic_cache.get(("argmax",))
    if lp is None:
        lp = GenericArgmax(P)
        P._generic_cache[("argmax",)] = lp
    return lp


class GenericRelaxation:
    """X_tau = argmax_{x in P} <Z, x> - f(x) for a batch Z, through one CvxpyLayer.

    ``build_time`` is the one-off cost of building the layer (seconds).

    ``exp_family_entropy`` (f = A*, the conjugate of the log-partition over the vertices
    V) has no CVXPY form in x, but A*(x) = min {sum_v l_v log l_v : l in the simplex,
    V^T l = x}, so the relaxation is the entropy relaxation over the vertex weights l
    with utilities V z, mapped back by x = V^T l: one conic problem with |V| exponential
    cones per element (``lifted``), the same solver checks, exact up to the solver's
    tolerance.  Its backward is the lifted problem's exact Jacobian at the solver's
    weights (see ``_VertexWeightsMean``), not diffcp's.  It needs ``P.vertices``.
    """

    def __init__(self, P, regularizer):
        self.polytope = P
        self.regularizer = regularizer
        self.layer = None
        self.lifted = None
        start = time.perf_counter()
        if not regularizer.has_cvxpy_form:
            if P.vertices is None:
                raise ValueError(
                    f"regularizer {regularizer.name!r} on {P.name}: it has no CVXPY form, and the "
                    "generic path can only solve it over the vertex weights, which needs the vertices "
                    "that this polytope does not list; register a specialised solver (see polytopes) "
                    "or declare the polytope with Polytope.from_vertices"
                )
            V = P.vertices
            self.vertices = V.reshape(V.shape[0], -1).to(device="cpu", dtype=torch.float64)
            weights = cp.Variable(V.shape[0])
            simplex = Polytope.from_cvxpy(weights, [weights >= 0, cp.sum(weights) == 1], name=f"vertex weights of {P.name}")
            self.lifted = GenericRelaxation(simplex, get_regularizer("entropy"))
            self.build_time = time.perf_counter() - start
            return
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
        self.layer = CvxpyLayer(problem, parameters=[self.u], variables=[x])
        self.feasibility = AffineFeasibility(x, constraints)
        self.build_time = time.perf_counter() - start

    def __call__(self, Z: torch.Tensor, solver_args: dict | None = None) -> torch.Tensor:
        """Z: (B, *event_shape) -> X_tau of the same shape, dtype and device; differentiable.

        Every solution is checked against the polytope's affine constraints on x;
        an element that violates them by more than ``FEASIBILITY_TOLERANCE`` (or
        is not finite) is re-solved with the fallback solver, and a
        :class:`SolverError` names it if that fails too.
        """
        if self.lifted is not None:
            Z64 = Z.reshape(Z.shape[0], -1).to(device="cpu", dtype=torch.float64)
            args = dict(default_solver_args(self.lifted.regularizer) if solver_args is None else solver_args)
            with torch.no_grad():
                weights = self.lifted.solve(Z64 @ self.vertices.T, args)
            X = _VertexWeightsMean.apply(Z64, weights, self.vertices)
            return X.reshape(Z.shape).to(dtype=Z.dtype, device=Z.device)
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

    def _fallback(self, z, i, args, problem):
        fallback_args = fallback_solver_args(args)
        fallback = fallback_args["solve_method"]
        try:
            (row,) = self.layer(z, solver_args=dict(fallback_args))
            second = self._defects(row).get(0)
        except Exception as error:
            second = error
        if second is not None:
            raise SolverError(
                f"generic path on {self.polytope.name} with regularizer {self.regularizer.name!r}: "
                f"batch element {i} failed with solver {args.get('solve_method')} ({problem}) and "
                f"with the fallback {fallback} ({second})",
                element=i,
                solver=args.get("solve_method"),
                status=str(problem),
            )
        warnings.warn(
            f"generic path on {self.polytope.name}: batch element {i} failed with "
            f"{args.get('solve_method')} ({problem}); solved with the fallback {fallback}",
            RuntimeWarning,
            stacklevel=4,
        )
        return row


class _VertexWeightsMean(torch.autograd.Function):
    """X = V^T l for the conic solver's vertex weights l (B, m), with the lifted problem's exact Jacobian.

    The weights solve max <V z, l> + H(l) over the simplex, whose Jacobian in V z is
    diag(l) - l l^T; so dX/dz = V^T (diag(l) - l l^T) V, the covariance of the vertices
    under l (DESIGN.md: the E.F. Jacobian is a covariance), applied at the solver's l.
    diffcp's derivative of this problem, with one exponential cone per vertex, measured
    off by 1e-3 to 1e-2 at tau = 0.1 and once by 4e4 (then by 5 after the SCS retry).
    Forward Z64 (B, d) is only the node to differentiate; V (m, d).  Cost O(B m d).
    """

    @staticmethod
    def forward(ctx, Z64, weights, V):
        ctx.save_for_backward(weights, V)
        return weights @ V

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, G):
        weights, V = ctx.saved_tensors
        g = G @ V.T
        return ((g - (weights * g).sum(-1, keepdim=True)) * weights) @ V, None, None


class _CheckedBackward(torch.autograd.Function):
    """The generic layer with its vector-Jacobian products checked element by element.

    diffcp's derivative is occasionally far off (seen: 3e4 on a softmax whose forward
    value was right to 6e-8, where an exponential-cone constraint is nearly active and
    Clarabel's dual is not accurate enough).  The backward tests every row with
    :meth:`GenericRelaxation.implausible_gradients` and recomputes the rows that fail
    from a fallback-solver solve of that element, with a warning.
    """

    @staticmethod
    def forward(ctx, Z64, relaxation, args):
        with torch.enable_grad():
            z = Z64.detach().requires_grad_(True)
            X = relaxation.solve(z, args)
        ctx.inner = (z, X, relaxation, fallback_solver_args(args))
        return X.detach()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, G):
        z, X, relaxation, fallback_args = ctx.inner
        (grad,) = torch.autograd.grad(X, z, G, retain_graph=True)  # backward may run again (jacobian)
        bad = relaxation.implausible_gradients(X, G, grad)
        for i in bad.nonzero().flatten().tolist():  # normally none: one re-solve per bad row
            with torch.enable_grad():
                zi = z[i : i + 1].detach().requires_grad_(True)
                (xi,) = relaxation.layer(zi, solver_args=dict(fallback_args))
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


class AffineFeasibility:
    """The affine constraints of P that involve x alone, compiled once to dense rows.

    Equalities become ``A_eq x + b_eq = 0`` and inequalities ``A_in x + b_in <= 0``
    with x flattened in row-major order; the coefficients are read off by
    evaluating the constraint expressions at 0 and at the unit vectors
    (d + 1 evaluations, once).  Constraints with auxiliary variables are not checked.
    """

    def __init__(self, x, constraints):
        equalities, inequalities = [], []
        for con in constraints:
            if {v.id for v in con.variables()} != {x.id}:
                continue
            if isinstance(con, (cp.constraints.Equality, cp.constraints.Zero)):
                target = equalities
            elif isinstance(con, (cp.constraints.Inequality, cp.constraints.NonPos)):
                target = inequalities
            elif isinstance(con, cp.constraints.NonNeg):
                target = inequalities
            else:
                continue
            expr = -con.expr if isinstance(con, cp.constraints.NonNeg) else con.expr
            if expr.is_affine():
                target.append(cp.vec(expr, order="C") if expr.ndim else cp.reshape(expr, (1,), order="C"))
        self.eq = self._compile(x, equalities)
        self.ineq = self._compile(x, inequalities)

    @staticmethod
    def _compile(x, expressions):
        if not expressions:
            return None
        stacked = cp.hstack(expressions)
        saved = x.value
        d = x.size
        x.value = np.zeros(x.shape)
        offset = np.asarray(stacked.value, dtype=np.float64).ravel()
        columns = []
        for i in range(d):
            unit = np.zeros(d)
            unit[i] = 1.0
            x.value = unit.reshape(x.shape)
            columns.append(np.asarray(stacked.value, dtype=np.float64).ravel() - offset)
        x.value = saved
        return torch.from_numpy(np.stack(columns, axis=1)), torch.from_numpy(offset)

    def violations(self, X: torch.Tensor) -> torch.Tensor:
        """The largest constraint violation of each point of a batch X: (B, *event_shape) -> (B,)."""
        flat = X.reshape(X.shape[0], -1).to(torch.float64)
        worst = torch.zeros(flat.shape[0], dtype=torch.float64)
        if self.eq is not None:
            A, b = self.eq
            worst = torch.maximum(worst, (flat @ A.T + b).abs().amax(dim=-1))
        if self.ineq is not None:
            A, b = self.ineq
            worst = torch.maximum(worst, (flat @ A.T + b).clamp_min(0).amax(dim=-1))
        return worst


class GenericArgmax:
    """The LP argmax_{x in P} <U, x>, one HiGHS solve per batch element.

    HiGHS' simplex returns a basic optimal solution, i.e. a vertex of P. Entries
    within ``SNAP_TOLERANCE`` of an integer are snapped to it, so that on 0/1
    polytopes the result is exactly a 0/1 vertex.
    """

    def __init__(self, P):
        self.polytope = P
        x, constraints = P.cvxpy_declaration()
        self.x = x
        self.u = cp.Parameter(x.shape)
        self.problem = cp.Problem(cp.Maximize(cp.sum(cp.multiply(self.u, x))), constraints)

    def __call__(self, U: torch.Tensor) -> torch.Tensor:
        """U: (B, *event_shape) -> vertices of the same shape, dtype and device."""
        U64 = U.detach().to(device="cpu", dtype=torch.float64).numpy()
        out = np.empty_like(U64)
        # One LP per element: LP solvers take one instance at a time.
        for i in range(U64.shape[0]):
            self.u.value = U64[i]
            try:
                solve_linear_objective(self.problem)
            except cp.error.SolverError as error:
                raise SolverError(
                    f"hard argmax on {self.polytope.name}: batch element {i}: solver {LP_SOLVER} failed ({error})",
                    element=i,
                    solver=LP_SOLVER,
                    status="error",
                ) from error
            if self.problem.status != cp.OPTIMAL or self.x.value is None:
                raise SolverError(
                    f"hard argmax on {self.polytope.name}: batch element {i}: solver {LP_SOLVER} "
                    f"returned status {self.problem.status}",
                    element=i,
                    solver=LP_SOLVER,
                    status=self.problem.status,
                )
            value = np.asarray(self.x.value, dtype=np.float64)
            rounded = np.round(value)
            out[i] = rounded + 0.0 if np.max(np.abs(value - rounded)) <= SNAP_TOLERANCE else value
        return torch.from_numpy(out).to(dtype=U.dtype, device=U.device)
