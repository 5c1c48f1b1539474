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

with the objective divided by ``sz = max(1, max|z|)`` (multipliers of order one for every tau and
|U|).  One iteration is :func:`_step`: with Phi = f''(x) (0 on w) + zl / (v - l) + zu / (u - v)
(:func:`_phi_inverse`), each Newton system reduces to the m x m normal matrix
``M = C Phi^{-1} C^T + diag(0, s / y)`` (m = the number of rows), factored once per iteration and
used for both the predictor (affine) and the corrector direction (:func:`_direction`); the
centering weight is (mu_aff / mu)^3, its target never below a tenth of the final complementarity;
one step length for all variables (:func:`_max_step`), a fraction max(0.995, 1 - mu) of the
largest that keeps every slack and multiplier positive (fraction to the boundary: a fixed 0.995
would cap the decrease of mu at 200-fold per step in the last iterations), and no line search (a
residual line search slows the entropies down: their dual residual at coordinates bound for 0
does not decrease monotonically).  The auxiliary variables get a proximal term (centered at the
current iterate: it damps the steps in directions where the flows of an extended formulation are
not unique, without moving the solution) of weight mu, the current mean complementarity, for the
first ``PROXIMAL_DELAY`` iterations, then at least ``PROXIMAL`` (a fixed weight slows the flows
down at |z| about 1; without the floor a few elements at |z| about 30 stall).  phi' and phi'' are
evaluated once per iteration, at the new point, for the whole batch (:func:`_derivatives`): a
user's separable regularizer costs one evaluation of its derivatives (given, or by autograd) per
iteration, not an inner iteration (unlike the dual method of :mod:`~sstcvx.generic.dual_newton`,
which needs the inverse of phi'); on the compiled CPU kernel, where a table of phi' serves (below),
typically one per solve.

Start (:func:`_plain_start`): v at the middle of each finite interval (one unit inside a
half-line), the rows' slacks max(1, h - G v), the bounds' slacks v - l and u - v, multipliers
min(1, START_MULTIPLIER sz) per element (START_X_MULTIPLIER times that on the bounds of x).  For
the built-in entropies, elements with sz <= START_CENTRAL_SCALE start from the central state
instead (:func:`_central_start`: the iterate of the problem at z = 0 once its mean
complementarity is below START_CENTRAL_MU, computed once per problem).  The Euclidean case starts
with an active-set method (see Polish).

Why this method and not the dual Newton method of :mod:`~sstcvx.generic.dual_newton`: that one
needs x(nu) in closed form (or by an inner root search for a user phi) and a barrier on the
auxiliary variables that recenters slowly; the primal-dual method treats inequality rows, bounds
and auxiliary variables alike, needs only phi' and phi'', and converges superlinearly (iteration
counts in docs/generic.md).  With equality rows only and a built-in regularizer, the dual method
is faster (fewer Newton steps and no slacks) and stays the default there.

Polish and the Euclidean start: the active-set method of :mod:`~sstcvx.generic.active_set`, tried on
elements whose largest complementarity product is below ``POLISH_START`` times the form's scale
(``POLISH_ROUNDS`` rounds, ``POLISH_TRIES`` attempts per element) and run before the first iteration;
the Euclidean regularizer only (see :func:`_polishes`).

Factorization (:mod:`~sstcvx.generic.normal_matrix`): M is assembled on the sparsity pattern that C
fixes, equilibrated to a unit diagonal (with a relative jitter of 1e-15) and factored by the
level-scheduled sparse Cholesky of :mod:`~sstcvx.generic.sparse_cholesky` where its elimination
tree is shallow (a path's or a chain's rows), by one batched dense Cholesky otherwise.  Where the
rows are inequalities that couple few columns (the capacity rows of a flow formulation), the same
Newton system is reduced the other way instead (:mod:`~sstcvx.generic.primal_reduction`,
:func:`_direction_primal`): the inequality rows go into the primal block
``H = Phi + G^T diag(y / s) G``, factored by levels, and only the equality rows are left, through
their Schur complement; chosen once per problem by its estimated cost, and used for the first
``PRIMAL_ITERATIONS`` iterations (H cancels digits on the active rows; the few elements still
running then continue with M).

