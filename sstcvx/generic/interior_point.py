"""A batched primal-dual interior-point solver for separable regularizers on a declared polytope.

Problem.  For ``z = U / tau`` (a batch ``(B, n)``) and P in its canonical linear form
(:meth:`sstcvx.Polytope.linear_form`),

    X_tau = argmax_x  <z, x> - f(x)   over   { x : exists w, A [x; w] = b, G [x; w] <= h, l <= [x; w] <= u }

with f separable on x (the negative entropy x log x, the binary entropy, 1/2 x^2, or a
:class:`~sstcvx.regularizers.SeparableRegularizer` through its ``derivatives``) and no regularization
on the auxiliary variables w.  The preprocessing is :func:`~sstcvx.generic.dual_newton.build_dual_problem`'s
(fixed columns substituted, dependent equality rows dropped, bounds of w implied by the rows found
by interval propagation, an artificial box of width ``AUX_BOX`` times the form's scale on a side of
w still unbounded: a solution touching it is reported as not converged).  f's domain (an open
interval) joins the bounds of x: every finite end of ``[l, u]`` intersected with the domain is a
bound with a slack and a multiplier, so that a coordinate may end at an end where phi' is finite
(the Tsallis entropies at 0) and the iterates never leave the domain.

Algorithm: Mehrotra's predictor-corrector on the KKT conditions

    f'(x) - z + C_x^T nu - zl + zu = 0,   C_w^T nu - zl + zu = 0,   A v = b,   G v + s = h,
    s y = mu,   (v - l) zl = mu,   (u - v) zu = mu,        v = [x; w],  nu = (lambda, y),

with the objective divided by ``max(1, max|z|)`` (multipliers of order one for every tau and
|U|).  With Phi = f''(x) (0 on w) + zl / (v - l) + zu / (u - v), each Newton system reduces to the
m x m normal matrix ``M = C Phi^{-1} C^T + diag(0, s / y)`` (m = the number of rows), factored once
per iteration by one batched Cholesky and used for both the predictor (affine) and the corrector
direction; the centering weight is (mu_aff / mu)^3, its target never below a tenth of the final
complementarity; one step length for all variables, a fraction max(0.995, 1 - mu) of the largest
that keeps every slack and multiplier positive (fraction to the boundary: a fixed 0.995 would cap
the decrease of mu at 200-fold per step in the last iterations), and no line search: measured, a residual
line search only slowed the entropies down (their dual residual at coordinates bound for 0 does
not decrease monotonically) and the plain fraction-to-boundary step converged on every case of
the benchmarks and tests.  The normal matrix is equilibrated (unit diagonal) before its
Cholesky factorization, with a relative jitter of 1e-15; the auxiliary variables get a
proximal term (centered at the current iterate: it damps the steps in directions where the flows
of an extended formulation are not unique, without moving the solution) of weight mu, the
current mean complementarity, for the first ``PROXIMAL_DELAY`` iterations, then at least
``PROXIMAL``: measured, a fixed weight cost 50-75 iterations on a flow formulation at |z| about 1
where this takes 8-14, and no weight floor let a few elements at |z| about 30 stall.  phi' and
phi'' are evaluated once per iteration, at the new point, for the whole batch: a user's
separable regularizer costs one autograd call per iteration, not an inner iteration (unlike the
dual method of :mod:`~sstcvx.generic.dual_newton`, which needs the inverse of phi').

Why this method and not the dual Newton method of :mod:`~sstcvx.generic.dual_newton`: that one
needs x(nu) in closed form (or by an inner root search for a user phi) and a barrier on the
auxiliary variables that recenters slowly; the primal-dual method treats inequality rows, bounds
and auxiliary variables alike, needs only phi' and phi'', and converges superlinearly: measured
(docs/generic.md), 8-17 iterations on the benchmark polytopes, 8-14 on a flow formulation of
spanning trees, 11-13 at 1,000 variables.  With equality rows only and a built-in regularizer,
the dual method is faster (5-7 Newton steps and no slacks) and stays the default there.

Polish (the Euclidean regularizer on declarations without auxiliary variables, where the problem
is a strictly convex quadratic program): once an element's largest complementarity product is
below ``POLISH_START`` times the form's scale, its active set is guessed (a slack below its
multiplier), the active rows and bounds are held at equality and the others dropped, and the
remaining equality-constrained problem is solved exactly by one Newton step on (x, nu); pairs
that break their sign condition change sides and the element is solved again (``POLISH_ROUNDS``
times at most: a primal-dual active-set step), with ``POLISH_TRIES`` attempts per element (an
active-set method can cycle on a degenerate element).  An element whose polished point has every
held multiplier and dropped slack non-negative, its held rows met and its dual residual below
the tolerances is done, with complementarity exactly 0: an interior point can approach a
near-degenerate pair only as mu / s, the polish lands on it.  The same active-set solve also runs
before the interior point, from the active set of the box's solution (x = z clamped; the bounds
z leaves and the rows that x violates held, except the bounds of a held row's columns), with
``START_ROUNDS`` rounds when that guess breaks at most ``START_MAX_WRONG`` sign conditions per
element on average.  Measured (docs/generic.md): it solves every element of a path of 6 before
the first iteration, and ends most elements of a path of 30 3-4 iterations earlier.  No polish
for a nonlinear f (see :func:`_polishes`).

Factorization: M's sparsity pattern is fixed by C.  Where a nested-dissection order gives a shallow
elimination tree (a path's or a chain's rows), M is factored by the level-scheduled sparse Cholesky
of :mod:`~sstcvx.generic.sparse_cholesky` (a fixed number of batched operations per level, about
log2 m levels for a path) instead of one dense LAPACK factorization per element.

Primal reduction (the same Newton system, reduced the other way).  Write C = [A; G] (equality rows
A, m_eq of them; inequality rows G) and D = y / s on G's rows.  The rows' equations
``G dv - (s / y) dy = rows_in`` give ``dy = D (G dv - rows_in)``, which leaves

    H dv + A^T dlambda = r1 + G^T D rows_in,   A dv = rows_eq,     H = Phi + G^T D G   (N x N),

solved with H factored by levels (equilibrated, as M) and the equality Schur complement
``S = A H^-1 A^T = W^T D_L^-1 W`` (``W = L^-1 P^T A^T``, one forward substitution of m_eq
columns; S is m_eq x m_eq, dense batched Cholesky); a direction then costs one forward and one
backward substitution.  H's pattern is fixed by G: for the capacity rows of a flow formulation
(each couples one flow with one x) it is block diagonal per x with its flows, an elimination tree
of 2 levels, where M (m x m) is dense.  Chosen at build time (:func:`_primal_reduction`) where M
would be factored densely, H's tree has at most ``LEVEL_FRACTION`` N levels (N >= 12), H is
sparse enough (``PRIMAL_DENSITY``, ``PRIMAL_MAX_UPDATES``), the estimated multiply-adds per element
(H's factorization and assembly, ``nnz(L) m_eq`` for W, ``N m_eq^2 / 2`` for S, ``m_eq^3 / 6``)
are below the normal matrix's (``m^2 N / 2 + m^3 / 6``), and the problem is not one the polish
serves (its states hold slacks at exactly 0: y / s infinite).  Not on a path (M is already
factored by levels) nor on dense packing rows (H fills in).  Precision: H carries y / s of order
1 / mu on the active rows and loses about log10(1 / mu) digits of the other terms of those rows
to cancellation; the iteration's residuals absorb that (same iteration counts as with M), the
backward refines its solve (below).

Convergence (per element, in the scaled problem): primal residual ``max|C v - d + (0, s)| <=
TOLERANCE * scale`` (the form's scale), every coordinate of the dual residual either below
``TOLERANCE`` or below the resolution of floats at x (phi'' times 4 eps max(1, |x|): a
coordinate that should underflow, as exp(-1e6) for the entropy at tiny tau), and every
complementarity product s y below ``MU_TOLERANCE * scale`` (the largest, not the mean: with the
mean, one nearly active bound whose multiplier vanishes could keep a product as large as the
number of pairs times the tolerance, and x was measured 2e-6 off there).  The solution is then
within about 1e-11 of the exact one, and within about 1e-8 on a near-degenerate coordinate (a
bound or row nearly active with a vanishing multiplier, where an interior point can only
approach it as mu / s).  Converged elements are frozen (the
iteration continues on the others only).  Status per element as in
:mod:`~sstcvx.generic.dual_newton`.

Backward (exact for the returned point, which solves the KKT conditions with the final mu):
differentiating them,

    dX/dz = (Phi^{-1} - Phi^{-1} C^T M^{-1} C Phi^{-1})_xx / max(1, max|z|),

one batched Cholesky solve per backward pass with M and Phi at the returned point (recomputed
there once after the iteration).  Auxiliary variables keep a proximal weight ``BACKWARD_PROXIMAL``
(1e-7) in that Phi: the interior auxiliary variables of a vertex list or a flow formulation (not
unique) have Phi of order mu / w^2 ~ 1e-12 at the returned point, M then has a condition number
near 1e11 after equilibration, and the products were measured 4e-4 to 3.5e-3 off the same
polytope declared without auxiliary variables (path 6 by its vertices against its rows; K4's
trees by vertices against central differences).  The weight biases the derivative by O(weight):
measured, 1e-5 left 1.4e-4, 1e-7 at most 1.4e-6, 1e-8 1.6e-6 (conditioning again).  With the
primal reduction, the same operator as ``(H^-1 - H^-1 A^T S^-1 A H^-1)_xx / max(1, max|z|)``, its
solve refined by ``REFINE_STEPS`` steps of iterative refinement on the unreduced system in (dv,
dlambda, dy) (see :func:`_primal_backward`: an element whose refinement does not contract is
solved with M).  An inactive inequality row has s / y huge in M and drops out, an active bound
has a huge Phi; hence ``torch.autograd.gradcheck`` passes at its default tolerances in float64.

All variables of an element live in one state tensor (see :class:`_Layout`): the slacks and
multipliers of inequality rows and bounds form two aligned blocks, so that complementarity, the
ratio test, the update and the removal of converged elements are one operation each; one host
synchronization per iteration (the convergence test) besides the Cholesky factorization's check.

Cost per iteration: O(B nnz(M) N + B m^3) (N = columns of x and w; M is assembled on its
sparsity pattern where that is small, densely otherwise), or with the primal reduction O(B (the
factorization's multiply-adds + nnz(L) m_eq + N m_eq^2 + m_eq^3)) and O(levels) batched operations;
one evaluation of phi' and phi'';
float64 throughout on the input's device; no Python loop over the batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from . import sparse_cholesky
from .dual_newton import (
    STATUS_AUX_BOX,
    STATUS_CONVERGED,
    STATUS_MAX_ITER,
    STATUS_NOT_FINITE,
    DualProblem,
    FastRelaxation,
    _cholesky,
)
from .layer import refuse_double_backward

#: Iterations allowed per element.
MAX_ITER = 200
#: Tolerance on the primal residual (times the form's scale) and on the dual residual (scaled objective).
TOLERANCE = 1e-11
#: Tolerance on every complementarity product s y (times the form's scale).
MU_TOLERANCE = 1e-12
#: Fraction of the step to the boundary that is taken: max(FRACTION, 1 - mu), at most 1 - FRACTION_GAP.
FRACTION = 0.995
FRACTION_GAP = 1e-8
#: Proximal weight on the auxiliary variables (Phi_w >= the weight): a proximal-point term centered at
#: the current iterate, so that it changes the steps, not the solution.  The weight is the current mean
#: complementarity mu for the first PROXIMAL_DELAY iterations (it fades as mu -> 0: most elements
#: converge in that time), then at least PROXIMAL (without that floor, a few elements of a flow
#: formulation at |z| about 30 stall; with it from the start, those at |z| about 1 take 50-75 iterations).
PROXIMAL = 1e-7
PROXIMAL_DELAY = 12
#: Relative jitter on the diagonal of the equilibrated normal matrix.
JITTER = 1e-15
#: Active-set polish (:func:`_polish`, the Euclidean regularizer only): tried on an element once its largest
#: complementarity product is below POLISH_START times the form's scale, with POLISH_ROUNDS rounds of sign flips.
POLISH_START = 1e-4
POLISH_ROUNDS = 3
#: Polish attempts per element (an active-set method can cycle on a degenerate element; the interior
#: point then finishes it).
POLISH_TRIES = 2
#: Rounds of the active-set method that starts the Euclidean case (negative: none).
START_ROUNDS = 12
#: ... unless the box's active set breaks more sign conditions than this per element on average.  Measured
#: with U ~ N(0, 1): 0.65 on a path of 6 and 3-6 on a path of 30 (by the draw), where 6-10 rounds solve
#: every element; 10 on a path of 30 at |U| ~ 3, where rounds still gain a little; 13.75 at |U| ~ 10 and
#: 13 on 1,000 variables with 100 rows, where they cost more than the interior-point iterations they
#: replace (1.6x on the path without the cap).
START_MAX_WRONG = 12.0
#: The proximal weight on the auxiliary variables in the backward's Phi (see the module's "Backward").
BACKWARD_PROXIMAL = 1e-7
#: In a polished solution, the vanishing member of a complementarity pair is 0 (a slack) or TINY (a
#: multiplier); a row dropped from the polish system gets the diagonal weight HUGE.
TINY = 1e-200
HUGE = 1e200

_DOMAINS = {"entropy": (0.0, math.inf), "binary_entropy": (0.0, 1.0), "euclidean": (-math.inf, math.inf)}


@dataclass
class InteriorPointProblem:
    """The solver's tensors (float64, on one device): the rows ``C (m, N)`` on the free columns of x
    then w (equality rows first), ``d (m,)``; bounds ``lo, up (N,)`` (0 where absent) with the masks
    ``has_lo, has_up`` (float 0/1); ``v0 (N,)`` the starting point; ``nx`` columns of x; the domain
    ends of f on x (``dom_lo, dom_hi``, +-inf where absent); what :class:`DualProblem` says about
    fixed columns and artificial bounds of w."""

    dual: DualProblem
    kind: object
    C: torch.Tensor
    d: torch.Tensor
    lo: torch.Tensor
    up: torch.Tensor
    has_lo: torch.Tensor
    has_up: torch.Tensor
    v0: torch.Tensor
    nx: int
    dom_lo: float
    dom_hi: float
    pattern: tuple | None = None
    #: ``(SparseCholesky, keep, where)`` where M is factored by levels (see :func:`_sparsity`), else None
    sparse: tuple | None = None
    #: ``K^T (nnz, N)`` of the pattern, contiguous (M's entries batch last are ``K^T @ p^T``)
    pattern_t: torch.Tensor | None = None
    #: the primal reduction's tensors where it is chosen (see :func:`_primal_reduction`), else None
    primal: _Primal | None = None
    #: the columns of x whose lower (upper) bound is the domain's own end, and whether all are
    at_lo: torch.Tensor = field(init=False)
    at_hi: torch.Tensor = field(init=False)
    all_at_lo: bool = field(init=False)
    all_at_hi: bool = field(init=False)
    #: the number of complementarity pairs
    pairs: float = field(init=False)
    layout: _Layout = field(init=False)

    def __post_init__(self):
        nx = self.nx
        self.at_lo = (self.lo[:nx] == self.dom_lo) & (self.has_lo[:nx] > 0)
        self.at_hi = (self.up[:nx] == self.dom_hi) & (self.has_up[:nx] > 0)
        self.all_at_lo = bool(self.at_lo.all())
        self.all_at_hi = bool(self.at_hi.all())
        self.pairs = max(self.m - self.dual.m_eq + float(self.has_lo.sum() + self.has_up.sum()), 1.0)
        self.layout = _Layout(self)

    @property
    def m(self) -> int:
        return int(self.d.shape[0])

    @property
    def m_eq(self) -> int:
        return self.dual.m_eq


def build_interior_point_problem(prob: DualProblem, kind) -> InteriorPointProblem:
    """Turn :func:`~sstcvx.generic.dual_newton.build_dual_problem`'s output into the solver's tensors."""
    dt = torch.float64
    dom_lo, dom_hi = _DOMAINS[kind] if isinstance(kind, str) else kind.domain
    C = torch.cat([prob.Cx, prob.Cw], dim=1).to(dt)
    assert prob.xl is not None and prob.xu is not None
    xl = torch.clamp(prob.xl, min=float(dom_lo))
    xu = torch.clamp(prob.xu, max=float(dom_hi))
    lo = torch.cat([xl, prob.wl])
    up = torch.cat([xu, prob.wu])
    if bool((lo >= up).any()):
        j = int((lo >= up).nonzero()[0])
        raise ValueError(
            f"constraints: column {j} has an empty interior once the regularizer's domain [{dom_lo:g}, {dom_hi:g}] "
            "is applied to its bounds"
        )
    has_lo, has_up = torch.isfinite(lo), torch.isfinite(up)
    lo0, up0 = torch.where(has_lo, lo, 0.0), torch.where(has_up, up, 0.0)
    # a start strictly inside the bounds: the middle of a finite interval, one unit inside a half-line
    unit = max(1.0, 0.0) * torch.ones_like(lo0)
    v0 = torch.where(has_lo & has_up, 0.5 * (lo0 + up0), torch.zeros_like(lo0))
    v0 = torch.where(has_lo & ~has_up, lo0 + unit, v0)
    v0 = torch.where(~has_lo & has_up, up0 - unit, v0)
    pattern, sparse = _sparsity(C)
    primal = _primal_reduction(C, prob.m_eq, int(prob.Cx.shape[1]), kind, sparse is not None)
    return InteriorPointProblem(
        prob,
        kind,
        C,
        prob.d.to(dt),
        lo0,
        up0,
        has_lo.to(dt),
        has_up.to(dt),
        v0,
        int(prob.Cx.shape[1]),
        float(dom_lo),
        float(dom_hi),
        pattern,
        sparse,
        None if pattern is None else pattern[0].T.contiguous(),
        primal,
    )


#: The normal matrix is assembled from its sparsity pattern when the table of products has at most
#: this many entries (columns times non-zeros of M); densely otherwise.
PATTERN_LIMIT = 2**22
#: Below this many elements times m^3 the dense factorization is used although the level-scheduled one
#: exists: its fixed cost (about 10 batched operations per level) exceeds a few small LAPACK calls.
#: Measured on path 30 (m = 29, 5 levels): 90 + 5.2 B us dense against 260 + 1.4 B us by levels.
DENSE_WORK = 1_000_000


def _diagonal_positions(r: torch.Tensor, c: torch.Tensor, m: int) -> torch.Tensor:
    """Where the diagonal entries of an m x m pattern lie among its entries ``(r, c)`` (every diagonal
    entry must be among them)."""
    position = torch.full((m * m,), -1, dtype=torch.long, device=r.device)
    position[r * m + c] = torch.arange(r.numel(), device=r.device)
    return position[torch.arange(m, device=r.device) * (m + 1)]


def _equilibrated_levels(V, diag, r, c, chol, keep, where):
    """Equilibrate the entries ``V (nnz, B)`` (batch last) of a symmetric pattern to a unit diagonal
    (plus JITTER) in place and factor them by levels: ``(F, q (n, B))``, F from
    :meth:`SparseCholesky.factor`, ``matrix ~ diag(q) L D L^T diag(q)`` in the elimination order."""
    q = V.index_select(0, diag).clamp_min_(1e-300).sqrt_()
    V /= q.index_select(0, r) * q.index_select(0, c)
    V[diag] += JITTER
    F = V.new_zeros(chol.nnz + chol.m, V.shape[1])
    F[where] = V.index_select(0, keep)
    return chol.factor(F), q


def _sparsity(C: torch.Tensor):
    """``(pattern, sparse)`` for the normal matrix M = C diag(p) C^T.  ``pattern = (K, flat, diag, r, c)``
    assembles M as ``(p @ K)`` on its non-zero entries: ``K (N, nnz)`` holds C[r, j] C[c, j] for the
    entries (r, c) of M that some column touches (and the diagonal), ``flat`` their positions in the
    flattened m x m matrix, ``diag (m,)`` where the diagonal entries are among them; None where the
    table would exceed PATTERN_LIMIT entries or M is more than half full.  ``sparse = (chol, keep,
    where)`` where the level-scheduled factorization of :mod:`~sstcvx.generic.sparse_cholesky` is worth
    it: the symbolic factorization, and which entries of the pattern land where in L; else None."""
    m, N = C.shape
    if m == 0:
        return None, None
    touch = (C != 0).to(C.dtype)
    nz = ((touch @ touch.T) > 0) | torch.eye(m, dtype=torch.bool, device=C.device)
    r, c = nz.nonzero(as_tuple=True)
    if N * r.numel() > PATTERN_LIMIT or r.numel() > 0.5 * m * m:
        return None, None
    K = (C[r] * C[c]).T.contiguous()
    flat = r * m + c
    diag = _diagonal_positions(r, c, m)
    sparse = None
    if m >= sparse_cholesky.MIN_ROWS:
        chol = sparse_cholesky.SparseCholesky(nz)
        if sparse_cholesky.worth_it(chol):
            keep, where = chol.lower_positions(r, c)
            sparse = (chol.on(C.device), keep.to(C.device), where.to(C.device))
    return (K, flat, diag, r, c), sparse


def _derivatives(ip: InteriorPointProblem, x: torch.Tensor, sl: torch.Tensor, su: torch.Tensor):
    """(phi'(x), phi''(x)) on the columns of x.  For the built-in regularizers the distances to the
    ends of the domain are taken from the slacks where the bound is the domain's own end (exact
    even where 1 - x rounds to 0)."""
    kind: Any = ip.kind
    nx = ip.nx
    if not isinstance(kind, str):
        # keep x strictly inside phi's domain (a slack may be below the spacing of floats at x)
        # (one clamp by Python floats: the operations on 0-dim tensors that it replaced cost 6 per iteration)
        return kind.derivatives(x.clamp(math.nextafter(ip.dom_lo, math.inf), math.nextafter(ip.dom_hi, -math.inf)))
    if kind == "euclidean":
        return x, torch.ones_like(x)
    a = sl[:, :nx] if ip.all_at_lo else torch.where(ip.at_lo, sl[:, :nx], x - ip.dom_lo)
    if kind == "entropy":
        return torch.log(a) + 1.0, 1.0 / a
    b = su[:, :nx] if ip.all_at_hi else torch.where(ip.at_hi, su[:, :nx], ip.dom_hi - x)
    return torch.log(a) - torch.log(b), 1.0 / a + 1.0 / b


@dataclass
class InteriorPointSolution:
    """What :func:`solve` returns: ``x (B, n)`` (float64), ``status (B,)`` (see
    ``dual_newton.STATUS_NAMES``), ``iterations (B,)``, ``residual (B,)`` (the largest scaled KKT
    residual), and for the backward the Cholesky factor ``chol (B, m, m)`` of the equilibrated M and
    its scaling ``q (B, m)`` (see :func:`_normal_factor`), ``phi_inv (B, N)``
    and the scale ``sz (B, 1)`` at the solution."""

    x: torch.Tensor
    status: torch.Tensor
    iterations: torch.Tensor
    residual: torch.Tensor
    chol: torch.Tensor
    q: torch.Tensor
    phi_inv: torch.Tensor
    sz: torch.Tensor
    #: where the problem uses the primal reduction: :func:`_primal_factor`'s tuple and s / y on the rows
    #: (chol and q are then empty)
    primal_factor: tuple | None = None


class _Layout:
    """Where the variables lie in the one state tensor ``T (B, width)`` of a set of elements:
    ``[v (N) | lambda (m_eq) | y (mi) | zl, zu (2N) | s (mi) | sl, su (2N)]``, so that the
    multipliers ``Y = [y, zl, zu]`` and their slacks ``S = [s, sl, su]`` are two aligned blocks of
    ``P = mi + 2N`` pairs (complementarity, ratio test and update are one operation each over all
    pairs, and dropping converged elements indexes one tensor).  Absent bounds keep zl = 0 (zu = 0)
    and sl = 1 (su = 1) with zero directions."""

    def __init__(self, ip: InteriorPointProblem):
        N, m, m_eq = ip.C.shape[1], ip.m, ip.m_eq
        self.N, self.m, self.m_eq, self.mi, self.nx = N, m, m_eq, m - m_eq, ip.nx
        self.pairs = m - m_eq + 2 * N
        self.o_y = N + m_eq  # Y starts here; the positive part T[:, o_y:] is [Y | S]
        self.o_s = self.o_y + self.pairs
        self.width = self.o_s + self.pairs
        # the sign of a bound slack's direction in dv (0 where the bound is absent), and which pairs exist
        self.sign = torch.cat([ip.has_lo, -ip.has_up])
        self.mask = torch.cat([ip.has_lo.new_ones(m - m_eq), ip.has_lo, ip.has_up])
        self.exists = self.mask > 0
        # 1 at the multiplier of an absent pair (0 with a zero direction), 0 elsewhere, over [Y | S]
        self.pad = torch.cat([1.0 - self.mask, torch.zeros_like(self.mask)])
        self.sign2 = self.sign.view(2, N)
        # slack = [s, v, -v] * mask + slack_offset: [s, v - lo, up - v] where the pair exists, 1 elsewhere
        self.slack_offset = torch.cat([ip.has_lo.new_zeros(m - m_eq), -ip.lo * ip.has_lo, ip.up * ip.has_up])
        self.slack_offset += 1.0 - self.mask


def _phi_inverse(lay: _Layout, T, h, proximal=0.0):
    """``(1 / Phi, ratio)`` with Phi = f''(x) (0 on w, plus ``proximal``) + zl / sl + zu / su and
    ``ratio = [s / y, zl / sl, zu / su] (B, P)``."""
    N, nx, mi = lay.N, lay.nx, lay.mi
    o_y, o_s = lay.o_y, lay.o_s
    ratio = torch.cat([T[:, o_s : o_s + mi] / T[:, o_y : o_y + mi], T[:, o_y + mi : o_s] / T[:, o_s + mi :]], dim=1)
    phi = ratio[:, mi : mi + N] + ratio[:, mi + N :]
    phi[:, :nx] += h
    if N > nx:
        phi[:, nx:] += proximal
    return phi.reciprocal_(), ratio


def _normal_factor(ip, extra, phi_inv):
    """The Cholesky factor of M = C Phi^{-1} C^T + diag(0, extra) (extra = s / y) after symmetric diagonal
    equilibration: ``(L, q)`` with ``M ~ diag(q) L L^T diag(q)``, ``q = sqrt(diag M)``.

    Equilibration matters: near the solution the entries of M range over many decades (1 / mu
    against mu), and a jitter relative to the largest diagonal entry would swamp the small rows;
    here each row gets a relative jitter of JITTER (more where the factorization fails: a
    rank-deficient set of active rows).  M is assembled on its sparsity pattern (a path's rows touch
    their neighbors only) where :func:`_sparsity` found one, densely otherwise."""
    B, m, m_eq = phi_inv.shape[0], ip.m, ip.m_eq
    if ip.pattern is not None:
        # M's entries batch last, V (nnz, B): every step below gathers whole entries (along dim 0,
        # several times cheaper than along dim 1 for these sizes)
        _, flat, diag, r, c = ip.pattern
        V = ip.pattern_t @ phi_inv.T
        V[diag[m_eq:]] += extra.T
        if ip.sparse is not None and B * m**3 > DENSE_WORK:
            F, q = _equilibrated_levels(V, diag, r, c, *ip.sparse)
            return F, q.T
        q = V.index_select(0, diag).clamp_min_(1e-300).sqrt_()
        V /= q.index_select(0, r) * q.index_select(0, c)
        V[diag] += JITTER
        Ms = V.new_zeros(m * m, B)
        Ms[flat] = V
        return _cholesky(Ms.T.reshape(B, m, m)), q.T
    M = (ip.C * phi_inv[:, None, :]) @ ip.C.T
    M.diagonal(dim1=-2, dim2=-1)[:, m_eq:] += extra
    q = M.diagonal(dim1=-2, dim2=-1).clamp_min(1e-300).sqrt()
    Ms = M / (q[:, :, None] * q[:, None, :])
    Ms.diagonal(dim1=-2, dim2=-1).add_(JITTER)
    return _cholesky(Ms), q


def _factor_solve(ip: InteriorPointProblem, F, r):
    """``M^{-1} r`` for ``r (B, m)`` with ``F = (L, q)`` from :func:`_normal_factor`."""
    L, q = F
    if L.dim() == 2:  # the level-scheduled factor, batch last
        return ip.sparse[0].solve(L, (r / q).T).T / q
    return torch.cholesky_solve((r / q).unsqueeze(-1), L).squeeze(-1) / q


def _direction(ip, lay: _Layout, T, F, phi_inv, ratio, rd, rp, rc):
    """The Newton direction ``dT`` (laid out as T) for the complementarity targets ``rc (B, P)`` (the
    right-hand sides of S dY + Y dS = rc, pair by pair), with the factor F of the normal matrix and
    ``ratio = [s / y, zl / sl, zu / su]`` (the same for predictor and corrector)."""
    N, m_eq, mi = lay.N, lay.m_eq, lay.mi
    rcb = rc[:, mi:] / T[:, lay.o_s + mi :]
    r1 = rcb[:, :N] - rcb[:, N:] - rd
    rows = -rp
    if mi:
        rcy = rc[:, :mi] / T[:, lay.o_y : lay.o_y + mi]
        rows[:, m_eq:] -= rcy
    u = phi_inv * r1
    rhs = u @ ip.C.T - rows
    dnu = _factor_solve(ip, F, rhs)
    dv = u - phi_inv * (dnu @ ip.C)
    dSb = (dv.unsqueeze(1) * lay.sign2).view(dv.shape[0], 2 * N)
    dYb = rcb - ratio[:, mi:] * dSb
    if mi:
        ds = rcy - ratio[:, :mi] * dnu[:, m_eq:]
        return torch.cat([dv, dnu, dYb, ds, dSb], dim=1)
    return torch.cat([dv, dnu, dYb, dSb], dim=1)


@dataclass
class _Primal:
    """The primal reduction's fixed tensors (see :func:`primal_structure`):

    * ``chol`` the symbolic factorization of H's pattern; ``Kt (nnz, mi)`` with H's entries batch
      last as ``Kt @ (y / s)^T`` (plus Phi on the diagonal); ``diag (N,)`` where the diagonal lies
      among them; ``r, c`` their rows and columns; ``keep, where`` which of them land where in L;
    * ``G (mi, N)`` the inequality rows;
    * the pattern of ``W = L^-1 P^T A^T``, its entries ``(w_n, w_k)``, and W's forward substitution
      on that pattern: ``w_start (nnz(W), 1)`` the entries of P^T A^T there (the equality rows
      transposed, in the elimination order), ``w_row`` the row of q that divides each, and per level
      of the elimination tree ``w_steps``, the W entries updated, the L entries and the W entries
      that update them;
    * ``pair_a, pair_b``: the pairs of W entries (n, k), (n, l) of one row with k >= l, whose
      products add to S's flat entry ``pair_target`` in its lower triangle;
    * the estimated work of one factorization with both reductions (``cost``, ``normal_cost``,
      multiply-adds per element)."""

    chol: Any
    Kt: torch.Tensor
    diag: torch.Tensor
    r: torch.Tensor
    c: torch.Tensor
    keep: torch.Tensor
    where: torch.Tensor
    G: torch.Tensor
    w_n: torch.Tensor
    w_k: torch.Tensor
    pair_a: torch.Tensor
    pair_b: torch.Tensor
    pair_target: torch.Tensor
    w_start: torch.Tensor
    w_row: torch.Tensor
    w_steps: list
    cost: float
    normal_cost: float


#: The primal reduction is considered where the pattern of H has at most this fraction of N^2 entries,
#: N is at most PRIMAL_MAX_COLUMNS and one factorization of H takes at most PRIMAL_MAX_UPDATES
#: multiply-adds (the symbolic factorization and its schedule are built on the host, in Python, with
#: work proportional to those).
PRIMAL_DENSITY = 0.25
PRIMAL_MAX_COLUMNS = 2000
PRIMAL_MAX_UPDATES = 200_000
#: Iterations taken with the primal reduction; the few elements still iterating after them continue with
#: the normal matrix.  Measured: at |z| of 30 to 1000 a few elements of the K4 and K5 flows stalled with the
#: primal reduction (200 iterations, then the conic fallback) where the normal matrix converges them in
#: 16-70 (H cancels digits on the active rows, where y / s is of order 1 / mu).
PRIMAL_ITERATIONS = 20


def primal_structure(C: torch.Tensor, m_eq: int) -> _Primal | None:
    """The primal reduction's tensors for the rows ``C (m, N)`` (equality rows first), or None where there
    is no inequality row or H = Phi + G^T diag(y / s) G is too dense to be worth a sparse factorization
    (see PRIMAL_DENSITY, PRIMAL_MAX_COLUMNS)."""
    m, N = C.shape
    mi = m - m_eq
    if mi == 0 or N < sparse_cholesky.MIN_ROWS or N > PRIMAL_MAX_COLUMNS:
        return None
    G = C[m_eq:]
    touch = (G != 0).to(C.dtype)
    nz = ((touch.T @ touch) > 0) | torch.eye(N, dtype=torch.bool, device=C.device)
    r, c = nz.nonzero(as_tuple=True)
    if r.numel() > PRIMAL_DENSITY * N * N:
        return None
    _, _, updates = sparse_cholesky.symbolic_cost(nz)
    if updates > PRIMAL_MAX_UPDATES:
        return None
    chol = sparse_cholesky.SparseCholesky(nz)
    diag = _diagonal_positions(r, c, N)
    keep, where = chol.lower_positions(r, c)
    # W's pattern: A^T's, filled by the forward substitution (row i of W gets row j's pattern where L_ij != 0)
    At = C[:m_eq].T.index_select(0, chol.perm.to(C.device))
    pattern = (At != 0).cpu().numpy().copy()
    for step in chol.schedule:
        for i, j in zip(step["entry_rows"].tolist(), step["entry_cols"].tolist()):
            pattern[i] |= pattern[j]
    w_n, w_k = np.nonzero(pattern)
    w_steps = _pattern_substitution(chol, w_n, w_k, C.device)
    rows = [np.nonzero(w_n == n)[0] for n in range(N)]
    # the pairs of entries (n, k), (n, l) of one row with k >= l: S's lower triangle, all its Cholesky reads
    lower = [np.tril_indices(e.size) for e in rows]
    pair_a = np.concatenate([e[i] for e, (i, _) in zip(rows, lower)]).astype(np.int64)
    pair_b = np.concatenate([e[j] for e, (_, j) in zip(rows, lower)]).astype(np.int64)
    # work per element: the factorization (sum over columns of |struct|^2 / 2), H's assembly, the
    # forward substitution of the m_eq columns of A^T, S = W^T D^-1 W on W's pattern and its Cholesky;
    # against the normal matrix's assembly (m^2 N / 2) and dense Cholesky (m^3 / 6)
    cost = updates + r.numel() * mi / N + chol.nnz * m_eq + pair_a.size + m_eq**3 / 6
    normal_cost = m * m * N / 2 + m**3 / 6
    index = [
        torch.as_tensor(v, dtype=torch.long, device=C.device)
        for v in (w_n, w_k, pair_a, pair_b, w_k[pair_a] * m_eq + w_k[pair_b])
    ]
    return _Primal(
        chol.on(C.device),
        (G[:, r] * G[:, c]).T.contiguous(),
        diag,
        r,
        c,
        keep.to(C.device),
        where.to(C.device),
        G.contiguous(),
        index[0],
        index[1],
        index[2],
        index[3],
        index[4],
        At[index[0], index[1]].unsqueeze(1).contiguous(),
        chol.perm.to(C.device)[index[0]],
        w_steps,
        float(cost),
        float(normal_cost),
    )


def _pattern_substitution(chol, w_n: np.ndarray, w_k: np.ndarray, device) -> list:
    """The forward substitution ``W <- L^-1 W`` restricted to W's entries ``(w_n, w_k)`` (a pattern closed
    under the substitution's fill): per level of ``chol``'s schedule, ``(target, l, source)`` such that
    ``W[target] -= L[l] * W[source]`` entry by entry, with L entry (i, j) of the level and the W entries
    (i, k) and (j, k).  Columns of one level do not depend on each other (an L entry (i, j) has i above
    j in the elimination tree), so one gather-multiply-scatter per level suffices."""
    entry = {(int(n), int(k)): e for e, (n, k) in enumerate(zip(w_n, w_k))}
    by_row: dict = {}
    for n, k in zip(w_n.tolist(), w_k.tolist()):
        by_row.setdefault(n, []).append(k)
    steps = []
    for step in chol.schedule:
        target, lpos, source = [], [], []
        for l, i, j in zip(step["entries"].tolist(), step["entry_rows"].tolist(), step["entry_cols"].tolist()):
            for k in by_row.get(j, ()):
                target.append(entry[(i, k)])
                lpos.append(l)
                source.append(entry[(j, k)])
        if target:
            steps.append(tuple(torch.as_tensor(v, dtype=torch.long, device=device) for v in (target, lpos, source)))
    return steps


def _primal_reduction(C: torch.Tensor, m_eq: int, nx: int, kind, normal_sparse: bool) -> _Primal | None:
    """The primal reduction where it is expected to win (the rule of the module's "Factorization"
    paragraph), else None."""
    N = C.shape[1]
    if normal_sparse or (N == nx and kind == "euclidean"):
        # M already factored by levels; or the polish, whose states hold slacks at exactly 0 (y / s infinite)
        return None
    primal = primal_structure(C, m_eq)
    if primal is None or not sparse_cholesky.worth_it(primal.chol) or primal.cost >= primal.normal_cost:
        return None
    return primal


def _primal_factor(ip: InteriorPointProblem, ratio_in, phi_inv):
    """The primal reduction's factors: H = Phi + G^T diag(y / s) G (``ratio_in = s / y``) factored by
    levels after symmetric diagonal equilibration, ``H ~ diag(q) P L D L^T P^T diag(q)``, then ``W =
    L^-1 P^T diag(q)^-1 A^T`` and the equality Schur complement ``S = A H^-1 A^T = W^T D^-1 W``, also
    equilibrated (``S ~ diag(qs) Ls Ls^T diag(qs)``).  Returns ``(F, q (N, B), W (nnz(W), B), Ls, qs)``,
    the tensors batch last where the level-scheduled factorization reads them, W on its pattern."""
    pr = ip.primal
    assert pr is not None
    B, m_eq = phi_inv.shape[0], ip.m_eq
    chol = pr.chol
    V = pr.Kt @ ratio_in.clamp_min(TINY).reciprocal().T
    V[pr.diag] += phi_inv.reciprocal().T
    F, q = _equilibrated_levels(V, pr.diag, pr.r, pr.c, chol, pr.keep, pr.where)
    if not m_eq:
        return F, q, None, None, None
    # W = L^-1 P^T diag(q)^-1 A^T on its pattern (entries batch last): a dense forward substitution of the
    # m_eq columns gathered (N, B, m_eq) blocks and cost 0.7 of the 1.8 ms of one factorization on K4
    L = F[: chol.nnz]
    W = pr.w_start / q.index_select(0, pr.w_row)
    for target, lpos, source in pr.w_steps:
        W.index_add_(0, target, L.index_select(0, lpos) * W.index_select(0, source), alpha=-1.0)
    # S's lower triangle on W's pattern, products of entries of one row scaled by D^-1/2 (measured on K4:
    # 186 pairs against 4,200 products for a dense W, and a batched matrix product cost 0.4 ms per
    # factorization at batch 256); the Cholesky factorization reads the lower triangle only
    Wd = W * chol.inverse_pivot(F, q).sqrt().index_select(0, pr.w_n)
    products = Wd.index_select(0, pr.pair_a) * Wd.index_select(0, pr.pair_b)
    S = W.new_zeros(m_eq * m_eq, B).index_add_(0, pr.pair_target, products).T.reshape(B, m_eq, m_eq)
    qs = S.diagonal(dim1=-2, dim2=-1).clamp_min(1e-300).sqrt()
    S = S / (qs[:, :, None] * qs[:, None, :])
    S.diagonal(dim1=-2, dim2=-1).add_(JITTER)
    return F, q, W, _cholesky(S), qs


def _primal_solve(ip: InteriorPointProblem, factors, r, rows_eq=None):
    """``(dv, dlambda)`` solving ``H dv + A^T dlambda = r (B, N)``, ``A dv = rows_eq (B, m_eq)`` (0 where
    None) with :func:`_primal_factor`'s factors: one forward and one backward substitution."""
    F, q, W, Ls, qs = factors
    pr = ip.primal
    assert pr is not None
    chol = pr.chol
    perm = chol.perm
    y = chol.forward(F, (r.T / q).index_select(0, perm))
    d = chol.inverse_pivot(F, y)
    dlam = None
    if W is not None:
        rhs = W.new_zeros(qs.shape[1], y.shape[1]).index_add_(0, pr.w_k, W * (y * d).index_select(0, pr.w_n)).T
        if rows_eq is not None:
            rhs = rhs - rows_eq
        dlam = torch.cholesky_solve((rhs / qs).unsqueeze(-1), Ls).squeeze(-1) / qs
        y.index_add_(0, pr.w_n, W * dlam.T.index_select(0, pr.w_k), alpha=-1.0)
    y = chol.backward(F, y * d)
    x = torch.empty_like(y)
    x[perm] = y
    return (x / q).T, dlam


