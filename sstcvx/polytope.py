"""Polytopes P = conv(X) of finite sets X, declared with CVXPY constraints or by their vertices.

A :class:`Polytope` knows its event shape, its CVXPY declaration (built lazily,
once, because the tree families need exponentially many rows) and, when the set
is small or given explicitly, its vertex list.  Specialized solvers attach to
polytope classes through :mod:`sstcvx.registry`.
"""

from __future__ import annotations

import copy
import threading
import warnings

import cvxpy as cp
import numpy as np
import torch

# The LP solver of the hard argmax and of the declaration checks: SciPy's copy of HiGHS, dual
# simplex.  A simplex method returns a basic optimal solution, i.e. a vertex.  (cvxpy's "HIGHS"
# interface goes through highspy, whose first solver object in a process prints a license banner
# to the C-level stdout of the whole program; SciPy's build prints nothing.)
LP_SOLVER = "SCIPY"
LP_OPTIONS = {"scipy_options": {"method": "highs-ds"}}

# Serializes the lazy construction of a polytope's CVXPY declaration, so that two threads never
# build (and then use) two different declarations of one polytope.  Module-level, so polytopes
# stay picklable.
_DECLARATION_LOCK = threading.RLock()


def solve_linear_objective(problem: cp.Problem) -> None:
    """Solve a problem with a linear objective: SciPy's HiGHS dual simplex for LPs (a vertex, and
    nothing printed), Clarabel when a constraint is not linear."""
    try:
        problem.solve(solver=LP_SOLVER, **LP_OPTIONS)
    except cp.error.SolverError:
        problem.solve(solver="CLARABEL")


def solution_value(problem: cp.Problem, x: cp.Variable):
    """The value of ``x`` in the last solution of ``problem`` (a numpy array), or ``None``.

    Read from the problem's own solution record, not from ``x.value``: a variable is shared by
    every problem built on the polytope's declaration, and another thread's solve may have
    overwritten ``x.value`` meanwhile.
    """
    solution = problem.solution
    if solution is None or not solution.primal_vars:
        return None
    value = solution.primal_vars.get(x.id)
    return None if value is None else np.asarray(value, dtype=np.float64).reshape(x.shape)