Stop test (per element, in the scaled problem, :func:`_converged`): primal residual
``max|C v - d + (0, s)| <= TOLERANCE * scale`` (the form's scale), every coordinate of the dual
residual either below ``TOLERANCE`` or below the resolution of floats at x (phi'' times 4 eps
max(1, |x|): a coordinate that should underflow, as exp(-1e6) for the entropy at tiny tau), and
every complementarity product s y below ``MU_TOLERANCE * scale`` (the largest, not the mean: with
the mean, one nearly active bound whose multiplier vanishes could keep a product as large as the
number of pairs times the tolerance).  The full test runs only in iterations where some element's
mean product (a lower bound of its largest) is below that tolerance, and in the last.  The solution is then within
about 1e-11 of the exact one, and within about 1e-8 on a near-degenerate coordinate (a bound or
row nearly active with a vanishing multiplier, where an interior point can only approach it as
mu / s).  Status per element as in :mod:`~sstcvx.generic.dual_newton`.

Compaction: an element that stops (converged, not finite, or at the last iteration) has its state,
phi'', status, residual and iteration count written into the whole batch's tensors and leaves the
working tensors (one indexing each, by the positions kept); the iteration continues on the others
only.

Backward (exact for the returned point, which solves the KKT conditions with the final mu):
differentiating them,

    dX/dz = (Phi^{-1} - Phi^{-1} C^T M^{-1} C Phi^{-1})_xx / max(1, max|z|),

one batched Cholesky solve per backward pass with M and Phi at the returned point (factored there
once after the iteration, from the phi'' kept when each element stopped).  Auxiliary variables
keep a proximal weight ``BACKWARD_PROXIMAL`` in that Phi: the interior auxiliary variables of a
vertex list or a flow formulation (not unique) have Phi of order mu / w^2 ~ 1e-12 at the returned
point, where the equilibrated M would have a condition number near 1e11 and the products would
lose several digits; the weight biases the derivative by O(weight) (figures in docs/generic.md).
With the primal reduction, the same operator as ``(H^-1 - H^-1 A^T S^-1 A H^-1)_xx / max(1,
max|z|)``, its solve refined by steps of iterative refinement on the unreduced system in (dv,
dlambda, dy) (see :func:`~sstcvx.generic.primal_reduction.backward`: an element whose refinement
does not contract is solved with M).  An inactive inequality row has s / y huge in M and drops
out, an active bound has a huge Phi; hence ``torch.autograd.gradcheck`` passes at its default
tolerances in float64.

Compiled CPU kernel: on CPU tensors (unless ``sstcvx._compiled`` is switched off) the iteration runs element by
element in the numba kernels of :mod:`~sstcvx.generic._compiled_interior_point` (same start, steps, constants,
stop test, statuses and iteration counts; the constants are read from this module at each call), for the
built-in entropies (the whole loop in one call) and a user's separable regularizer, where the Newton system
is the dense normal matrix of at most
``DENSE_ROWS`` rows (and batches with B m^3 at most ``DENSE_WORK``) or an eliminable primal reduction (see
there).  A user's phi runs on a table of its phi' and phi'' (:mod:`~sstcvx.generic.derivative_table`, built
once per regularizer and interval, where one is accepted: ``DERIVATIVE_TABLE``): the whole iteration in one
call on the table, then the exact iteration, phi' and phi'' evaluated here between calls, from the table's
solutions until the stop test passes on the exact derivatives (usually at once: one evaluation of phi per
solve); an element that ``EXACT_ITERATIONS`` exact iterations do not end restarts the exact iteration from
its start.  Without a table: one call per iteration, phi' and phi'' evaluated here in between.  The
Euclidean regularizer (active-set start and polish), larger normal matrices and other devices take the torch
iteration below; the start, the factor at the returned point and the backward are this module's in all
cases.

All variables of an element live in one state tensor (see :class:`_Layout`): the slacks and
multipliers of inequality rows and bounds form two aligned blocks, so that complementarity, the
ratio test, the update and the removal of converged elements are one operation each.  Host
synchronizations: one per iteration (the stop pre-test), a few more in iterations where the full
test runs or the polish is tried, besides the factorization's check.  The functions of the iteration are
written to a count of tensor operations (each costs a fixed few microseconds on small batches): a
short parenthesis says why where a form is chosen for that.

Cost per iteration: O(B nnz(M) N + B m^3) (N = columns of x and w; M is assembled on its
sparsity pattern where that is small, densely otherwise), or with the primal reduction O(B (the
factorization's multiply-adds + nnz(L) m_eq + N m_eq^2 + m_eq^3)) and O(levels) batched operations;
one evaluation of phi' and phi''; float64 throughout on the input's device; no Python loop over
the batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import _compiled as compiled
from . import active_set, normal_matrix, primal_reduction
from .dual_newton import (
    STATUS_AUX_BOX,
    STATUS_CONVERGED,
    STATUS_MAX_ITER,
    STATUS_NOT_FINITE,
    DualProblem,
    FastRelaxation,
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
#: formulation at |z| about 30 stall; with the floor from the start, those at |z| about 1 take several
#: times more iterations).
PROXIMAL = 1e-7
PROXIMAL_DELAY = 12
#: Iterations taken with the primal reduction; the few elements still iterating after them continue with
#: the normal matrix (with the primal reduction throughout, a few elements of the flows at large |z| stall:
#: H cancels digits on the active rows, where y / s is of order 1 / mu).
PRIMAL_ITERATIONS = 20
#: The compiled kernel iterates on a table of a user's phi' and phi'' (:mod:`~sstcvx.generic.derivative_table`)
#: where one is accepted, then on the exact ones from the table's solutions, for at most EXACT_ITERATIONS
#: iterations (an element they do not end restarts the exact iteration from its start).
DERIVATIVE_TABLE = True
EXACT_ITERATIONS = 10
#: Active-set polish (:func:`~sstcvx.generic.active_set.polish`, the Euclidean regularizer only): tried on an element once its largest
#: complementarity product is below POLISH_START times the form's scale, with POLISH_ROUNDS rounds of sign flips.
POLISH_START = 1e-4
POLISH_ROUNDS = 3
#: Polish attempts per element (an active-set method can cycle on a degenerate element; the interior
#: point then finishes it).
POLISH_TRIES = 2
#: The start's multipliers (of the inequality rows and of the bounds of w; those of the bounds of x get
#: START_X_MULTIPLIER times that) are min(1, START_MULTIPLIER * sz) per element, sz = max(1, max|z|) the
#: objective's scale: where the regularizer dominates (sz small) the solution's multipliers are small, and a
#: start at 1 spends the first iteration reducing mu by a factor of about 4 only.  The factor is 1 at large
#: sz, where a smaller one costs iterations.
START_MULTIPLIER = 0.05
START_X_MULTIPLIER = 0.4
#: Elements with sz = max(1, max|z|) at most START_CENTRAL_SCALE start instead from the central state
#: (:func:`_central_start`): the iterate of the problem at z = 0 once its mean complementarity is below
#: START_CENTRAL_MU, computed once per problem (a few iterations on one element).  Near the solution where
#: the regularizer dominates; farther from it (more iterations) where max|z| is larger.  The built-in
#: entropies only: with a user's phi and the Euclidean regularizer it costs iterations.
START_CENTRAL_SCALE = 3.0
START_CENTRAL_MU = 3e-2
#: The proximal weight on the auxiliary variables in the backward's Phi (see the module's "Backward").
BACKWARD_PROXIMAL = 1e-7

_DOMAINS = {"entropy": (0.0, math.inf), "binary_entropy": (0.0, 1.0), "euclidean": (-math.inf, math.inf)}


@dataclass
class InteriorPointProblem:
    """The solver's tensors (float64, on one device): the rows ``C (m, N)`` on the free columns of x
    then w (equality rows first), ``d (m,)``; bounds ``lo, up (N,)`` (0 where absent) with the masks
    ``has_lo, has_up`` (float 0/1); ``v0 (N,)`` the starting point; ``nx`` columns of x; ``kind`` the
    regularizer (a built-in's name or a :class:`~sstcvx.regularizers.SeparableRegularizer`); the domain
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
    #: ``(K, flat, diag, r, c)`` that assembles M on its sparsity pattern (see
    #: :func:`~sstcvx.generic.normal_matrix.sparsity`), else None
    pattern: tuple | None = None
    #: ``(SparseCholesky, keep, where)`` where M is factored by levels (see :func:`~sstcvx.generic.normal_matrix.sparsity`), else None
    sparse: tuple | None = None
    #: the primal reduction's tensors where it is chosen (see :func:`~sstcvx.generic.primal_reduction.choose`), else None
    primal: primal_reduction.PrimalReduction | None = None
    #: ``K (N, m^2)`` that assembles a dense M as one product, where small (see :func:`~sstcvx.generic.normal_matrix.dense_table`)
    dense_table: torch.Tensor | None = None
    #: the columns of x whose lower (upper) bound is the domain's own end, and whether all are
    at_lo: torch.Tensor = field(init=False)
    at_hi: torch.Tensor = field(init=False)
    all_at_lo: bool = field(init=False)
    all_at_hi: bool = field(init=False)
    #: the number of complementarity pairs that exist (inequality rows and finite bounds; at least 1), the
    #: divisor of the mean complementarity (:attr:`_Layout.pairs` counts the pairs' places, absent ones included)
    existing_pairs: float = field(init=False)
    layout: _Layout = field(init=False)
    #: :func:`~sstcvx.generic.active_set.dual_guess`'s tensors (-C, C^T / L, d / L, the bounds with +-inf where absent, the rows' pattern
    #: transposed; L = ||C||_2^2), set on first use
    dual_guess: tuple | None = field(init=False, default=None)
    #: :func:`_central_start`'s state (width,), or False where that iteration failed; set on first use
    central: Any = field(init=False, default=None)
    #: :func:`_plain_start`'s state (width,), set on first use
    plain_start: torch.Tensor | None = field(init=False, default=None)
    #: the compiled kernels' arrays (see :func:`_kernel_plan`), False where they do not serve it; set on first use
    kernel_plan: Any = field(init=False, default=None)

    def __post_init__(self):
        nx = self.nx
        self.at_lo = (self.lo[:nx] == self.dom_lo) & (self.has_lo[:nx] > 0)
        self.at_hi = (self.up[:nx] == self.dom_hi) & (self.has_up[:nx] > 0)
        self.all_at_lo = bool(self.at_lo.all())
        self.all_at_hi = bool(self.at_hi.all())
        self.existing_pairs = max(self.m - self.dual.m_eq + float(self.has_lo.sum() + self.has_up.sum()), 1.0)
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
    v0 = torch.where(has_lo & has_up, 0.5 * (lo0 + up0), torch.zeros_like(lo0))
    v0 = torch.where(has_lo & ~has_up, lo0 + 1.0, v0)
    v0 = torch.where(~has_lo & has_up, up0 - 1.0, v0)
    pattern, sparse = normal_matrix.sparsity(C)
    primal = primal_reduction.choose(C, prob.m_eq, int(prob.Cx.shape[1]), kind, sparse is not None)
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
        primal,
        normal_matrix.dense_table(C) if pattern is None else None,
    )


def _derivatives(ip: InteriorPointProblem, lay: _Layout, T: torch.Tensor):
    """``(phi'(x), phi''(x))``, each ``(B, nx)``, on the columns of x of the states ``T (B, width)`` (not
    divided by sz: see :func:`_scaled_derivatives`).  For the built-in regularizers the distances to the ends
    of the domain are taken from the slacks where the bound is the domain's own end (exact even where 1 - x
    rounds to 0); a user's regularizer gets x clamped strictly inside its domain.  (Only the slices needed
    are taken: each is an operation.)"""
    kind: Any = ip.kind
    nx, N = ip.nx, lay.N
    if not isinstance(kind, str):
        # keep x strictly inside phi's domain (a slack may be below the spacing of floats at x); one clamp
        # by Python floats (bounds as 0-dim tensors would cost more operations)
        inside = (math.nextafter(ip.dom_lo, math.inf), math.nextafter(ip.dom_hi, -math.inf))
        return kind.derivatives(T[:, :nx].clamp(*inside))
    if kind == "euclidean":
        v = T[:, :nx]
        return v, torch.ones_like(v)
    o = lay.o_s + lay.mi  # where the bound slacks [sl | su] start
    if kind == "binary_entropy" and N == nx and ip.all_at_lo and ip.all_at_hi:
        # both distances are the bound slacks, adjacent in the state: one logarithm and one reciprocal for both
        Sb = T[:, o:]
        log, inv = Sb.log(), Sb.reciprocal()
        return log[:, :nx] - log[:, nx:], inv[:, :nx] + inv[:, nx:]
    # x itself only where a bound is not the domain's end (each slice is an operation)
    a = T[:, o : o + nx] if ip.all_at_lo else torch.where(ip.at_lo, T[:, o : o + nx], T[:, :nx] - ip.dom_lo)
    # (reciprocal(): ``1.0 / a`` is a reciprocal and a multiplication by 1)
    if kind == "entropy":
        return torch.log(a) + 1.0, a.reciprocal()
    b = (
        T[:, o + N : o + N + nx]
        if ip.all_at_hi
        else torch.where(ip.at_hi, T[:, o + N : o + N + nx], ip.dom_hi - T[:, :nx])
    )
    return torch.log(a) - torch.log(b), a.reciprocal() + b.reciprocal()


@dataclass
class InteriorPointSolution:
    """What :func:`solve` returns: ``x (B, n)`` (float64), ``status (B,)`` (see
    ``dual_newton.STATUS_NAMES``), ``iterations (B,)``, ``residual (B,)`` (the largest scaled KKT
    residual), and for the backward the factor ``chol`` of M (``(B, m, m)`` dense, or the level-scheduled
    factor batch last) and the scaling ``q`` of its equilibration (see
    :func:`~sstcvx.generic.normal_matrix.factor`), ``phi_inv (B, N)`` and the scale ``sz (B, 1)`` at the
    solution."""

    x: torch.Tensor
    status: torch.Tensor
    iterations: torch.Tensor
    residual: torch.Tensor
    chol: torch.Tensor
    q: torch.Tensor
    phi_inv: torch.Tensor
    sz: torch.Tensor
    #: where the problem uses the primal reduction: :func:`~sstcvx.generic.primal_reduction.factor`'s tuple
    #: and s / y on the rows (chol and q are then empty)
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
        self.pairs = m - m_eq + 2 * N  # the pairs' places P: inequality rows, then lower and upper bounds of v
        self.o_y = N + m_eq  # Y starts here; the positive part T[:, o_y:] is [Y | S]
        self.o_s = self.o_y + self.pairs
        self.width = self.o_s + self.pairs
        # which pairs exist (float 0/1 and boolean), over [s | sl | su] (or [y | zl | zu])
        self.mask = torch.cat([ip.has_lo.new_ones(m - m_eq), ip.has_lo, ip.has_up])
        self.exists = self.mask > 0
        # -1 at the multiplier of an absent pair (whose direction is 0), 0 elsewhere, over [Y | S]: the ratio
        # test's -[Y | S] is neg_pad - [Y | S] (see _negated_positive)
        self.neg_pad = -torch.cat([1.0 - self.mask, torch.zeros_like(self.mask)])
        self.neg_d = -ip.d  # the base of the primal residual C v - d (one addmm)
        # the start's multipliers relative to those of the rows (see START_X_MULTIPLIER)
        on_x = torch.cat(
            [ip.has_lo.new_zeros(m - m_eq)] + [(torch.arange(N, device=ip.d.device) < ip.nx).to(ip.d.dtype)] * 2
        )
        self.start_weight = 1.0 - (1.0 - START_X_MULTIPLIER) * on_x
        #: whether every pair exists (no mask to apply)
        self.all_pairs = bool(self.exists.all())
        #: ``(2, N)``: the sign of the bound slacks' directions in dv, [dsl; dsu] = bound_sign * dv (+1 for
        #: the lower bound, -1 for the upper, 0 where the bound is absent)
        self.bound_sign = torch.cat([ip.has_lo, -ip.has_up]).view(2, N)
        # slack = [s, v, -v] * mask + slack_offset: [s, v - lo, up - v] where the pair exists, 1 elsewhere
        self.slack_offset = torch.cat([ip.has_lo.new_zeros(m - m_eq), -ip.lo * ip.has_lo, ip.up * ip.has_up])
        self.slack_offset += 1.0 - self.mask
        self.zero = ip.d.new_zeros(())  # the base of the stop test's threshold (one addcmul)
        #: C^T, the view itself kept (a ``.T`` per use is one more operation; the products are the same)
        self.CT = ip.C.T
        #: 1 / pairs (the existing ones) at every pair: ``SY @ mean_weight`` is the mean complementarity
        self.mean_weight = ip.d.new_full((self.pairs,), 1.0 / ip.existing_pairs)
        #: FRACTION as a tensor, the numerator of :func:`_max_step` (a Python number over a tensor costs two
        #: operations)
        self.fraction = ip.d.new_tensor(FRACTION)
        #: the status codes converged, maximum iterations and not finite as tensors (a Python number in
        #: ``torch.where`` costs two operations)
        self.status_codes = tuple(
            torch.tensor(c, dtype=torch.long, device=ip.d.device)
            for c in (STATUS_CONVERGED, STATUS_MAX_ITER, STATUS_NOT_FINITE)
        )


def _phi_inverse(lay: _Layout, T, h, proximal):
    """``(phi_inv (B, N), ratio)`` for the states ``T (B, width)`` with phi'' / sz = ``h (B, nx)``:
    phi_inv = 1 / Phi, Phi = h on x, ``proximal`` (a number or ``(B, 1)``) on w, plus zl / sl + zu / su;
    ``ratio`` the two ratio tensors ``(s / y (B, mi), [zl / sl | zu / su] (B, 2N))`` (two tensors: nothing
    needs them joined, and a ``cat`` costs several elementwise operations).  ``ratio[0]`` is the normal
    matrix's extra diagonal, ``ratio[1]`` gives the bound multipliers' directions."""
    N, nx, mi = lay.N, lay.nx, lay.mi
    o_y, o_s = lay.o_y, lay.o_s
    ratio = (T[:, o_s : o_s + mi] / T[:, o_y : o_y + mi], T[:, o_y + mi : o_s] / T[:, o_s + mi :])
    phi = ratio[1][:, :N] + ratio[1][:, N:]
    if N > nx:
        phi[:, :nx].add_(h)
        phi[:, nx:].add_(proximal)
    else:
        phi.add_(h)
    return phi.reciprocal_(), ratio


def _scaled_targets(lay: _Layout, T, rc, neg_pos):
    """``(rc_b / [sl, su] (B, 2N), rc_y / y (B, mi))`` for the complementarity targets ``rc (B, P)`` laid out
    as the pairs ``[rows | lower | upper]`` (rc_y the rows' part, rc_b the bounds'); ``rc`` None stands for
    the predictor's ``-S Y``, whose quotients are ``-[zl, zu]`` and ``-s`` exactly: views of ``neg_pos``
    (:func:`_negated_positive`), valid where every pair exists (no padding there), two divisions fewer."""
    mi, o_y, o_s = lay.mi, lay.o_y, lay.o_s
    if rc is None:
        P = lay.pairs
        return neg_pos[:, mi:P], neg_pos[:, P : P + mi]
    return rc[:, mi:] / T[:, o_s + mi :], (rc[:, :mi] / T[:, o_y : o_y + mi] if mi else rc[:, :0])


def _direction(ip, lay: _Layout, T, F, phi_inv, ratio, rd, rp, rc, neg_pos=None):
    """The Newton direction ``dT (B, width)`` (laid out as T) from the states ``T`` with :func:`_residuals`'
    ``rd, rp``, for the complementarity targets ``rc (B, P)`` (the right-hand sides of S dY + Y dS = rc,
    pair by pair; None: the predictor's -S Y, read off ``neg_pos``, which it then requires, see
    :func:`_scaled_targets`), with ``F`` from :func:`~sstcvx.generic.normal_matrix.factor` and
    ``phi_inv, ratio`` from :func:`_phi_inverse` (the same for predictor and corrector).  Eliminating dY and
    dS leaves M dnu = C Phi^-1 r1 + rp + (0, rc_y / y); then dv = Phi^-1 (r1 - C^T dnu), the slacks'
    directions from dv (bounds) and dnu (rows), the multipliers' from S dY + Y dS = rc."""
    m_eq, mi = lay.m_eq, lay.mi
    rcb, rcy, r1 = _targets_in_v(lay, T, rc, neg_pos, rd)
    u = phi_inv * r1
    # the right-hand side C u + rp + (0, rc_y / y), by fused operations (addmm, add_ on a view: no copies)
    rhs = torch.addmm(rp, u, lay.CT)
    if mi:
        (rhs[:, m_eq:] if m_eq else rhs).add_(rcy)
    dnu = normal_matrix.solve(ip, F, rhs)
    dv = torch.addcmul(u, phi_inv, dnu @ ip.C, value=-1.0)
    return _completed_direction(lay, dv, [dnu], (dnu[:, m_eq:] if m_eq else dnu) if mi else None, rcb, rcy, ratio)


def _targets_in_v(lay: _Layout, T, rc, neg_pos, rd):
    """``(rc_b / [sl, su], rc_y / y, r1)``: :func:`_scaled_targets`, and the right-hand side in v once the bound
    multipliers' directions are eliminated, ``r1 = rc_l / sl - rc_u / su - rd (B, N)``."""
    N = lay.N
    rcb, rcy = _scaled_targets(lay, T, rc, neg_pos)
    return rcb, rcy, rcb[:, :N] - rcb[:, N:] - rd


def _completed_direction(lay: _Layout, dv, dnu_parts, dy, rcb, rcy, ratio):
    """The direction ``dT`` laid out as T from dv and the rows' multipliers' directions (``dnu_parts``, in the
    order of T: [dlambda, dy] or [dnu]; ``dy (B, mi)`` the inequality rows' part, None without such rows): the
    bound slacks' directions [dsl | dsu] = [dv | -dv] (0 at an absent bound), and the multipliers' from
    S dY + Y dS = rc."""
    # (reshape: dv from the primal reduction may be a strided view, and the product follows its layout)
    dSb = (dv.unsqueeze(1) * lay.bound_sign).reshape(dv.shape[0], 2 * lay.N)
    dYb = torch.addcmul(rcb, ratio[1], dSb, value=-1.0)
    if lay.mi:
        return torch.cat([dv, *dnu_parts, dYb, torch.addcmul(rcy, ratio[0], dy, value=-1.0), dSb], dim=1)
    return torch.cat([dv, *dnu_parts, dYb, dSb], dim=1)


def _direction_primal(ip, lay: _Layout, T, F, phi_inv, ratio, rd, rp, rc, neg_pos=None):
    """:func:`_direction` by the primal reduction: with D = y / s on the inequality rows, the rows'
    equations G dv - (s / y) dy = rows_in give dy = D (G dv - rows_in), so that (Phi + G^T D G) dv +
    A^T dlambda = r1 + G^T D rows_in and A dv = rows_eq (``F`` from :func:`~sstcvx.generic.primal_reduction.factor`;
    the other arguments and the result as there)."""
    m_eq = lay.m_eq
    rcb, rcy, r1 = _targets_in_v(lay, T, rc, neg_pos, rd)
    rows_in = -rp[:, m_eq:] - rcy  # the inequality rows' right-hand side: G dv - (s / y) dy = rows_in
    D = ratio[0].reciprocal()
    r1 = torch.addmm(r1, D * rows_in, ip.primal.G)
    dv, dlam = primal_reduction.solve(ip, F, r1, -rp[:, :m_eq] if m_eq else None)
    dy = D * (dv @ ip.primal.G.T - rows_in)
    return _completed_direction(lay, dv, [dlam, dy] if m_eq else [dy], dy, rcb, rcy, ratio)


def _max_step(lay: _Layout, neg_pos, dT, fraction: float | torch.Tensor = FRACTION, dpos=None):
    """The step length ``(B, 1)``: ``fraction`` (a number or ``(B, 1)``) times the largest alpha keeping
    every slack and multiplier positive, at most 1, for the direction ``dT`` from the state whose
    ``-[Y | S]`` is ``neg_pos`` (:func:`_negated_positive`, shared by the predictor's and the corrector's
    ratio test).  ``dpos``: the block ``dT[:, o_y:]`` where the caller already has it (None: sliced here)."""
    if not lay.pairs:
        return dT.new_ones(dT.shape[0], 1)
    # alpha = 1 / max(-dpos / pos): arithmetic only (a comparison and a masked fill cost several times
    # more on these small tensors); min(1, fraction / worst) is fraction / max(worst, fraction), also 1
    # where no pair blocks (worst <= 0)
    worst = ((dT[:, lay.o_y :] if dpos is None else dpos) / neg_pos).amax(-1, keepdim=True)
    if isinstance(fraction, float):
        # (a tensor numerator: a Python number over a tensor is a reciprocal and a multiplication)
        numerator = lay.fraction if fraction == FRACTION else worst.new_tensor(fraction)
        return torch.div(numerator, worst.clamp_min_(fraction))
    return fraction / torch.maximum(worst, fraction)


def _negated_positive(lay: _Layout, pos):
    """``-[Y | S] (B, 2P)`` for the ratio test (:func:`_max_step`) and the predictor's targets
    (:func:`_scaled_targets`), from the block ``pos = T[:, o_y:]`` of the states; -1 at the multiplier of an
    absent pair (whose direction is 0, so that it never limits the step)."""
    return lay.neg_pad - pos


def _polishes(ip: InteriorPointProblem) -> bool:
    """Whether the solver polishes (and starts with the active-set method): the Euclidean regularizer
    only, whose reduced problem is linear.  With a nonlinear f, Newton steps in x from an iterate whose
    small coordinates are not yet resolved overshoot past an end of f's domain where phi'' is infinite
    (the entropies, the Tsallis entropies), and damped steps need more factorizations than the
    interior-point iterations they save (figures in docs/generic.md)."""
    return ip.kind == "euclidean"


def _residuals(ip: InteriorPointProblem, lay: _Layout, T, g, zs):
    """The residuals of the states ``T (B, width)`` with phi'(x) / sz = ``g (B, nx)`` and z / sz = ``zs (B, nx)``:
    ``(rd (B, N), rp (B, m), SY (B, P), mu (B,))``, the dual residual ``[g - zs; 0] + C^T nu - zl + zu``, the
    primal residual ``C v - d + (0, s)``, the complementarity products (0 at an absent pair: slack 1, multiplier 0) and their
    mean over the existing pairs."""
    N, m, m_eq, mi, nx = lay.N, lay.m, lay.m_eq, lay.mi, lay.nx
    o_y, o_s = lay.o_y, lay.o_s
    S, Y = T[:, o_s:], T[:, o_y:o_s]
    # (addmm: one operation fewer each than a product and a sum)
    rd = torch.addmm(T[:, o_y + mi + N : o_s] - T[:, o_y + mi : o_y + mi + N], T[:, N : N + m], ip.C)
    # (a slice [:, :k] that is the whole tensor is still one more operation: skipped where it is)
    (rd[:, :nx] if nx < N else rd).add_(g - zs)
    rp = torch.addmm(lay.neg_d, T[:, :N], lay.CT)
    if mi:
        (rp[:, m_eq:] if m_eq else rp).add_(S[:, :mi])
    SY = S * Y
    return rd, rp, SY, SY @ lay.mean_weight


def _converged(ip: InteriorPointProblem, lay: _Layout, T, h, rd, rp, top, mu):
    """The stop test of the states ``T`` with phi'' / sz = ``h`` on :func:`_residuals`' ``rd, rp, mu`` and the
    largest product ``top (B,)`` of each element: ``(done (B,), res (B,))``, whether the element meets every
    tolerance (primal, dual up to the resolution of floats at x, the largest product), and its largest
    scaled residual (NaN where the state is not finite)."""
    scale, nx = ip.dual.scale, lay.nx
    # (the threshold 4 eps h max(1, |x|) by one addcmul, 4 eps a power of 2: exact; abs and amax cost less
    # than linalg.vector_norm)
    p = rp.abs().amax(-1) if lay.m else mu.new_zeros(mu.shape)
    a = rd.abs()
    ax = a[:, :nx] if nx < lay.N else a
    threshold = torch.addcmul(lay.zero, h, T[:, :nx].abs().clamp_min_(1.0), value=4 * torch.finfo(T.dtype).eps)
    ax.masked_fill_(ax <= threshold, 0.0)
    dd = a.amax(-1) if lay.N else mu.new_zeros(mu.shape)
    # (max(p, mu) / scale is max(p / scale, mu / scale), the division being monotone: one operation fewer;
    # a stack of the three tests would cost more than the operations it saves)
    res = torch.maximum(torch.maximum(p, mu).div_(scale), dd)
    done = (p <= TOLERANCE * scale) & (dd <= TOLERANCE) & (top <= MU_TOLERANCE * scale)
    return done, res


def solve(ip: InteriorPointProblem, Z: torch.Tensor, max_iter: int = MAX_ITER) -> InteriorPointSolution:
    """Solve the relaxed problem for every row of ``Z (B, n)`` (any device) in at most ``max_iter``
    iterations per element; see the module (start, iteration, stop test, compaction, the backward's
    factor)."""
    prob = ip.dual
    dt = torch.float64
    B = Z.shape[0]
    lay = ip.layout
    nx = ip.nx
    o_y, o_s = lay.o_y, lay.o_s
    # (every coordinate of x free, the usual case: no indexing)
    all_free = nx == Z.shape[1]
    z = Z.to(dt) if all_free else Z.to(dt)[:, prob.x_free]
    sz = sz_all = (z.abs().amax(-1, keepdim=True) if nx else z.new_zeros(B, 1)).clamp_min(1.0)
    T = _plain_start(ip).expand(B, lay.width).clone()
    # the start's multipliers scaled per element (see START_MULTIPLIER)
    T[:, o_y:o_s].mul_((START_MULTIPLIER * sz).clamp_(max=1.0) * lay.start_weight)
    if START_CENTRAL_SCALE >= 1.0 and B and ip.kind in ("entropy", "binary_entropy"):
        central = _central_start(ip)
        if central is not False:
            T = torch.where(sz <= START_CENTRAL_SCALE, central, T)
    zs = z / sz
    kernel_plan = _kernel_plan(ip) if B and compiled.enabled_for(Z) else None
    if kernel_plan is not None and kernel_plan.serves(B):
        from . import _compiled_interior_point

        T, h_all, status, iterations, residual = _compiled_interior_point.run(ip, kernel_plan, T, zs, sz, max_iter)
    else:
        T, h_all, status, iterations, residual = _iterate(ip, T, z, zs, sz, max_iter)
    return _finish(ip, Z, T, h_all, status, iterations, residual, sz_all)


def _kernel_plan(ip: InteriorPointProblem):
    """The compiled kernels' arrays for ``ip`` (:func:`~sstcvx.generic._compiled_interior_point.plan`, cached),
    None where the torch iteration serves it (the Euclidean regularizer, a large dense normal matrix, a
    primal reduction whose auxiliary columns are not eliminable)."""
    if ip.kernel_plan is None:
        from . import _compiled_interior_point

        ip.kernel_plan = _compiled_interior_point.plan(ip) or False
    return ip.kernel_plan or None


def _iterate(ip: InteriorPointProblem, T, z, zs, sz, max_iter: int):
    """The batched torch iteration from the starting states ``T (B, width)``: ``(T, h, status, iterations,
    residual)``, each element's state and phi'' / sz where it stopped, its status, the iterations it took and its
    residual."""
    prob = ip.dual
    B = T.shape[0]
    dev = T.device
    lay = ip.layout
    N, nx = ip.C.shape[1], ip.nx
    o_y, o_s = lay.o_y, lay.o_s
    scale = prob.scale
    g, h = _scaled_derivatives(ip, lay, T, sz)
    # status and residual: set at the first stop test that stops an element (always before the loop ends, with
    # every element still active: the whole tensors then)
    status = residual = torch.empty(0)
    iterations = torch.zeros(B, dtype=torch.long, device=dev)
    polish = N == nx and _polishes(ip)
    tries = torch.zeros(B, dtype=torch.long, device=dev) if polish else None  # polish attempts per active element
    index = None  # the indices of the active elements, None while all are active
    zs_and_sz = None  # [zs | sz] of the active elements side by side (one indexing for both), from the first removal on
    T_all, h_all = T, h  # each element's state and phi'' / sz where it stopped
    if polish and active_set.START_ROUNDS >= 0:
        # the quadratic case: an active-set method from a guess of the active set ends most elements before
        # the interior point starts (those it does not solve start it from the usual point)
        Tn, gn, hn, ok = active_set.euclidean_start(ip, lay, z, zs, sz, TOLERANCE)
        T[ok], g[ok], h[ok] = Tn[ok], gn[ok], hn[ok]
    for k in range(max_iter + 1):  # k: the iterations taken so far
        if polish and k:
            assert tries is not None
            # elements near their solution: try the active-set polish, keep what passes the test below
            near = ((T[:, o_s:] * T[:, o_y:o_s]).amax(-1) <= POLISH_START * scale) & (tries < POLISH_TRIES)
            near = near.nonzero().squeeze(1)
            if near.numel():
                tries[near] += 1
                Tn, gn, hn, ok = active_set.polish(ip, lay, T[near], zs[near], sz[near], TOLERANCE, POLISH_ROUNDS)
                if bool(ok.any()):
                    near = near[ok]
                    T[near], g[near], h[near] = Tn[ok], gn[ok], hn[ok]
        rd, rp, SY, mu = _residuals(ip, lay, T, g, zs)
        last = k == max_iter
        # the full test only once some element's largest complementarity product (or a NaN) lets it pass:
        # about 20 operations saved in most iterations.  The mean mu is a lower bound of the largest (the
        # margin covers the sum's rounding), so the pre-test reads mu's least: two operations, one host sync
        if lay.pairs and not last and float(mu.amin()) > MU_TOLERANCE * scale * (1.0 + 1e-9):
            stop = None
        else:
            top = SY.amax(-1) if lay.pairs else mu
            done, res = _converged(ip, lay, T, h, rd, rp, top, mu)
            # res >= 0 or NaN: finite is res < inf (one operation; isfinite is four)
            finite = res < math.inf
            stop = done | ~finite
        if stop is not None and (bool(stop.any()) or last):
            code_converged, code_max_iter, code_not_finite = lay.status_codes
            sub_status = torch.where(done, code_converged, torch.where(finite, code_max_iter, code_not_finite))
            # an element's iterations are those taken when it stops (rewritten while it continues): one
            # operation per stop instead of a count per iteration
            if index is None:
                status, residual = sub_status, res
                iterations.fill_(k)
                T_all, h_all = T, h
            else:
                status[index], residual[index], iterations[index] = sub_status, res, k
                T_all[index], h_all[index] = T, h
            if last:
                break
            # the elements kept, by their positions: a boolean mask would run a nonzero per tensor indexed
            keep = (~stop).nonzero().squeeze(1)
            index = keep if index is None else index[keep]
            if index.numel() == 0:
                break
            T, g, h = T.index_select(0, keep), g.index_select(0, keep), h.index_select(0, keep)
            zs_and_sz = (torch.cat([zs, sz], 1) if zs_and_sz is None else zs_and_sz).index_select(0, keep)
            zs, sz = zs_and_sz[:, :nx], zs_and_sz[:, nx:]
            if tries is not None:  # (the polish runs)
                tries = tries[keep]
            rd, rp, SY, mu = rd.index_select(0, keep), rp.index_select(0, keep), SY.index_select(0, keep), mu[keep]
        T = _step(ip, lay, T, h, rd, rp, SY, mu, k)
        g, h = _scaled_derivatives(ip, lay, T, sz)
    return T_all, h_all, status, iterations, residual


def _finish(ip: InteriorPointProblem, Z, T, h_all, status, iterations, residual, sz_all) -> InteriorPointSolution:
    """The solution from the final states ``T`` and phi'' / sz ``h_all`` where each element stopped: x, the
    auxiliary box's status, and the factor of the Newton system at the returned point for the backward."""
    prob = ip.dual
    dt = torch.float64
    B = T.shape[0]
    lay = ip.layout
    m, N, nx, mi = ip.m, ip.C.shape[1], ip.nx, lay.mi
    o_s = lay.o_s
    all_free = nx == Z.shape[1]
    # the factor of the Newton system and Phi at the returned point, for the backward (phi'' there was
    # kept when each element stopped: no second evaluation of the derivatives on the whole batch)
    phi_inv, ratio = _phi_inverse(lay, T, h_all, BACKWARD_PROXIMAL)
    primal_factor = None
    if ip.primal is not None:
        primal_factor = primal_reduction.factor(ip, ratio[0], phi_inv) + (ratio[0],)
        L = q = phi_inv.new_zeros(0)
    elif m:
        L, q = normal_matrix.factor(ip, ratio[0], phi_inv)
    else:
        L, q = phi_inv.new_zeros(B, 0, 0), phi_inv.new_ones(B, 0)
    if prob.Cw.shape[1]:
        width = prob.wu - prob.wl
        sl, su = T[:, o_s + mi + nx : o_s + mi + N], T[:, o_s + mi + N + nx :]
        near = ((sl <= 1e-6 * width) & prob.w_art_lo) | ((su <= 1e-6 * width) & prob.w_art_hi)
        status = torch.where((status == STATUS_CONVERGED) & near.any(-1), STATUS_AUX_BOX, status)
    if all_free:
        x = T[:, :nx].clone()
    else:
        x = prob.x_fixed_value.to(dt).expand(B, -1).clone()
        x[:, prob.x_free] = T[:, :nx]
    return InteriorPointSolution(x, status, iterations, residual, L, q, phi_inv, sz_all, primal_factor)


def _plain_start(ip: InteriorPointProblem):
    """The usual start ``(width,)``: v0 (the middle of each finite interval, one unit inside a half-line),
    lambda 0, slacks of the inequality rows max(1, h - G v0), bound slacks v0 - l and u - v0 (1 where the
    bound is absent), multipliers 1 where the pair exists, 0 at an absent bound (scaled per element by
    :func:`solve`); computed once per problem and cached."""
    if ip.plain_start is None:
        m_eq = ip.m_eq
        s0 = (ip.d[m_eq:] - ip.v0 @ ip.C[m_eq:].T).clamp_min(1.0)
        sl = torch.where(ip.has_lo > 0, ip.v0 - ip.lo, torch.ones_like(ip.v0))
        su = torch.where(ip.has_up > 0, ip.up - ip.v0, torch.ones_like(ip.v0))
        ip.plain_start = torch.cat(
            [ip.v0, ip.v0.new_zeros(m_eq), torch.ones_like(s0), ip.has_lo, ip.has_up, s0, sl, su]
        )
    return ip.plain_start


def _central_start(ip: InteriorPointProblem):
    """The state ``(width,)`` of the iteration on the problem at z = 0 (from the usual start) once its mean
    complementarity is below START_CENTRAL_MU: strictly inside every bound and inequality row, near the
    rows, with multipliers centered for f alone (see START_CENTRAL_SCALE); False where that iteration fails
    (not finite, or 30 iterations without getting there).  Computed once per problem and cached."""
    if ip.central is None:
        ip.central = False
        lay = ip.layout
        T = _plain_start(ip).clone()[None]
        zs = T.new_zeros(1, ip.nx)
        sz = T.new_ones(1, 1)
        g, h = _scaled_derivatives(ip, lay, T, sz)
        for k in range(30):
            rd, rp, SY, mu = _residuals(ip, lay, T, g, zs)
            if not bool(torch.isfinite(T).all()):
                break
            if float(mu[0]) <= START_CENTRAL_MU:
                ip.central = T[0].clone()
                break
            T = _step(ip, lay, T, h, rd, rp, SY, mu, k)
            g, h = _scaled_derivatives(ip, lay, T, sz)
    return ip.central


def _step(ip: InteriorPointProblem, lay: _Layout, T, h, rd, rp, SY, mu, k: int):
    """One predictor-corrector iteration, the ``k``-th (0-based: it sets the proximal weight and the
    reduction), from the states ``T (B, width)`` with phi'' / sz = ``h (B, nx)`` and :func:`_residuals`'
    output ``rd, rp, SY, mu``: the next states ``(B, width)``.  The Newton system is factored once
    (:func:`~sstcvx.generic.normal_matrix.factor`, or :func:`~sstcvx.generic.primal_reduction.factor` for
    the first ``PRIMAL_ITERATIONS`` iterations where the problem has it) and solved twice: the predictor
    (targets -S Y), then the corrector (centering target sigma mu with sigma = (mu_aff / mu)^3, plus the
    predictor's second-order term), each with its own step to the boundary."""
    o_y, scale = lay.o_y, ip.dual.scale
    # proximal weight on w: mu for the first PROXIMAL_DELAY iterations, then at least PROXIMAL
    mu_col = mu[:, None]  # (B, 1)
    prox = mu_col if k < PROXIMAL_DELAY or lay.N == lay.nx else mu_col.clamp(min=PROXIMAL)
    phi_inv, ratio = _phi_inverse(lay, T, h, prox)
    if ip.primal is not None and k < PRIMAL_ITERATIONS:
        F, direction = primal_reduction.factor(ip, ratio[0], phi_inv), _direction_primal
    else:
        F, direction = normal_matrix.factor(ip, ratio[0], phi_inv), _direction
    # predictor (affine scaling); its targets -S Y divided by S are read off -[Y | S] where every pair exists
    pos = T[:, o_y:]  # the positive variables [Y | S]
    neg_pos = _negated_positive(lay, pos)
    d_aff = direction(ip, lay, T, F, phi_inv, ratio, rd, rp, None if lay.all_pairs else -SY, neg_pos)
    dpos = d_aff[:, o_y:]
    a_aff = _max_step(lay, neg_pos, d_aff, dpos=dpos)  # the predictor's step length (B, 1)
    dY_aff, dS_aff = dpos[:, : lay.pairs], dpos[:, lay.pairs :]
    pos_aff = torch.addcmul(pos, a_aff, dpos)
    # (the mean by a product with the weights 1 / pairs: one operation for a sum and a division)
    mu_aff = (pos_aff[:, lay.pairs :] * pos_aff[:, : lay.pairs]) @ lay.mean_weight
    sigma = (mu_aff / mu.clamp_min(1e-300)).clamp(0.0, 1.0) ** 3
    # never aim below a tenth of the final complementarity: a collapse of mu before the rows are
    # satisfied leaves a singular normal matrix
    target = torch.clamp(sigma * mu, min=0.1 * MU_TOLERANCE * scale)[:, None]
    # corrector: centering and the second-order term of the predictor
    rc = torch.addcmul(target - SY if lay.all_pairs else target * lay.mask - SY, dS_aff, dY_aff, value=-1.0)
    dT = direction(ip, lay, T, F, phi_inv, ratio, rd, rp, rc)
    # the fraction to the boundary tends to 1 with mu (FRACTION at least, 1 - FRACTION_GAP at most): a
    # fixed fraction caps the decrease of mu at 1 / (1 - FRACTION) per step in the last iterations
    fraction = (1.0 - mu_col).clamp_(min=FRACTION, max=1.0 - FRACTION_GAP)
    T = torch.addcmul(T, _max_step(lay, neg_pos, dT, fraction), dT)
    return T


def _scaled_derivatives(ip, lay: _Layout, T, sz):
    """``(phi'(x) / sz, phi''(x) / sz)``, each ``(B, nx)``: the derivatives of the scaled objective at the
    states ``T`` (``sz (B, 1)``)."""
    g, h = _derivatives(ip, lay, T)
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
        all_free = ip.nx == G.shape[1]
        g = G.to(torch.float64) if all_free else G.to(torch.float64)[:, prob.x_free]
        if primal_factor:
            u = primal_reduction.backward(ip, primal_factor, phi_inv, g)
        else:
            u = phi_inv[:, : ip.nx] * g
        if ip.m and not primal_factor:
            r = u @ ip.C[:, : ip.nx].T
            t = normal_matrix.solve(ip, (chol, q), r)
            u = u - phi_inv[:, : ip.nx] * (t @ ip.C[:, : ip.nx])
        if all_free:
            grad = u / sz
        else:
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