#: Steps of iterative refinement of the backward's solve by the primal reduction, and the relative size of
#: the last correction above which an element's solve is redone with the normal matrix.
REFINE_STEPS = 4
REFINE_TOLERANCE = 1e-9


def _primal_backward(ip: InteriorPointProblem, factor, phi_inv, g):
    """The backward's ``(H^-1 - H^-1 A^T S^-1 A H^-1) [g; 0]`` on x (``g (B, nx)``), by the primal reduction
    with iterative refinement on the unreduced system

        Phi u + A^T lambda + G^T y = [g; 0],   A u = 0,   G u - (s / y) y = 0

    (residuals in (u, lambda, y), corrections by :func:`_primal_solve`).  Without it, H's entries y / s of
    order 1 / mu on the active rows lose about log10(1 / mu) digits of the other terms to cancellation
    (measured: a vector-Jacobian product 2e-2 off on a path of 30, where the normal matrix's is within
    1e-6 of finite differences).  An element whose last correction stays above REFINE_TOLERANCE (relative)
    is solved again with the normal matrix M."""
    *F, ratio = factor
    pr = ip.primal
    assert pr is not None
    N, nx = phi_inv.shape[1], ip.nx
    A = ip.C[: ip.m_eq]
    D = ratio.clamp_min(TINY).reciprocal()
    rhs = torch.nn.functional.pad(g, (0, N - nx))
    u, lam = _primal_solve(ip, F, rhs)
    y = D * (u @ pr.G.T)
    du = u
    for _ in range(REFINE_STEPS):
        r1 = rhs - u / phi_inv - y @ pr.G
        if lam is not None:
            r1 -= lam @ A
        r3 = ratio * y - u @ pr.G.T
        du, dlam = _primal_solve(ip, F, r1 + (D * r3) @ pr.G, -(u @ A.T) if lam is not None else None)
        u = u + du
        y = y + D * (du @ pr.G.T - r3)
        if lam is not None:
            lam = lam + dlam
    bad = ~(du.abs().amax(-1) <= REFINE_TOLERANCE * u.abs().amax(-1).clamp_min(1e-300))
    if bool(bad.any()):
        # y / s so large that the refinement does not contract (measured, of 256 elements of the K4 flows:
        # none at |z| about 1, 77 at |z| about 30, 145 with the Euclidean regularizer at |z| about 3)
        b = bad.nonzero().squeeze(1)
        L, q = _normal_factor(ip, ratio[b], phi_inv[b])
        ub = phi_inv[b] * rhs[b]
        t = _factor_solve(ip, (L, q), ub @ ip.C.T)
        u[b] = ub - phi_inv[b] * (t @ ip.C)
    return u[:, :nx]