class Polytope:
    """The convex hull P of a finite set X of points of shape ``event_shape``.

    Subclasses (``polytopes.*``) call ``super().__init__(event_shape, name)`` and
    implement ``_declare()`` returning ``(variable, constraints)``; they may
    implement ``_enumerate_vertices()`` (a tensor ``(m, *event_shape)`` or
    ``None`` when X is too large to list) for brute-force checks.  Users build
    polytopes with :meth:`from_cvxpy` or :meth:`from_vertices`.
    """

    #: What the declaration was recognized as (a :class:`sstcvx.recognition.Recognition`), or None.
    recognized = None

    def __init__(self, event_shape, name: str | None = None):
        shape = tuple(int(s) for s in event_shape)
        if not shape or any(s < 1 for s in shape):
            raise ValueError(f"event_shape: expected a non-empty shape of positive sizes, got {tuple(event_shape)}")
        self.event_shape = torch.Size(shape)
        self.name = name or type(self).__name__
        self._declaration = None
        self._vertices: torch.Tensor | None = None
        self._vertices_known = False

    # -- the CVXPY declaration -------------------------------------------------------------
    def _declare(self):
        raise NotImplementedError(f"{type(self).__name__} has no CVXPY declaration")

    def cvxpy_declaration(self):
        """``(x, constraints)``: the CVXPY variable and the constraints whose feasible set is P.

        Built on first use and cached; may raise ``ValueError`` when the
        declaration is too large to build (then use the specialized solver).
        """
        if self._declaration is None:
            with _DECLARATION_LOCK:
                if self._declaration is None:
                    x, constraints = self._declare()
                    self._declaration = (x, list(constraints))
        return self._declaration

    def linear_form(self):
        """The canonical linear form of the declaration, a :class:`sstcvx.linear_form.LinearForm`:
        ``A [x; w] = b``, ``G [x; w] <= h``, ``lower <= [x; w] <= upper`` with ``x`` flattened in
        row-major order and ``w`` the auxiliary variables.  Computed once and cached; raises
        ``ValueError`` when the declaration is not linear (see :mod:`sstcvx.linear_form`)."""
        from .linear_form import linear_form

        return linear_form(self)

    @property
    def event_dim(self) -> int:
        return len(self.event_shape)

    # -- the vertex list -------------------------------------------------------------------
    def _enumerate_vertices(self):
        return None

    @property
    def vertices(self) -> torch.Tensor | None:
        """All points of X as a float64 tensor ``(m, *event_shape)``, or ``None`` when unknown or too many."""
        if not self._vertices_known:
            v = self._enumerate_vertices()
            self._vertices = None if v is None else torch.as_tensor(v, dtype=torch.float64)
            self._vertices_known = True
        return self._vertices

    def __repr__(self):
        if self.recognized is not None:
            return f"{self.name} (event_shape={tuple(self.event_shape)}, recognized as {self.recognized.polytope.name})"
        return f"{self.name} (event_shape={tuple(self.event_shape)})"

    # -- copies and pickling -----------------------------------------------------------------
    # A polytope pickles, deep-copies and survives torch.save/torch.load, before and after use:
    # the generic path's layers live in a cache outside it, and the CVXPY declaration is either
    # dropped (families and vertex lists rebuild it on demand) or rebuilt with fresh CVXPY
    # objects (from_cvxpy).  Copying CVXPY objects as such is not safe: copy.deepcopy gives
    # variables new ids but keeps canonical forms cached under the old ones (cvxpy then aborts
    # the process in its C++ core), and unpickled variables keep ids that a new process may
    # hand out again.
    def _redeclarable(self) -> bool:
        return type(self)._declare is not Polytope._declare

    def __getstate__(self):
        state = dict(self.__dict__)
        if self._redeclarable():
            state["_declaration"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        if self._declaration is not None:
            self._declaration = _fresh_declaration(*self._declaration)

    def __deepcopy__(self, memo):
        clone = object.__new__(type(self))
        memo[id(self)] = clone
        state = self.__getstate__()
        declaration = state.pop("_declaration")
        clone.__dict__.update(copy.deepcopy(state, memo))
        clone._declaration = None if declaration is None else _fresh_declaration(*declaration)
        return clone

    # -- validation --------------------------------------------------------------------------
    def check(self, n_directions: int = 16, generator: torch.Generator | None = None, atol: float = 1e-6) -> bool:
        """Probe that P looks like the convex hull of a 0/1 set.

        Solves the LP max <c, x> over P for ``n_directions`` random Gaussian c and
        warns (``UserWarning``) when a solution is not integral to ``atol``: then
        the declaration is not conv of a 0/1 set (or needs more constraints),
        and the hard samples are not 0/1 points.  Returns True when all
        probes were integral.  Cost: ``n_directions`` LP solves.
        """
        x, constraints = self.cvxpy_declaration()
        c = cp.Parameter(x.shape)
        problem = cp.Problem(cp.Maximize(cp.sum(cp.multiply(c, x))), constraints)
        for i in range(n_directions):
            c.value = torch.randn(tuple(self.event_shape), generator=generator, dtype=torch.float64).numpy()
            solve_linear_objective(problem)
            value = solution_value(problem, x)
            if value is None:
                raise ValueError(f"{self.name}: the LP in probe direction {i} returned status {problem.status}")
            if np.max(np.abs(value - np.round(value))) > atol:
                warnings.warn(
                    f"{self.name}: the LP solution in a random direction is not integral "
                    f"(max distance to an integer point {np.max(np.abs(value - np.round(value))):.3g}); "
                    "the constraints may not describe the convex hull of a 0/1 set",
                    UserWarning,
                    stacklevel=2,
                )
                return False
        return True

    # -- constructors --------------------------------------------------------------------------
    @staticmethod
    def from_cvxpy(x, constraints, name: str | None = None, check: bool = False, recognize: bool = True) -> Polytope:
        """The polytope {x : constraints}, declared with ordinary CVXPY constraints.

        ``x`` is a ``cp.Variable`` of any shape (the event shape); the constraints
        may use auxiliary variables.  They must be DCP, parameter-free, feasible
        and bound ``x`` (checked with two LPs in opposite random directions).
        With ``check=True`` :meth:`check` also probes integrality of LP vertices.

        With ``recognize=True`` (the default) the declaration is compared with the
        registered families (:mod:`sstcvx.recognition`): when it provably describes one
        of them (a k-subset polytope, a Birkhoff polytope, ...) up to a permutation of
        the coordinates, ``P.recognized`` says which, and ``solver="auto"`` /
        ``"specialized"`` use that family's solvers; ``solver="generic"`` still solves the
        declaration as written.  ``recognize=False`` skips this.
        """
        return DeclaredPolytope(x, constraints, name=name, check=check, recognize=recognize)

    @staticmethod
    def from_vertices(vertices, name: str | None = None) -> Polytope:
        """The convex hull of the given points, ``vertices`` of shape ``(m, *event_shape)``.

        Its CVXPY declaration is x = sum_j lambda_j v_j with lambda in the
        simplex, so the generic path works; the exponential-family entropy and
        the hard argmax are computed exactly by enumerating the points.
        """
        return VertexPolytope(vertices, name=name)


class DeclaredPolytope(Polytope):
    """A polytope declared by a user with CVXPY constraints; see :meth:`Polytope.from_cvxpy`."""

    def __init__(self, x, constraints, name=None, check=False, recognize=True):
        if not isinstance(x, cp.Variable):
            raise TypeError(f"x: expected a cvxpy Variable, got {type(x).__name__}")
        if isinstance(constraints, cp.constraints.constraint.Constraint):
            constraints = [constraints]
        try:
            constraints = list(constraints)
        except TypeError:
            raise TypeError(
                f"constraints: expected a list of cvxpy constraints, got {type(constraints).__name__}"
            ) from None
        if not constraints:
            raise ValueError("constraints: expected at least one constraint; an empty list does not bound x")
        for i, con in enumerate(constraints):
            if not isinstance(con, cp.constraints.constraint.Constraint):
                raise TypeError(f"constraints[{i}]: expected a cvxpy constraint, got {type(con).__name__} ({con!r})")
            if not con.is_dcp():
                raise ValueError(f"constraints[{i}] ({con}) is not convex under CVXPY's DCP rules")
            if con.parameters():
                raise ValueError(
                    f"constraints[{i}] ({con}) contains cvxpy Parameters; a polytope must be fixed: "
                    "substitute the values (or build one polytope per value)"
                )
        if x.shape == ():
            raise ValueError("x: expected a vector or matrix variable, got a scalar")
        for where, variable in [("x", x)] + [
            (f"constraints (variable {v.name()})", v) for con in constraints for v in con.variables() if v.id != x.id
        ]:
            kind = _integrality(variable)
            if kind:
                raise ValueError(
                    f"{where}: a {kind} cp.Variable makes the declaration a set of points, not a polytope; "
                    "declare a continuous cp.Variable and the linear constraints of the convex hull "
                    "(e.g. 0 <= x <= 1 instead of boolean=True): sstcvx samples its vertices"
                )
        if not any(x.id in {v.id for v in con.variables()} for con in constraints):
            raise ValueError("constraints: no constraint involves x, so they do not bound it")
        super().__init__(x.shape, name or f"Polytope{tuple(x.shape)}")
        self._declaration = (x, constraints)
        self._check_bounded_nonempty()
        if check:
            self.check()
        if not isinstance(recognize, bool):
            raise TypeError(f"recognize: expected True or False, got {recognize!r}")
        if recognize:
            from .recognition import recognize as recognize_family

            self.recognized = recognize_family(self)

    def _enumerate_vertices(self):
        # a recognized declaration lists the family's vertices, mapped to its coordinates
        return None if self.recognized is None else self.recognized.vertices()

    def _check_bounded_nonempty(self):
        x, constraints = self._declaration
        c = np.random.default_rng(0).standard_normal(x.shape)
        for sign in (1.0, -1.0):
            problem = cp.Problem(cp.Maximize(cp.sum(cp.multiply(sign * c, x))), constraints)
            solve_linear_objective(problem)
            status = problem.status
            if status in (cp.INFEASIBLE, cp.INFEASIBLE_INACCURATE):
                raise ValueError(f"constraints: the polytope {self.name} is empty (the constraints are infeasible)")
            if status in (cp.UNBOUNDED, cp.UNBOUNDED_INACCURATE):
                raise ValueError(
                    f"constraints: they do not bound x; the feasible set of {self.name} is unbounded "
                    "(add bounds such as x >= 0, x <= 1)"
                )
            if status not in (cp.OPTIMAL, cp.OPTIMAL_INACCURATE):
                raise ValueError(f"constraints: the LP used to validate {self.name} returned status {status}")


def _fresh_declaration(x, constraints):
    """A copy of a declaration ``(x, constraints)`` made of new CVXPY objects (new ids, no caches):
    every variable and constant is re-created, every other node re-built on the new leaves."""
    leaves: dict = {}

    def rebuild(expr):
        if isinstance(expr, cp.Variable):
            if id(expr) not in leaves:
                attributes = {k: v for k, v in expr.attributes.items() if v is not None and v is not False}
                leaves[id(expr)] = cp.Variable(expr.shape, name=getattr(expr, "_name", None), **attributes)
            return leaves[id(expr)]
        if isinstance(expr, cp.Constant):
            return cp.Constant(expr.value)
        if not expr.args:
            return expr
        return expr.copy([rebuild(arg) for arg in expr.args])

    fresh = [rebuild(con) for con in constraints]
    return rebuild(x), fresh


def _integrality(variable) -> str | None:
    """ "boolean" or "integer" when a cvxpy variable carries that attribute (on any entry), else None."""
    for kind in ("boolean", "integer"):
        flag = variable.attributes.get(kind)
        if flag is not None and flag is not False and (flag is True or len(flag) > 0):
            return kind
    return None


class VertexPolytope(Polytope):
    """The convex hull of an explicit list of points; see :meth:`Polytope.from_vertices`."""

    def __init__(self, vertices, name=None):
        if not isinstance(vertices, (torch.Tensor, np.ndarray, list, tuple)):
            raise TypeError(f"vertices: expected a tensor of shape (m, *event_shape), got {type(vertices).__name__}")
        v = torch.as_tensor(vertices, dtype=torch.float64).detach().cpu()
        if v.dim() < 2 or v.shape[0] < 1:
            raise ValueError(f"vertices: expected shape (m, *event_shape) with m >= 1, got {tuple(v.shape)}")
        if not torch.isfinite(v).all():
            raise ValueError("vertices: expected finite values")
        v = torch.unique(v.reshape(v.shape[0], -1), dim=0).reshape(-1, *v.shape[1:])
        super().__init__(v.shape[1:], name or f"ConvexHull({v.shape[0]} points)")
        self._vertices = v
        self._vertices_known = True

    def _declare(self):
        v = self._vertices.reshape(self._vertices.shape[0], -1).numpy()
        x = cp.Variable(tuple(self.event_shape))
        weights = cp.Variable(v.shape[0], nonneg=True)
        flat = cp.vec(x, order="C") if x.ndim > 1 else x
        return x, [cp.sum(weights) == 1, flat == v.T @ weights]
