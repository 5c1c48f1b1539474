"""The generic hard sample (the LP argmax, a vertex) and the affine feasibility check."""

from __future__ import annotations

import threading

import cvxpy as cp
import numpy as np
import torch

from ..errors import SolverError
from ..polytope import LP_SOLVER, solution_value, solve_linear_objective
from .settings import SNAP_TOLERANCE


class AffineFeasibility:
    """The affine constraints of P that involve x alone, compiled once to dense rows.

    Equalities become ``A_eq x + b_eq = 0`` and inequalities ``A_in x + b_in <= 0``
    with x flattened in row-major order; the coefficients are read off by
    evaluating the constraint expressions at 0 and at the unit vectors
    (d + 1 evaluations, once), on a copy of the expressions in which x is replaced by a
    private ``cp.Parameter``: ``x.value`` is shared with every problem on the polytope (and
    other threads' solves), so it is neither read nor written.  Constraints with auxiliary
    variables are not checked.
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
        point = cp.Parameter(x.shape)
        stacked = _substitute(cp.hstack(expressions), x, point)
        d = x.size
        point.value = np.zeros(x.shape)
        offset = np.asarray(stacked.value, dtype=np.float64).ravel()
        columns = []
        for i in range(d):
            unit = np.zeros(d)
            unit[i] = 1.0
            point.value = unit.reshape(x.shape)
            columns.append(np.asarray(stacked.value, dtype=np.float64).ravel() - offset)
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


def _substitute(expression, old, new):
    """A copy of a cvxpy expression tree with the leaf ``old`` replaced by ``new``."""
    if expression is old:
        return new
    if not expression.args:
        return expression
    return expression.copy([_substitute(arg, old, new) for arg in expression.args])


class GenericArgmax:
    """The LP argmax_{x in P} <U, x>, one HiGHS (SciPy's, dual simplex) solve per batch element.

    HiGHS' simplex returns a basic optimal solution, i.e. a vertex of P. Entries
    within ``SNAP_TOLERANCE`` of an integer are snapped to it, so that on 0/1
    polytopes the result is exactly a 0/1 vertex.

    Thread-safe: the problem and its parameter are this object's (one per polytope, shared
    by every caller), so setting the parameter, solving and reading the solution happen under
    one lock; the solution is read from the problem's own record, never from ``x.value``
    (which every problem on the polytope's declaration writes).
    """

    def __init__(self, P):
        self.polytope = P
        x, constraints = P.cvxpy_declaration()
        self.x = x
        self.u = cp.Parameter(x.shape)
        self.problem = cp.Problem(cp.Maximize(cp.sum(cp.multiply(self.u, x))), constraints)
        self.lock = threading.Lock()

    def __call__(self, U: torch.Tensor) -> torch.Tensor:
        """U: (B, *event_shape) -> vertices of the same shape, dtype and device."""
        U64 = U.detach().to(device="cpu", dtype=torch.float64).numpy()
        out = np.empty_like(U64)
        # One LP per element: LP solvers take one instance at a time.
        for i in range(U64.shape[0]):
            with self.lock:
                status, value = self._solve(U64[i], i)
            if status != cp.OPTIMAL or value is None:
                raise SolverError(
                    f"hard argmax on {self.polytope.name}: batch element {i}: solver {LP_SOLVER} "
                    f"returned status {status}",
                    element=i,
                    solver=LP_SOLVER,
                    status=status,
                )
            rounded = np.round(value)
            out[i] = rounded + 0.0 if np.max(np.abs(value - rounded)) <= SNAP_TOLERANCE else value
        return torch.from_numpy(out).to(dtype=U.dtype, device=U.device)

    def _solve(self, u, i):
        """(status, value of x) of the LP with utilities u; the caller holds ``self.lock``."""
        self.u.value = u
        try:
            solve_linear_objective(self.problem)
        except cp.error.SolverError as error:
            raise SolverError(
                f"hard argmax on {self.polytope.name}: batch element {i}: solver {LP_SOLVER} failed ({error})",
                element=i,
                solver=LP_SOLVER,
                status="error",
            ) from error
        return self.problem.status, solution_value(self.problem, self.x)