def _direction_primal(ip, lay: _Layout, T, F, phi_inv, ratio, rd, rp, rc):
    """:func:`_direction` by the primal reduction: with D = y / s on the inequality rows, the rows'
    equations G dv - (s / y) dy = rows_in give dy = D (G dv - rows_in), so that (Phi + G^T D G) dv +
    A^T dlambda = r1 + G^T D rows_in and A dv = rows_eq (``F`` from :func:`_primal_factor`)."""
    N, m_eq, mi = lay.N, lay.m_eq, lay.mi
    rcb = rc[:, mi:] / T[:, lay.o_s + mi :]
    r1 = rcb[:, :N] - rcb[:, N:] - rd
    rcy = rc[:, :mi] / T[:, lay.o_y : lay.o_y + mi]
    rows_in = -rp[:, m_eq:] - rcy
    D = ratio[:, :mi].reciprocal()
    r1 = r1 + (D * rows_in) @ ip.primal.G
    dv, dlam = _primal_solve(ip, F, r1, -rp[:, :m_eq] if m_eq else None)
    dy = D * (dv @ ip.primal.G.T - rows_in)
    dSb = (dv.unsqueeze(1) * lay.sign2).reshape(dv.shape[0], 2 * N)
    dYb = rcb - ratio[:, mi:] * dSb
    ds = rcy - ratio[:, :mi] * dy
    parts = [dv, dlam, dy, dYb, ds, dSb] if m_eq else [dv, dy, dYb, ds, dSb]
    return torch.cat(parts, dim=1)


def _max_step(lay: _Layout, T, dT, fraction: float | torch.Tensor = FRACTION):
    """``fraction`` (a number or ``(B, 1)``) times the largest alpha keeping every slack and multiplier
    positive, at most 1, (B, 1)."""
    if not lay.pairs:
        return T.new_ones(T.shape[0], 1)
    # alpha = 1 / max(-dpos / pos): arithmetic only (a comparison and a masked fill cost several times
    # more on these small tensors); an absent pair has pos = dpos = 0 and gets pos = 1 from `pad`
    worst = (dT[:, lay.o_y :] / (T[:, lay.o_y :] + lay.pad)).amin(-1, keepdim=True).neg_().clamp_min_(1e-300)
    return (fraction / worst).clamp_(max=1.0)


def _polish(ip: InteriorPointProblem, lay: _Layout, T, zs, sz, rounds: int = 1, max_wrong=math.inf):
    """Active-set polish of the elements ``T (B, width)`` for the Euclidean regularizer: guess the
    active pairs (a slack below its multiplier), hold them at equality (the bound's value, the row's
    right-hand side), drop the others, and solve the remaining equality-constrained quadratic program
    exactly (one Newton step on (x, nu)).  Where the
    solution breaks a sign condition (a held pair's multiplier or a dropped pair's slack below
    -TOLERANCE), the offending pairs change sides and that element is solved again, up to ``rounds``
    more times (a primal-dual active-set step), unless the first solve broke more than ``max_wrong``
    sign conditions per element on average.  Returns ``(T', g', h', accepted (B,))``: the
    polished state, laid out as T, with the vanishing member of every pair at 0 (a slack) or ``TINY``
    (a multiplier), so that the backward reads the active set from it; its derivatives; and which
    elements are solved: sign conditions met, held rows met and the dual residual on the free
    coordinates below the tolerances, complementarity exact -- so that the caller's convergence test
    passes on them.  Only for declarations without auxiliary variables (f is then strictly convex on
    every free coordinate)."""
    held = (T[:, lay.o_s :] < T[:, lay.o_y : lay.o_s]) & lay.exists
    Tn, g, h, wrong, solved = _polish_once(ip, lay, T, zs, sz, held)
    if rounds and wrong.sum(-1).float().mean() > max_wrong:
        # far from the final active set: it would change by a fraction per round, and the rounds
        # would cost more than the interior-point iterations they replace
        rounds = 0
    for _ in range(rounds):
        again = wrong.any(-1).nonzero().squeeze(1)
        if not again.numel():
            break
        held[again] ^= wrong[again]
        Tn[again], g[again], h[again], wrong[again], solved[again] = _polish_once(
            ip, lay, T[again], zs[again], sz[again], held[again]
        )
    return Tn, g, h, ~wrong.any(-1) & solved


def _polish_once(ip: InteriorPointProblem, lay: _Layout, T, zs, sz, held):
    """One solve of :func:`_polish` with the pairs ``held (B, P)`` at equality: ``(T', g', h', wrong
    (B, P), solved (B,))``, wrong marking the pairs whose sign condition fails, solved whether the
    held rows are met to TOLERANCE times the form's scale and the dual residual on the free
    coordinates is below TOLERANCE (rounding only, for this exact solve).  In the scaled problem
    f' = x / sz and f'' = 1 / sz.  Masks are applied as float factors: fewer and cheaper operations
    than ``torch.where`` on these small tensors."""
    N, m, m_eq, mi = lay.N, lay.m, lay.m_eq, lay.mi
    scale = ip.dual.scale
    on = held.to(T.dtype)
    off = 1.0 - on
    rows, at_lo, at_up = on[:, :mi], on[:, mi : mi + N], on[:, mi + N :]
    free = 1.0 - at_lo - at_up
    v = T[:, :N] * free + at_lo * ip.lo + at_up * ip.up
    nu = T[:, N : N + m].clone()
    nu[:, m_eq:] *= rows
    # a dropped row leaves the system through a huge diagonal weight (equilibration makes it harmless)
    extra = off[:, :mi] * HUGE
    phi_inv = free * sz
    rd = v / sz - zs + nu @ ip.C
    rp = v @ ip.C.T - ip.d
    rp[:, m_eq:] *= rows
    dnu = _factor_solve(ip, _normal_factor(ip, extra, phi_inv), rp - (phi_inv * rd) @ ip.C.T)
    dnu[:, m_eq:] *= rows
    nu += dnu
    v = v - phi_inv * (rd + dnu @ ip.C)
    g, h = v / sz, torch.ones_like(v) / sz
    r = g - zs + nu @ ip.C
    rp = v @ ip.C.T - ip.d
    # every pair's multiplier if held and slack if dropped, laid out as the pairs [rows | lower | upper]
    multiplier = torch.cat([nu[:, m_eq:], r, -r], 1)
    slack = torch.cat([-rp[:, m_eq:], v, -v], 1) * lay.mask + lay.slack_offset
    wrong = ((on * multiplier + off * slack / scale) < -TOLERANCE) & lay.exists
    rp[:, m_eq:] *= rows
    solved = (rp.abs().amax(-1) <= TOLERANCE * scale) if m else torch.ones_like(sz[:, 0], dtype=torch.bool)
    if N:
        solved &= (r.abs() * free).amax(-1) <= TOLERANCE
    Y = (on * multiplier).clamp_min_(TINY) * lay.mask
    Tn = torch.cat([v, nu[:, :m_eq], Y, (off * slack).clamp_min_(0.0)], 1)
    return Tn, g, h, wrong, solved


def _box_guess(ip: InteriorPointProblem, lay: _Layout, z):
    """A state whose active set (for :func:`_polish`) is that of the box alone: x = z clamped to its
    bounds (the Euclidean solution without the rows), the bounds z leaves and the rows that x
    violates held."""
    x = torch.where(ip.has_lo > 0, torch.maximum(z, ip.lo), z)
    x = torch.where(ip.has_up > 0, torch.minimum(x, ip.up), x)
    G = ip.C[lay.m_eq :]
    rows = (x @ G.T > ip.d[lay.m_eq :]).to(z.dtype)
    # a column of a held row is left free (holding its bound too would over-determine the row)
    touched = (rows @ (G != 0).to(z.dtype)) > 0
    slack = torch.cat([z, -z], 1) * lay.mask[lay.mi :] + lay.slack_offset[lay.mi :]
    bounds = ((slack < 0) & ~touched.repeat(1, 2)).to(z.dtype)
    held = torch.cat([rows, bounds], 1)
    nu = z.new_zeros(z.shape[0], lay.m_eq)
    return torch.cat([x, nu, held, 1.0 - held], 1)


def _polishes(ip: InteriorPointProblem) -> bool:
    """Whether the solver polishes (and starts with the active-set method): the Euclidean regularizer
    only, whose reduced problem is linear.  Measured (docs/generic.md): with a nonlinear f, Newton
    steps in x from an iterate whose small
    coordinates are not yet resolved overshoot past an end of f's domain where phi'' is infinite
    (the entropies, the Tsallis entropies), and damped steps need more factorizations than the
    interior-point iterations they save (the binary entropy on 1,000 variables with 100 rows: 1.8
    s against 0.96 s); the polish gained 12% at most on the paths and cost 1.4-3.8x on a user's
    phi."""
    return ip.kind == "euclidean"


def _residuals(ip: InteriorPointProblem, lay: _Layout, T, g, zs):
    """The residuals of T: ``(rd (B, N), rp (B, m), SY (B, P), mu (B,))``, the dual and primal residuals,
    the complementarity products and their mean."""
    N, m, m_eq, mi, nx = lay.N, lay.m, lay.m_eq, lay.mi, lay.nx
    o_y, o_s = lay.o_y, lay.o_s
    S, Y = T[:, o_s:], T[:, o_y:o_s]
    rd = T[:, N : N + m] @ ip.C
    rd -= T[:, o_y + mi : o_y + mi + N]
    rd += T[:, o_y + mi + N : o_s]
    rd[:, :nx] += g - zs
    rp = T[:, :N] @ ip.C.T - ip.d
    if mi:
        rp[:, m_eq:] += S[:, :mi]
    SY = S * Y
    return rd, rp, SY, SY.sum(-1) / ip.pairs


def _converged(ip: InteriorPointProblem, lay: _Layout, T, h, rd, rp, SY, mu):
    """The convergence test on :func:`_residuals`' output: ``(done (B,), res (B,))``, whether the element
    meets every tolerance (primal, dual up to the resolution of floats at x, the largest product),
    and its largest scaled residual."""
    scale, nx = ip.dual.scale, lay.nx
    p = rp.abs().amax(-1) if lay.m else mu.new_zeros(mu.shape)
    a = rd.abs()
    ax = a[:, :nx]
    ax.masked_fill_(ax <= 4 * torch.finfo(T.dtype).eps * h * T[:, :nx].abs().clamp_min(1.0), 0.0)
    dd = a.amax(-1) if lay.N else mu.new_zeros(mu.shape)
    res = torch.maximum(p / scale, torch.maximum(dd, mu / scale))
    top = SY.amax(-1) if lay.pairs else mu
    done = (p <= TOLERANCE * scale) & (dd <= TOLERANCE) & (top <= MU_TOLERANCE * scale)
    return done, res


def solve(ip: InteriorPointProblem, Z: torch.Tensor, max_iter: int = MAX_ITER) -> InteriorPointSolution:
    """Solve the relaxed problem for every row of ``Z (B, n)`` (any device); see the module."""
    prob = ip.dual
    dt = torch.float64
    B = Z.shape[0]
    dev = Z.device
    lay = ip.layout
    m, m_eq, N, nx, mi = ip.m, ip.m_eq, ip.C.shape[1], ip.nx, lay.mi
    o_y, o_s = lay.o_y, lay.o_s
    z = Z.to(dt)[:, prob.x_free]
    sz = (z.abs().amax(-1, keepdim=True) if nx else z.new_zeros(B, 1)).clamp_min(1.0)
    scale = prob.scale
    s0 = (ip.d[m_eq:] - ip.v0 @ ip.C[m_eq:].T).clamp_min(1.0)
    sl = torch.where(ip.has_lo > 0, ip.v0 - ip.lo, torch.ones_like(ip.v0))
    su = torch.where(ip.has_up > 0, ip.up - ip.v0, torch.ones_like(ip.v0))
    start = torch.cat([ip.v0, ip.v0.new_zeros(m_eq), torch.ones_like(s0), ip.has_lo, ip.has_up, s0, sl, su])
    T = start.expand(B, lay.width).clone()
    zs = z / sz
    g, h = _scaled_derivatives(ip, lay, T, sz)
    status = torch.full((B,), STATUS_MAX_ITER, dtype=torch.long, device=dev)
    iterations = torch.zeros(B, dtype=torch.long, device=dev)
    tries = torch.zeros(B, dtype=torch.long, device=dev)  # polish attempts per active element
    residual = torch.full((B,), math.inf, dtype=dt, device=dev)
    nc = ip.pairs
    index = None  # the indices of the active elements, None while all are active
    T_all = T
    polish = N == nx and _polishes(ip)
    if polish and START_ROUNDS >= 0:
        # the quadratic case: an active-set method from the box's solution ends most elements before the
        # interior point starts (those it does not solve start it from the usual point)
        Tn, gn, hn, ok = _polish(ip, lay, _box_guess(ip, lay, z), zs, sz, START_ROUNDS, START_MAX_WRONG)
        T[ok], g[ok], h[ok] = Tn[ok], gn[ok], hn[ok]
    for _ in range(max_iter + 1):
        if polish and _:
            # elements near their solution: try the active-set polish, keep what passes the test below
            near = ((T[:, o_s:] * T[:, o_y:o_s]).amax(-1) <= POLISH_START * scale) & (tries < POLISH_TRIES)
            near = near.nonzero().squeeze(1)
            if near.numel():
                tries[near] += 1
                Tn, gn, hn, ok = _polish(ip, lay, T[near], zs[near], sz[near], POLISH_ROUNDS)
                if bool(ok.any()):
                    near = near[ok]
                    T[near], g[near], h[near] = Tn[ok], gn[ok], hn[ok]
        rd, rp, SY, mu = _residuals(ip, lay, T, g, zs)
        S, Y = T[:, o_s:], T[:, o_y:o_s]
        last = _ == max_iter
        # the full test only once some element's largest complementarity product (or a NaN) lets it pass:
        # about 20 operations saved in most iterations
        if lay.pairs and not last and not bool((~(SY.amax(-1) > MU_TOLERANCE * scale)).any()):
            stop = None
        else:
            done, res = _converged(ip, lay, T, h, rd, rp, SY, mu)
            finite = torch.isfinite(res)
            stop = done | ~finite
        if stop is not None and (bool(stop.any()) or last):
            sub_status = torch.where(done, STATUS_CONVERGED, torch.where(finite, STATUS_MAX_ITER, STATUS_NOT_FINITE))
            if index is None:
                status, residual = sub_status, res
                T_all = T
            else:
                status[index], residual[index] = sub_status, res
                T_all[index] = T
            if last:
                break
            keep = ~stop
            index = keep.nonzero().squeeze(1) if index is None else index[keep]
            if index.numel() == 0:
                break
            T, g, h, zs, sz, tries = T[keep], g[keep], h[keep], zs[keep], sz[keep], tries[keep]
            S, Y, rd, rp, SY, mu = T[:, o_s:], T[:, o_y:o_s], rd[keep], rp[keep], SY[keep], mu[keep]
        if index is None:
            iterations += 1
        else:
            iterations[index] += 1
        # proximal weight on w: mu for the first PROXIMAL_DELAY iterations, then at least PROXIMAL
        prox = mu[:, None] if _ < PROXIMAL_DELAY else mu[:, None].clamp(min=PROXIMAL)
        phi_inv, ratio = _phi_inverse(lay, T, h, prox)
        if ip.primal is not None and _ < PRIMAL_ITERATIONS:
            F, direction = _primal_factor(ip, ratio[:, :mi], phi_inv), _direction_primal
        else:
            F, direction = _normal_factor(ip, ratio[:, :mi], phi_inv), _direction
        # predictor (affine scaling)
        d_aff = direction(ip, lay, T, F, phi_inv, ratio, rd, rp, -SY)
        a_aff = _max_step(lay, T, d_aff)
        dY, dS = d_aff[:, o_y:o_s], d_aff[:, o_s:]
        mu_aff = (torch.addcmul(S, a_aff, dS) * torch.addcmul(Y, a_aff, dY)).sum(-1) / nc
        sigma = (mu_aff / mu.clamp_min(1e-300)).clamp(0.0, 1.0) ** 3
        # never aim below a tenth of the final complementarity: a collapse of mu before the rows are
        # satisfied leaves a singular normal matrix
        target = torch.clamp(sigma * mu, min=0.1 * MU_TOLERANCE * scale)[:, None]
        # corrector: centering and the second-order term of the predictor
        rc = (target - SY - dS * dY) * lay.mask
        dT = direction(ip, lay, T, F, phi_inv, ratio, rd, rp, rc)
        # the fraction to the boundary tends to 1 with mu (FRACTION at least, 1 - FRACTION_GAP at most): a
        # fixed fraction caps the decrease of mu at 1 / (1 - FRACTION) per step in the last iterations
        fraction = (1.0 - mu[:, None]).clamp_(min=FRACTION, max=1.0 - FRACTION_GAP)
        T = torch.addcmul(T, _max_step(lay, T, dT, fraction), dT)
        g, h = _scaled_derivatives(ip, lay, T, sz)
    T = T_all
    sz_all = (z.abs().amax(-1, keepdim=True) if nx else z.new_zeros(B, 1)).clamp_min(1.0)
    # the factor of the Newton system and Phi at the returned point, for the backward
    g, h = _scaled_derivatives(ip, lay, T, sz_all)
    phi_inv, ratio = _phi_inverse(lay, T, h, BACKWARD_PROXIMAL)
    primal_factor = None
    if ip.primal is not None:
        primal_factor = _primal_factor(ip, ratio[:, :mi], phi_inv) + (ratio[:, :mi],)
        L = q = phi_inv.new_zeros(0)
    elif m:
        L, q = _normal_factor(ip, ratio[:, :mi], phi_inv)
    else:
        L, q = phi_inv.new_zeros(B, 0, 0), phi_inv.new_ones(B, 0)
    if prob.Cw.shape[1]:
        width = prob.wu - prob.wl
        sl, su = T[:, o_s + mi + nx : o_s + mi + N], T[:, o_s + mi + N + nx :]
        near = ((sl <= 1e-6 * width) & prob.w_art_lo) | ((su <= 1e-6 * width) & prob.w_art_hi)
        status = torch.where((status == STATUS_CONVERGED) & near.any(-1), STATUS_AUX_BOX, status)
    x = prob.x_fixed_value.to(dt).expand(B, -1).clone()
    x[:, prob.x_free] = T[:, :nx]
    return InteriorPointSolution(x, status, iterations, residual, L, q, phi_inv, sz_all, primal_factor)


def _scaled_derivatives(ip, lay: _Layout, T, sz):
    Sb = T[:, lay.o_s + lay.mi :]
    g, h = _derivatives(ip, T[:, : ip.nx], Sb[:, : lay.N], Sb[:, lay.N :])
    return g / sz, h / sz


class _Backward(torch.autograd.Function):
    """X = the interior-point solution of Z; the VJP g -> (Phi^-1 g - Phi^-1 C^T M^-1 C Phi^-1 g)_x / sz."""

    @staticmethod
    def forward(ctx, Z, X, ip, chol, q, phi_inv, sz, *primal_factor):
        ctx.save_for_backward(chol, q, phi_inv, sz, *primal_factor)
        ctx.ip = ip
        return X.clone()

    @staticmethod
    def backward(ctx, G):
        refuse_double_backward("the fast generic path")
        chol, q, phi_inv, sz, *primal_factor = ctx.saved_tensors
        ip = ctx.ip
        prob = ip.dual
        g = G.to(torch.float64)[:, prob.x_free]
        if primal_factor:
            u = _primal_backward(ip, primal_factor, phi_inv, g)
        else:
            u = phi_inv[:, : ip.nx] * g
        if ip.m and not primal_factor:
            r = u @ ip.C[:, : ip.nx].T
            t = _factor_solve(ip, (chol, q), r)
            u = u - phi_inv[:, : ip.nx] * (t @ ip.C[:, : ip.nx])
        grad = torch.zeros(G.shape, dtype=torch.float64, device=G.device)
        grad[:, prob.x_free] = u / sz
        return (grad.to(G.dtype), None, None, None, None, None, None) + (None,) * len(primal_factor)


class InteriorPointRelaxation(FastRelaxation):
    """X_tau = argmax_{x in P} <Z, x> - f(x) by the batched interior-point method of this module, for the
    built-in ``entropy``, ``binary_entropy``, ``euclidean`` and any ``Regularizer.separable`` on a linear
    declaration; differentiable (exact implicit backward).

    Same interface and failure contract as :class:`~sstcvx.generic.dual_newton.FastRelaxation`:
    ``Z (B, *event_shape)`` on any device -> X of the same shape, dtype and device; an element that
    does not converge is re-solved through cvxpylayers with a ``RuntimeWarning`` (a
    :class:`~sstcvx.SolverError` names one that fails there too); ``max_iter`` caps the iterations.
    """

    method = "interior_point"

    def __init__(self, P, regularizer, max_iter: int = MAX_ITER):
        super().__init__(P, regularizer, max_iter)
        self.ip = build_interior_point_problem(self.problem, self.kind)
        self._ip_on_device: dict = {}

    def problem_on(self, device) -> InteriorPointProblem:  # type: ignore[override]
        key = str(device)
        ip = self._ip_on_device.get(key)
        if ip is None:
            dual = self.problem.to(device)
            ip = self._ip_on_device[key] = build_interior_point_problem(dual, self.kind)
        return ip

    def solve(self, Z: torch.Tensor, max_iter: int | None = None) -> InteriorPointSolution:  # type: ignore[override]
        """The raw batched solution of ``Z (B, *event_shape)`` (no fallback, no autograd)."""
        ip = self.problem_on(Z.device)
        return solve(ip, Z.detach().reshape(Z.shape[0], -1), max_iter or self.max_iter)

    def __call__(self, Z: torch.Tensor, solver_args: dict | None = None, max_iter: int | None = None) -> torch.Tensor:
        B = Z.shape[0]
        sol = self.solve(Z, max_iter)
        X = sol.x
        if torch.is_grad_enabled() and Z.requires_grad:
            X = _Backward.apply(
                Z.reshape(B, -1),
                X,
                self.problem_on(Z.device),
                sol.chol,
                sol.q,
                sol.phi_inv,
                sol.sz,
                *(sol.primal_factor or ()),
            )
        X = X.to(Z.dtype).reshape(Z.shape)
        failed = (sol.status != STATUS_CONVERGED).nonzero().flatten().tolist()
        if failed:
            X = self._fallback(Z, X, sol, failed, solver_args)
        return X
