"""The fast generic path: a batched torch solver for the built-in regularizers on a declared polytope.

Problem.  For ``z = U / tau`` (a batch ``(B, n)``, ``n = prod(event_shape)``) and P in its
canonical linear form (:meth:`sstcvx.Polytope.linear_form`),

    X_tau = argmax_x  <z, x> - f(x)   over   { x : exists w, A [x; w] = b, G [x; w] <= h, l <= [x; w] <= u }

with f the negative entropy, the binary entropy or 1/2 ||x||^2 (separable, on x only; the
auxiliary variables w of an extended formulation are not regularized).

Algorithm: Newton on the dual, with an interior-point treatment of the inequality rows.  Fixed
columns (l = u) are substituted out; bounds of x that f's domain implies (x >= 0 for the
entropy, [0, 1] for the binary entropy) are dropped and the others stay inside the conjugate
(a clamp).  With ``C = [A; G]``, multipliers ``nu = (lambda, y)``, ``y >= 0``, ``d = (b, h)``,
the dual is

    minimize_nu  f*_box(z - C_x^T nu) + <d, nu> + sum_j g_j((C_w^T nu)_j)   subject to y >= 0

where f*_box is the conjugate of f plus the bounds of x (x = clamp(grad f*) in closed form:
``exp(v - 1)``, the sigmoid, the identity; so stationarity in x holds exactly at every iterate
and no coordinate leaves f's domain, even where it underflows to 0), and ``g_j`` is the
conjugate of minus the log barrier (weight mu) of w_j's bounds, also a closed form (a root of a
quadratic).  Bounds of w implied by the rows are found by interval propagation; a side still
unbounded gets an artificial box of width ``AUX_BOX`` times the form's scale, and a solution that
touches it is reported as not converged.  The dual gradient is the primal residual
``d - C [x; w]``; the inequality rows carry slacks s with ``s y = mu`` (a primal-dual
interior-point step), so each Newton step solves ``(C_x D_x C_x^T + C_w D_w C_w^T + diag(0, s / y))
dnu = -r``, an m x m system (m = the number of rows: 1 for a k-subset, 2n - 1 for Birkhoff), by
one batched Cholesky factorization.  Steps keep y, s > 0 (fraction to the boundary) and are damped
by a backtracking line search: Armijo on the dual where there are equality rows only (the method
is then plain damped Newton on a smooth convex function and converges quadratically), a decrease
of the residual otherwise; where the full step is taken far from the solution it is doubled while
that keeps improving (the exponential's quadratic model undershoots by one unit of log x per step).

Continuations: for the entropy, z is scaled by ``t`` from ``CONTINUATION_SCALE / max|z|`` up to 1
by factors of 10 (the multipliers scaled along, which keeps every exponent bounded); the barrier
weight ``mu`` (relative to ``max(1, max|z|)``) goes from ``MU_START`` to ``MU_FINAL`` by factors of
``MU_FACTOR`` once the residual is of the order of mu (only where there are inequality rows or
auxiliary variables).  Every element has its own stage; all elements iterate together, and an
element that has converged is frozen.

Why this method: a primal interior-point method cannot represent the entropy's solution at small
tau (coordinates of size exp(-1e6)), and its Newton systems have the size of x and w; the dual has
as many unknowns as rows, x in closed form, and needs no phase one (``nu = (0, 1)`` is strictly
feasible).  Measured (``docs/generic.md``): 0-6 Newton steps with equality rows only (after a start
from the rows' own closed forms, :func:`_equality_start`), 10-40 with
inequality rows; the barrier on auxiliary variables whose optimal values are not unique (flows,
vertex weights) recenters slowly after each reduction of mu (hundreds of steps): that case is
correct but not yet fast.

Precision: the returned point satisfies the primal residual bound ``tol`` (1e-11 times the
form's scale, or 64 eps max|z| where that is larger: the rounding of the exponents) and, with
inequality rows or auxiliary variables, complementarity ``mu = 1e-10 max(1, |z|)``; x is then
within O(mu) of the exact solution.

Backward (exact for the computed point): X = grad f*_box(z - C_x^T nu(z)), so

    dX/dz = D_x - D_x C_x^T H^{-1} C_x D_x,     H = the Newton matrix at the solution,

one batched Cholesky solve per backward pass.  In H an inactive inequality row carries the
weight s / y (huge), so it drops out, and an active one s / y ~ 0: this is
``D - D C_a^T (C_a D C_a^T)^+ C_a D`` with C_a the equality and active rows, up to O(mu); clamped
coordinates have D = 0.  It is also the derivative of the point the forward pass returns, which
is why ``torch.autograd.gradcheck`` passes at its default tolerances.

Cost per Newton step: O(B m^2 (n + n_aux) + B m^3), plus O(B m (n + n_aux)) per line-search
trial.  Everything runs in float64 on the input's device.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import SolverError
from .layer import refuse_double_backward

#: The regularizers this solver serves.
FAST_REGULARIZERS = ("entropy", "binary_entropy", "euclidean")
#: Continuation starts from z scaled to this largest entry (every exponent is then bounded).
CONTINUATION_SCALE = 20.0
#: Barrier weights, relative to max(1, max|z|): the first and the final one, and the reduction factor.
MU_START = 1e-1
MU_FINAL = 1e-10
MU_FACTOR = 0.05
#: Final tolerance on the primal residual (the dual gradient), relative to max(1, max|d|).
TOLERANCE = 1e-11
#: The final tolerance is at least this times max|z| (the rounding error of the exponents).
ROUNDING = 64 * 2.0**-52
#: Residual at which an intermediate stage (continuation or barrier) is considered centered.
STAGE_TOLERANCE = 1e-3
#: Largest change of an exponent (times max(1, |z|)) in one step.
STEP_CAP = 10.0
#: With equality rows only, a predicted decrease of the dual below this times |Psi| is rounding: the
#: line search then accepts a step that halves the residual instead (Armijo cannot see the decrease).
FLAT = 1e3 * 2.0**-52
#: With equality rows only (see _equality_start): Sinkhorn sweeps of the entropy's start over two
#: blocks of unit rows, and the safeguarded Newton steps of the start where one block holds every row.
START_SWEEPS = 3
START_STEPS = 8
#: Newton steps allowed per element (all stages together).
MAX_ITER = 500
#: Width of the artificial box given to an auxiliary variable without bounds, times the form's scale.
AUX_BOX = 1e3

STATUS_CONVERGED = 0
STATUS_MAX_ITER = 1
STATUS_NOT_FINITE = 2
STATUS_AUX_BOX = 3
STATUS_NAMES = {
    0: "converged",
    1: "maximum number of iterations reached",
    2: "non-finite iterate",
    3: "an auxiliary variable reached its artificial bound",
}


@dataclass
class DualProblem:
    """The problem in the solver's variables (built once per polytope and regularizer, on the CPU).

    ``Cx (m, nx)``, ``Cw (m, nw)``, ``d (m,)``: the rows on the free coordinates of x and w,
    equality rows first (``m_eq`` of them); ``wl, wu (nw,)`` the bounds of w (an artificial box
    where absent, flagged in ``w_art_lo, w_art_hi``); ``x_free (nx,)`` the indices of the free
    coordinates of x, ``x_fixed_value (n,)`` the value of the fixed ones.
    """

    n: int
    m_eq: int
    Cx: torch.Tensor
    Cw: torch.Tensor
    d: torch.Tensor
    wl: torch.Tensor
    wu: torch.Tensor
    w_art_lo: torch.Tensor
    w_art_hi: torch.Tensor
    x_free: torch.Tensor
    x_fixed_value: torch.Tensor
    scale: float
    xl: torch.Tensor | None = None
    xu: torch.Tensor | None = None

    @property
    def row_scale(self) -> float:
        """The largest squared norm of a row of C (the Hessian's scale when no coordinate is clamped)."""
        C = torch.cat([self.Cx, self.Cw], dim=1)
        return float((C * C).sum(-1).max()) if C.shape[0] else 1.0

    @property
    def m(self) -> int:
        return int(self.d.shape[0])

    @property
    def has_barrier(self) -> bool:
        return self.m > self.m_eq or self.Cw.shape[1] > 0

    def to(self, device) -> DualProblem:
        move = lambda t: t.to(device)
        return DualProblem(
            self.n,
            self.m_eq,
            move(self.Cx),
            move(self.Cw),
            move(self.d),
            move(self.wl),
            move(self.wu),
            move(self.w_art_lo),
            move(self.w_art_hi),
            move(self.x_free),
            move(self.x_fixed_value),
            self.scale,
            move(self.xl),
            move(self.xu),
        )


def build_dual_problem(form, regularizer_name) -> DualProblem:
    """Turn a :class:`~sstcvx.linear_form.LinearForm` into the solver's :class:`DualProblem`.

    ``regularizer_name``: a built-in name of ``FAST_REGULARIZERS``, or a
    :class:`~sstcvx.regularizers.SeparableRegularizer` (whose mirror map stands in for the
    closed forms)."""
    from ..linear_form import _independent_rows

    separable = not isinstance(regularizer_name, str)
    if not separable and regularizer_name not in FAST_REGULARIZERS:
        raise ValueError(f"regularizer: the fast solver serves {FAST_REGULARIZERS}, got {regularizer_name!r}")
    n = form.n
    A, b = form.A.numpy().copy(), form.b.numpy().copy()
    G, h = form.G.numpy().copy(), form.h.numpy().copy()
    lo, up = form.lower.numpy().copy(), form.upper.numpy().copy()
    with np.errstate(invalid="ignore"):
        fixed = np.isfinite(lo) & np.isfinite(up) & ((up - lo) <= 1e-12 * np.maximum(1.0, np.abs(lo)))
    value = np.where(fixed, lo, 0.0)
    b = b - A[:, fixed] @ value[fixed]
    h = h - G[:, fixed] @ value[fixed]
    free = ~fixed
    x_free = np.flatnonzero(free[:n])
    w_free = n + np.flatnonzero(free[n:])
    # Bounds of x: those implied by f's domain are dropped, the others stay in the conjugate (a clamp).
    xl, xu = lo[x_free], up[x_free]
    if regularizer_name == "entropy":
        xl = np.where(xl <= 0, -np.inf, xl)
    elif regularizer_name == "binary_entropy":
        xl = np.where(xl <= 0, -np.inf, xl)
        xu = np.where(xu >= 1, np.inf, xu)
    elif separable:  # the mirror map keeps x in phi's domain itself
        xl = np.where(xl <= regularizer_name.domain[0], -np.inf, xl)
        xu = np.where(xu >= regularizer_name.domain[1], np.inf, xu)
    cols = np.concatenate([x_free, w_free]).astype(np.int64)
    nx = len(x_free)
    A, G = A[:, cols], G[:, cols]
    # Rows left empty by the fixed columns: drop (or report an empty polytope).
    empty_eq = ~np.any(A != 0, axis=1)
    empty_in = ~np.any(G != 0, axis=1)
    if np.any(np.abs(b[empty_eq]) > 1e-9) or np.any(h[empty_in] < -1e-9):
        raise ValueError("constraints: the polytope is empty once its fixed coordinates are substituted")
    A, b, G, h = A[~empty_eq], b[~empty_eq], G[~empty_in], h[~empty_in]
    if len(A):
        A, b = _independent_rows(A, b, "the polytope")
    C = np.vstack([A, G]) if len(G) else A
    d = np.concatenate([b, h])
    scale = float(
        max(
            1.0,
            np.abs(d).max(initial=0.0),
            np.abs(lo[np.isfinite(lo)]).max(initial=0.0),
            np.abs(up[np.isfinite(up)]).max(initial=0.0),
        )
    )
    # Bounds of w that the rows imply (valid constraints, so the barrier may use them); the sides
    # still unbounded get an artificial box.
    plo, pup = _implied_bounds(np.vstack([A, -A, G]), np.concatenate([b, -b, h]), lo[cols], up[cols])
    wl, wu = plo[nx:].copy(), pup[nx:].copy()
    art_lo, art_hi = ~np.isfinite(wl), ~np.isfinite(wu)
    width = AUX_BOX * scale
    free_w = art_lo & art_hi
    new_wl = np.where(free_w, -width, np.where(art_lo, wu - width, wl))
    new_wu = np.where(free_w, width, np.where(art_hi, wl + width, wu))
    wl, wu = new_wl, new_wu
    t = lambda a, dt=torch.float64: torch.as_tensor(np.ascontiguousarray(a), dtype=dt)
    return DualProblem(
        n=n,
        m_eq=len(A),
        Cx=t(C[:, :nx].reshape(len(C), nx)),
        Cw=t(C[:, nx:].reshape(len(C), len(w_free))),
        d=t(d),
        wl=t(wl),
        wu=t(wu),
        w_art_lo=t(art_lo, torch.bool),
        w_art_hi=t(art_hi, torch.bool),
        x_free=t(x_free, torch.long),
        x_fixed_value=t(value[:n]),
        scale=scale,
        xl=t(xl),
        xu=t(xu),
    )


def _implied_bounds(R, r, lo, up, passes: int = 8):
    """Tighten the bounds ``lo <= v <= up`` with the rows ``R v <= r`` (interval propagation)."""
    lo, up = lo.copy(), up.copy()
    if not len(R):
        return lo, up
    pos, neg = R > 0, R < 0
    for _ in range(passes):
        with np.errstate(invalid="ignore", over="ignore"):
            least = np.where(pos, R * lo, 0.0) + np.where(neg, R * up, 0.0)  # min of each term
        least = np.where(pos | neg, least, 0.0)
        infinite = ~np.isfinite(least)
        n_inf = infinite.sum(axis=1, keepdims=True)
        total = np.where(infinite, 0.0, least).sum(axis=1, keepdims=True)
        others = total - np.where(infinite, 0.0, least)  # the finite part of the other terms
        ok = (pos | neg) & ((n_inf - infinite) == 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            bound = (r[:, None] - others) / R
        new_up = np.where(ok & pos, bound, np.inf).min(axis=0)
        new_lo = np.where(ok & neg, bound, -np.inf).max(axis=0)
        tighter = (new_up < up - 1e-12) | (new_lo > lo + 1e-12)
        up, lo = np.minimum(up, new_up), np.maximum(lo, new_lo)
        if not tighter.any():
            break
    return lo, up


# ---------------------------------------------------------------------------------------------
# the conjugates: x = grad f*(v), D = f*''(v), and f*(v) summed
def _xlogx(x):
    return torch.where(x > 0, x * torch.log(x.clamp_min(1e-300)), torch.zeros_like(x))


def _primal_x(name, v, xl, xu):
    """x = argmax_{xl <= x <= xu} v x - f(x) (a clamp of grad f*), D = its derivative, and the mask
    of clamped coordinates.  ``name``: a built-in name, or a separable regularizer (its mirror map)."""
    if not isinstance(name, str):
        return name.mirror(v, xl, xu)
    if name == "entropy":
        x = torch.exp(v - 1.0)
        D = x
    elif name == "binary_entropy":
        x = torch.sigmoid(v)
        D = x * torch.sigmoid(-v)
    else:
        x, D = v, torch.ones_like(v)
    clamped = (x < xl) | (x > xu)
    x = torch.minimum(torch.maximum(x, xl), xu)
    return x, torch.where(clamped, torch.zeros_like(D), D), clamped


def _conjugate(name, v, x, clamped):
    """sum_j sup_{xl <= x_j <= xu} v_j x_j - f(x_j), given the maximizer x and the clamped mask."""
    if not isinstance(name, str):
        return name.conjugate(v, x)
    if name == "entropy":
        free = torch.exp(v - 1.0)
        f = _xlogx(x)
    elif name == "binary_entropy":
        free = torch.nn.functional.softplus(v)
        f = _xlogx(x) + _xlogx(1 - x)
    else:
        free = 0.5 * v * v
        f = 0.5 * x * x
    return torch.where(clamped, v * x - f, free).sum(-1)


def _aux(c, wl, wu, mu):
    """w(c) = argmax_{wl < w < wu} -c w + mu log(w - wl) + mu log(wu - w), its value and -dw/dc.

    ``c (B, nw)``, ``mu (B, 1)``.  With L = wu - wl and a = w - wl, stationarity is the quadratic
    c a^2 - (c L + 2 mu) a + mu L = 0, solved without cancellation for either sign of c.
    """
    L = wu - wl
    cL = c * L
    r = torch.sqrt(cL * cL + 4 * mu * mu)
    q = torch.where(cL >= 0, cL + r, 4 * mu * mu / (r - cL))  # cL + r, stably
    a = 2 * mu * L / (2 * mu + q)
    rest = L * q / (2 * mu + q)  # L - a
    w = wl + a
    value = -c * w + mu * torch.log(a) + mu * torch.log(rest)
    curvature = 1.0 / (mu / (a * a) + mu / (rest * rest))
    return w, value.sum(-1), curvature, a, rest


class _State:
    """The batched quantities at dual points ``nu (B, m)`` with slacks ``s (B, m_in)`` of the
    inequality rows: x(nu), w(nu), the dual gradient ``g = d - C [x; w]``, the residuals
    ``rp = g - (0, s)`` and ``rc = s y - mu``, the dual value Psi (without the y barrier) and the
    merit used by the line search."""

    def __init__(self, prob, name, z, nu, s, mu, sc):
        self.v = z - nu @ prob.Cx
        self.x, self.Dx, clamped = _primal_x(name, self.v, prob.xl, prob.xu)
        g = prob.d - self.x @ prob.Cx.T
        value = _conjugate(name, self.v, self.x, clamped) + (nu * prob.d).sum(-1)
        if prob.Cw.shape[1]:
            c = nu @ prob.Cw
            self.w, wvalue, self.Dw, self.a, self.rest = _aux(c, prob.wl, prob.wu, mu)
            g = g - self.w @ prob.Cw.T
            value = value + wvalue
        else:
            self.w = self.Dw = None
        self.g = g
        self.value = value
        if s is not None and s.shape[1]:
            y = nu[:, prob.m_eq :]
            self.rp = torch.cat([g[:, : prob.m_eq], g[:, prob.m_eq :] - s], dim=1)
            self.comp = (s * y - mu).abs().amax(-1) / sc[:, 0]
        else:
            self.rp = g
            self.comp = torch.zeros_like(value)
        self.residual = self.rp.abs().amax(-1) if self.rp.shape[1] else torch.zeros_like(value)
        self.merit = self.residual + self.comp


def _hessian(prob, state, nu, s, jitter):
    """The Newton matrix C_x D_x C_x^T + C_w D_w C_w^T + diag(0, s / y), plus a small jitter."""
    if prob.m == 0:  # no rows (a box, all of it in the conjugate's clamp)
        return nu.new_zeros(nu.shape[0], 0, 0)
    H = (prob.Cx * state.Dx[:, None, :]) @ prob.Cx.T if prob.Cx.shape[1] else None
    if state.Dw is not None:
        Hw = (prob.Cw * state.Dw[:, None, :]) @ prob.Cw.T
        H = Hw if H is None else H + Hw
    if H is None:
        H = nu.new_zeros(nu.shape[0], prob.m, prob.m)
    diag = torch.cat([nu.new_zeros(nu.shape[0], prob.m_eq), s / nu[:, prob.m_eq :]], dim=1)
    scale = H.diagonal(dim1=-2, dim2=-1).abs().amax(-1, keepdim=True).clamp_min(1e-300)
    return H + torch.diag_embed(diag + jitter * scale + 1e-14 * prob.row_scale)


def _cholesky(H):
    """Batched Cholesky factor of SPD matrices, with growing jitter where a factorization fails."""
    L, info = torch.linalg.cholesky_ex(H)
    extra = 1e-12
    while bool(info.any()) and extra < 1e-2:
        bad = info != 0
        scale = H.diagonal(dim1=-2, dim2=-1).abs().amax(-1).clamp_min(1e-300)
        eye = torch.eye(H.shape[-1], dtype=H.dtype, device=H.device)
        Hb = H[bad] + (extra * scale[bad])[:, None, None] * eye
        Lb, ib = torch.linalg.cholesky_ex(Hb)
        L = L.clone()
        L[bad] = Lb
        info = info.clone()
        info[bad] = ib
        extra *= 100
    return L


@dataclass
class FastSolution:
    """What :func:`solve` returns: ``x (B, n)`` (float64), the dual ``nu (B, m)``, ``status (B,)``
    (0 converged; see ``STATUS_NAMES``), ``iterations (B,)``, ``residual (B,)``, and the Cholesky
    factor ``chol (B, m, m)`` and curvature ``Dx (B, nx)`` at the solution for the backward."""

    x: torch.Tensor
    nu: torch.Tensor
    status: torch.Tensor
    iterations: torch.Tensor
    residual: torch.Tensor
    chol: torch.Tensor
    Dx: torch.Tensor


# ---------------------------------------------------------------------------------------------
# equality rows only: plain damped Newton on the smooth convex dual, with fewer operations per step
def _cached(prob, key, build):
    """A quantity derived from ``prob`` once (kept in the instance's ``__dict__``: the problem is
    cached per polytope and device, so this is computed once per polytope, regularizer and device)."""
    value = prob.__dict__.get(key)
    if value is None:
        value = prob.__dict__[key] = build()
    return value


def _unit_row_blocks(prob):
    """Blocks of equality rows whose coefficients on x are all 1 and whose supports are disjoint
    within a block (at most two blocks, found greedily in row order: the row sums and the column
    sums of a Birkhoff declaration, the groups of a one-per-group one).  Each block is
    ``(rows, C_block (k, nx), d_block (k,), support sizes (k,))`` on ``prob``'s device."""
    C = prob.Cx[: prob.m_eq].cpu()
    nonzero = C != 0
    unit = nonzero.any(-1) & ((~nonzero) | ((C - 1).abs() <= 1e-12)).all(-1)
    remaining = [i for i in range(C.shape[0]) if bool(unit[i])]
    blocks = []
    while remaining and len(blocks) < 2:
        used = torch.zeros(C.shape[1], dtype=torch.bool)
        block, rest = [], []
        for i in remaining:  # once per problem, on the CPU
            if bool((used & nonzero[i]).any()):
                rest.append(i)
            else:
                block.append(i)
                used |= nonzero[i]
        rows = torch.tensor(block, dtype=torch.long)
        Cb = prob.Cx[rows.to(prob.Cx.device)]
        blocks.append((rows.to(prob.Cx.device), Cb, prob.d[rows.to(prob.d.device)], Cb.sum(-1)))
        remaining = rest
    return blocks


def _disjoint_row_squares(prob):
    """``C_x * C_x`` where no two rows share a coordinate (the Newton matrix is then diagonal), else None."""
    nonzero = (prob.Cx != 0).to(prob.Cx.dtype)
    if prob.m == 0 or bool((nonzero.sum(0) > 1).any()):
        return None
    return prob.Cx * prob.Cx


def _equality_start(prob, name, zt, sc, tol):
    """A starting ``nu (B, m)`` for the equality rows, from the blocks of unit rows with disjoint
    supports (:func:`_unit_row_blocks`).  Any start is valid (the dual has no constraints here); a
    good one saves Newton steps of the full method, each costlier (a factorization and a line
    search), most of all for the entropy, where a row's multiplier from 0 is otherwise reached one
    unit of log x per step.

    Block after block, the multipliers of the block's rows are shifted to make those rows hold with
    the other multipliers fixed: for the entropy by a log-sum-exp, which is exact (one sweep with
    one block: one per group, a simplex; ``START_SWEEPS`` Sinkhorn sweeps with two: Birkhoff).
    Where one block holds every row (a k-subset), the binary entropy and the Euclidean regularizer
    take up to ``START_STEPS`` Newton steps per row from 0 (the Newton matrix is diagonal; for the
    Euclidean regularizer the curvature is the number of unclamped coordinates), safeguarded by a
    bracket of the row's root (a step that leaves it is replaced by the bracket's midpoint), until
    every row holds to the solver's tolerance ``tol (B,)``; the best point seen is returned.  With
    two blocks they take one sweep: the shift that would be exact if the row's coordinates were
    equal (the logit of the row mean) for the binary entropy, the shift exact when no coordinate is
    clamped for the Euclidean regularizer.  A shift is capped like the
    solver's steps (``STEP_CAP`` times the scale of z) and skipped where it is not finite.
    Cost: O(B m nx) per block and step, no factorization."""
    B = zt.shape[0]
    nu = zt.new_zeros(B, prob.m)
    blocks = _cached(prob, "_unit_row_blocks", lambda: _unit_row_blocks(prob))
    if not blocks or not isinstance(name, str):
        return nu
    v = zt.clone()
    cap = STEP_CAP * sc[:, None]
    tol = tol[:, None]

    def apply(delta, rows, Cb):
        nonlocal v
        delta = torch.where(torch.isfinite(delta), torch.clamp(delta, -cap, cap), torch.zeros_like(delta))
        nu[:, rows] += delta
        v = v - delta @ Cb

    if name == "entropy":
        sweeps = START_SWEEPS if len(blocks) > 1 else 1
    else:  # with one block, the safeguarded Newton steps below start from 0 (measured: no slower)
        sweeps = 1 if len(blocks) > 1 else 0
    for _ in range(sweeps):
        for rows, Cb, db, size in blocks:
            if name == "entropy":
                top = v.amax(-1, keepdim=True)
                delta = torch.log(torch.exp(v - top) @ Cb.T) + top - 1.0 - torch.log(db)
            elif name == "binary_entropy":
                delta = torch.logit((torch.sigmoid(v) @ Cb.T) / size) - torch.logit(db / size)
            else:
                delta = (torch.minimum(torch.maximum(v, prob.xl), prob.xu) @ Cb.T - db) / size
            apply(delta, rows, Cb)
    if name == "entropy" or len(blocks) > 1:
        return nu
    # one block holds every row (the Newton matrix is diagonal): Newton steps per row, safeguarded by a
    # bracket of the row's root (the row sum decreases in its multiplier): a step that leaves the
    # bracket is replaced by its midpoint; the best point seen is kept
    rows, Cb, db, size = blocks[0]
    v0 = v

    def row_residual(shift):
        v = v0 - shift @ Cb
        if name == "binary_entropy":
            x = torch.sigmoid(v)
            return x @ Cb.T - db, (x * torch.sigmoid(-v)) @ Cb.T
        x = torch.clamp(v, prob.xl, prob.xu)
        free = (x == v).to(v.dtype) @ Cb.T  # the curvature: the row's unclamped coordinates
        return x @ Cb.T - db, free.clamp_min(1.0)

    shift = torch.zeros_like(db).expand(B, -1)
    r, curvature = row_residual(shift)
    lo = torch.full_like(r, -math.inf)
    hi = torch.full_like(r, math.inf)
    best, best_abs = shift, r.abs()
    for _ in range(START_STEPS):
        lo = torch.where(r > 0, shift, lo)  # every point is inside the bracket, so it only shrinks
        hi = torch.where(r < 0, shift, hi)
        step = shift + torch.clamp(r / curvature, -cap, cap)
        # a step leaves the bracket only on a side other than the current point's, so both of its
        # ends are finite there and the midpoint is a number
        shift = torch.where((step > lo) & (step < hi), step, 0.5 * (lo + hi))
        r, curvature = row_residual(shift)
        r_abs = r.abs()
        better = r_abs < best_abs  # a NaN is never better
        best, best_abs = torch.where(better, shift, best), torch.where(better, r_abs, best_abs)
        if not bool((best_abs > tol).any()):  # all rows hold to the solver's tolerance
            break
    nu[:, rows] += best
    return nu


def _equality_eval(prob, kind, v, nu):
    """x(v), D = dx/dv, the dual gradient g = d - C_x x, Psi and max|g|, with v = z - C_x^T nu.
    ``kind``: "entropy" or "binary_entropy" without clamped bounds, "euclidean" (clamp), or the
    regularizer's ``name`` for the general closed forms (bounds inside the conjugate)."""
    if kind == "entropy":
        x = torch.exp(v - 1.0)
        D = x
        value = x.sum(-1)
    elif kind == "binary_entropy":
        x = torch.sigmoid(v)
        D = x * torch.sigmoid(-v)
        value = torch.nn.functional.softplus(v).sum(-1)
    elif kind == "euclidean":
        x = torch.clamp(v, prob.xl, prob.xu)
        D = (x == v).to(v.dtype)  # 0 where clamped
        value = (v * x - 0.5 * x * x).sum(-1)
    else:
        x, D, clamped = _primal_x(kind[1], v, prob.xl, prob.xu)
        value = _conjugate(kind[1], v, x, clamped)
    g = prob.d - x @ prob.Cx.T
    return x, D, g, value + nu @ prob.d, g.abs().amax(-1)


def _solve_equality(prob: DualProblem, name, Z: torch.Tensor, max_iter: int) -> FastSolution:
    """:func:`solve` where there are equality rows only (no inequality rows, no auxiliary
    variables): damped Newton on the smooth convex dual Psi(nu) = f*(z - C_x^T nu) + <d, nu>.

    The same method, stopping test and continuation as the general loop, arranged for fewer
    operations per step: a start from :func:`_equality_start` (on k-subsets and one per group it
    usually converges there, and no Newton step is taken); the trial point of the line search is
    evaluated once and becomes the next iterate (x, D, the gradient and Psi are not recomputed);
    the line search backtracks only for the elements whose first trial fails Armijo, and where
    the predicted decrease is below the rounding of Psi (``FLAT``) a step that halves the residual
    is accepted instead; full steps are extended by doubling for the two entropies only (for the
    piecewise quadratic Euclidean dual it measured slower); rows with disjoint supports give a
    diagonal Newton matrix (a division instead of a Cholesky factorization, here and in the
    backward); the closed forms skip the clamp where f's domain holds the bounds.  The returned
    ``chol`` is then the diagonal factor ``diag(sqrt(H))``."""
    B = Z.shape[0]
    dev, dt = Z.device, torch.float64
    all_free = _cached(prob, "_all_free", lambda: prob.x_free.numel() == prob.n)
    z = Z.to(dt) if all_free else Z.to(dt)[:, prob.x_free]
    zmax = z.abs().amax(-1) if z.shape[1] else z.new_zeros(B)
    if name == "entropy":
        t = torch.clamp(CONTINUATION_SCALE / zmax.clamp_min(1e-300), max=1.0)
    else:
        t = torch.ones_like(zmax)
    continuation = name == "entropy" and bool((t < 1.0).any())
    sc = torch.clamp(t * zmax, min=1.0)
    tol = prob.scale * torch.clamp(ROUNDING * zmax, min=TOLERANCE)
    stage_tol = STAGE_TOLERANCE * prob.scale
    close_tol = 1e-6 * prob.scale
    unclamped = _cached(
        prob, "_unclamped", lambda: not any(bool(torch.isfinite(b).any()) for b in (prob.xl, prob.xu) if b is not None)
    )
    if name == "euclidean" or (name in ("entropy", "binary_entropy") and unclamped):
        kind = name
    else:
        kind = ("general", name)
    row_scale = _cached(prob, "_row_scale", lambda: prob.row_scale)
    zt = z * t[:, None] if continuation else z
    nu = _equality_start(prob, name, zt, sc, tol)
    v = zt - nu @ prob.Cx
    x, D, g, value, res = _equality_eval(prob, kind, v, nu)
    status = torch.full((B,), STATUS_MAX_ITER, dtype=torch.long, device=dev)
    iterations = torch.zeros(B, dtype=torch.long, device=dev)
    active = torch.ones(B, dtype=torch.bool, device=dev)
    jitter = 1e-14

    # rows with disjoint supports (a k-subset, one per group, a simplex): the Newton matrix is diagonal
    row_squares = _cached(prob, "_disjoint_row_squares", lambda: _disjoint_row_squares(prob))

    def newton_matrix(D):
        """C_x D C_x^T plus the jitter of :func:`_hessian`: ``(B, m, m)``, or its diagonal ``(B, m)``
        where the rows have disjoint supports."""
        if row_squares is not None:
            H = D @ row_squares.T
            diag = H
        else:
            H = (prob.Cx * D[:, None, :]) @ prob.Cx.T
            diag = H.diagonal(dim1=-2, dim2=-1)
        diag += jitter * diag.amax(-1, keepdim=True).clamp_min(1e-300) + 1e-14 * row_scale
        return H

    def newton_solve(D, g):
        if row_squares is not None:
            return g / newton_matrix(D)
        return torch.cholesky_solve(g.unsqueeze(-1), _cholesky(newton_matrix(D))).squeeze(-1)

    def trial(a, step):
        tnu = nu + a[:, None] * step
        tv = zt - tnu @ prob.Cx
        return (tnu, tv) + _equality_eval(prob, kind, tv, tnu)

    def merge(mask, new, old):
        return tuple(torch.where(mask[:, None] if o.dim() == 2 else mask, n_, o) for n_, o in zip(new, old))

    for _ in range(max_iter):
        done = active & (res <= tol)
        if continuation:
            done = done & (t >= 1.0)
        status = torch.where(done, STATUS_CONVERGED, status)
        active = active & ~done
        if not bool(active.any()):
            break
        if continuation:
            grow = active & (t < 1.0) & (res <= stage_tol)
            if bool(grow.any()):
                ratio = torch.where(grow, torch.clamp(1.0 / t, max=10.0), torch.ones_like(t))
                nu = nu * ratio[:, None]
                t = t * ratio
                sc = torch.clamp(t * zmax, min=1.0)
                zt = z * t[:, None]
                v = zt - nu @ prob.Cx
                x, D, g, value, res = _equality_eval(prob, kind, v, nu)
        iterations = iterations + active.long()
        step = -newton_solve(D, g)
        slope = (g * step).sum(-1)
        # a step never moves an exponent by more than STEP_CAP times the current scale of z (the
        # Hessian is singular where every coordinate of a row is clamped, and the step then is huge)
        alpha = torch.clamp(STEP_CAP * sc / (step @ prob.Cx).abs().amax(-1), max=1.0)
        # where the predicted decrease is below the rounding of Psi, Armijo cannot see it
        flat = -slope <= FLAT * value.abs().clamp_min(1.0)
        current = (nu, v, x, D, g, value, res)

        def better(T, a):
            tval, tres = T[5], T[6]
            armijo = tval <= value + 1e-4 * a * slope
            # near the solution rounding hides the decrease of Psi: a smaller residual also counts
            close = (tres <= 0.5 * res) & ((res <= close_tol) | flat)
            return torch.isfinite(tval + tres) & (armijo | close)

        T = trial(alpha, step)
        accepted = better(T, alpha) & active
        pending = active & ~accepted
        if bool(pending.any()):
            for _ls in range(59):
                alpha = torch.where(accepted, alpha, alpha * 0.5)
                T2 = trial(alpha, step)
                ok = better(T2, alpha) & pending
                T = merge(ok, T2, T)
                accepted = accepted | ok
                pending = pending & ~ok
                if not bool(pending.any()):
                    break
        # Far from the solution the quadratic model of an exponential undershoots (one unit of log x per
        # step): where the full step was taken, try doubling it while Psi keeps decreasing.
        grow = accepted & (alpha >= 1.0) & (res > 1e-2 * prob.scale) & (name != "euclidean")
        if bool(grow.any()):
            best = T[5]
            a = torch.ones_like(t)
            for _ex in range(8):
                a = a * 2
                T2 = trial(a, step)
                improve = grow & torch.isfinite(T2[5] + T2[6]) & (T2[5] < best)
                best = torch.where(improve, T2[5], best)
                T = merge(improve, T2, T)
                grow = improve
                if not bool(grow.any()):
                    break
        stuck = active & ~accepted
        status = torch.where(stuck, STATUS_NOT_FINITE, status)
        active = active & ~stuck
        nu, v, x, D, g, value, res = merge(accepted, T, current)

    # x, D are those of nu (every evaluation computes v = z - C_x^T nu afresh); the factor for the
    # backward is taken at that point
    H = newton_matrix(D)
    L = torch.diag_embed(H.sqrt()) if row_squares is not None else _cholesky(H)
    if all_free:
        return FastSolution(x, nu, status, iterations, res, L, D)
    X = prob.x_fixed_value.to(dt).expand(B, -1).clone()
    X[:, prob.x_free] = x
    return FastSolution(X, nu, status, iterations, res, L, D)


def solve(prob: DualProblem, name: str, Z: torch.Tensor, max_iter: int = MAX_ITER) -> FastSolution:
    """Solve the relaxed problem for every row of ``Z (B, n)`` (float64, any device); see the module."""
    if prob.m and not prob.has_barrier:
        return _solve_equality(prob, name, Z, max_iter)
    B = Z.shape[0]
    dev, dt = Z.device, torch.float64
    z = Z.to(dt)[:, prob.x_free]
    m, m_eq = prob.m, prob.m_eq
    m_in = m - m_eq
    zmax = z.abs().amax(-1) if z.shape[1] else z.new_zeros(B)
    # continuation in the scale of z, only where an exponential can overflow
    if name == "entropy":
        t = torch.clamp(CONTINUATION_SCALE / zmax.clamp_min(1e-300), max=1.0)
    else:
        t = torch.ones_like(zmax)
    barrier = prob.has_barrier
    sc = torch.clamp(t * zmax, min=1.0)[:, None]
    mu = (MU_START if barrier else 0.0) * sc
    nu = torch.zeros(B, m, dtype=dt, device=dev)
    nu[:, m_eq:] = 1.0
    s = torch.ones(B, m_in, dtype=dt, device=dev)
    # the exponents z - C^T nu carry a rounding error of about eps |z|: the tolerance cannot be smaller
    tol = prob.scale * torch.clamp(ROUNDING * zmax, min=TOLERANCE)
    stage_tol = STAGE_TOLERANCE * prob.scale
    status = torch.full((B,), STATUS_MAX_ITER, dtype=torch.long, device=dev)
    iterations = torch.zeros(B, dtype=torch.long, device=dev)
    active = torch.ones(B, dtype=torch.bool, device=dev)
    jitter = 1e-14
    # Psi with Armijo where there is no barrier (equality rows only); the residual merit otherwise
    use_value = not barrier

    for _ in range(max_iter):
        if not bool(active.any()):
            break
        state = _State(prob, name, z * t[:, None], nu, s, mu, sc)
        final_mu = (mu <= MU_FINAL * sc * 1.0000001)[:, 0] | (not barrier)
        done = active & (t >= 1.0) & final_mu & (state.residual <= tol) & (state.comp <= tol)
        status = torch.where(done, STATUS_CONVERGED, status)
        active = active & ~done
        if not bool(active.any()):
            break
        # stages: grow t once centered; lower mu once the residual is of the order of mu
        changed = torch.zeros_like(active)
        grow = active & (t < 1.0) & (state.residual <= stage_tol)
        if bool(grow.any()):
            ratio = torch.where(grow, torch.clamp(1.0 / t, max=10.0), torch.ones_like(t))
            nu = nu * ratio[:, None]
            mu = mu * ratio[:, None]
            t = t * ratio
            sc = torch.clamp(t * zmax, min=1.0)[:, None]
            changed |= grow
        if barrier:
            centered = active & (t >= 1.0) & (state.residual <= torch.clamp(10 * mu[:, 0] / sc[:, 0], min=tol))
            if m_in:
                gap = (s * nu[:, m_eq:]).mean(-1, keepdim=True)
                target = torch.minimum(mu, gap) * MU_FACTOR
            else:
                target = mu * MU_FACTOR
            new_mu = torch.clamp(torch.where(centered[:, None], target, mu), min=MU_FINAL * sc)
            changed |= centered & (new_mu != mu)[:, 0]
            mu = new_mu
        if bool(changed.any()):
            state = _State(prob, name, z * t[:, None], nu, s, mu, sc)
        if m == 0:
            status = torch.where(active, STATUS_CONVERGED, status)
            break
        zt = z * t[:, None]
        iterations = iterations + active.long()
        H = _hessian(prob, state, nu, s, jitter)
        L = _cholesky(H)
        rhs = state.g
        if m_in:
            rhs = torch.cat([rhs[:, :m_eq], rhs[:, m_eq:] - mu / nu[:, m_eq:]], dim=1)
        step = -torch.cholesky_solve(rhs.unsqueeze(-1), L).squeeze(-1)
        slope = (rhs * step).sum(-1)
        # a step never moves an exponent by more than STEP_CAP times the current scale of z (the
        # Hessian is singular where every coordinate of a row is clamped, and the step then is huge)
        reach = (step @ prob.Cx).abs().amax(-1) if prob.Cx.shape[1] else torch.zeros_like(t)
        cap = STEP_CAP * sc[:, 0]
        alpha = torch.where(reach > cap, cap / reach, torch.ones_like(reach))
        ratio = torch.full_like(t, math.inf)
        if m_in:
            y, dy = nu[:, m_eq:], step[:, m_eq:]
            ds = (mu - s * y - s * dy) / y
            both_v = torch.cat([y, s], dim=1)
            both_d = torch.cat([dy, ds], dim=1)
            ratio = torch.where(both_d < 0, -both_v / both_d, torch.full_like(both_v, math.inf)).amin(-1)
            alpha = torch.minimum(alpha, 0.99 * ratio)
        else:
            ds = s

        def trial_state(a):
            tn = nu + a[:, None] * step
            tsl = s + a[:, None] * ds if m_in else s
            return tn, tsl, _State(prob, name, zt, tn, tsl, mu, sc)

        def better(ts, a):
            ok = torch.isfinite(ts.value) & torch.isfinite(ts.merit)
            if use_value:
                armijo = ts.value <= state.value + 1e-4 * a * slope
                # near the solution rounding hides the decrease of Psi: a smaller residual also counts
                close = (ts.residual <= 0.5 * state.residual) & (state.residual <= 1e-6 * prob.scale)
                return ok & (armijo | close)
            return ok & (ts.merit <= (1 - 1e-4 * a) * state.merit)

        accepted = ~active
        new_nu, new_s = nu, s
        for _ls in range(60):
            tn, tsl, ts = trial_state(alpha)
            ok = better(ts, alpha) & ~accepted
            new_nu = torch.where(ok[:, None], tn, new_nu)
            if m_in:
                new_s = torch.where(ok[:, None], tsl, new_s)
            accepted = accepted | ok
            if bool(accepted.all()):
                break
            alpha = torch.where(accepted, alpha, alpha * 0.5)
        # Far from the solution the quadratic model of an exponential undershoots (one unit of log x per
        # step): where the full step was taken, try doubling it while the merit keeps decreasing.
        full = active & (alpha >= 1.0) & accepted
        if bool(full.any()):
            measure = (lambda st: st.value) if use_value else (lambda st: st.merit)
            best = torch.where(full, measure(trial_state(torch.ones_like(t))[2]), torch.full_like(t, math.inf))
            a = torch.ones_like(t)
            grow = full & (state.residual > 1e-2 * prob.scale)
            for _ex in range(8):
                if not bool(grow.any()):
                    break
                a = a * 2
                grow = grow & (a < 0.99 * ratio)
                tn, tsl, ts = trial_state(a)
                improve = grow & torch.isfinite(ts.value) & torch.isfinite(ts.merit) & (measure(ts) < best)
                best = torch.where(improve, measure(ts), best)
                new_nu = torch.where(improve[:, None], tn, new_nu)
                if m_in:
                    new_s = torch.where(improve[:, None], tsl, new_s)
                grow = improve
        stuck = active & ~accepted
        status = torch.where(stuck, STATUS_NOT_FINITE, status)
        active = active & ~stuck
        nu = torch.where(active[:, None], new_nu, nu)
        if m_in:
            s = torch.where(active[:, None], new_s, s)
        bad = active & ~torch.isfinite(nu).all(-1)
        status = torch.where(bad, STATUS_NOT_FINITE, status)
        active = active & ~bad

    state = _State(prob, name, z * t[:, None], nu, s, mu, sc)
    L = _cholesky(_hessian(prob, state, nu, s, jitter)) if m else nu.new_zeros(B, 0, 0)
    if state.w is not None:
        near = ((state.a <= 1e-6 * (prob.wu - prob.wl)) & prob.w_art_lo) | (
            (state.rest <= 1e-6 * (prob.wu - prob.wl)) & prob.w_art_hi
        )
        status = torch.where((status == STATUS_CONVERGED) & near.any(-1), STATUS_AUX_BOX, status)
    x = prob.x_fixed_value.to(dt).expand(B, -1).clone()
    x[:, prob.x_free] = state.x
    return FastSolution(x, nu, status, iterations, state.residual, L, state.Dx)


class _Backward(torch.autograd.Function):
    """X = fast solution of Z; the VJP g -> D g - D C_x^T H^{-1} C_x D g (one batched solve)."""

    @staticmethod
    def forward(ctx, Z, X, prob, chol, Dx):
        ctx.save_for_backward(chol, Dx)
        ctx.prob = prob
        return X.clone()

    @staticmethod
    def backward(ctx, G):
        refuse_double_backward("the fast generic path")
        chol, Dx = ctx.saved_tensors
        prob = ctx.prob
        all_free = _cached(prob, "_all_free", lambda: prob.x_free.numel() == prob.n)
        g = G.to(torch.float64) if all_free else G.to(torch.float64)[:, prob.x_free]
        Dg = Dx * g
        if prob.m:
            r = Dg @ prob.Cx.T
            if not prob.has_barrier and prob.__dict__.get("_disjoint_row_squares") is not None:
                s = r / chol.diagonal(dim1=-2, dim2=-1).square()  # _solve_equality's diagonal factor
            else:
                s = torch.cholesky_solve(r.unsqueeze(-1), chol).squeeze(-1)
            Dg = Dg - Dx * (s @ prob.Cx)
        if all_free:
            return Dg.to(G.dtype), None, None, None, None
        grad = torch.zeros(G.shape, dtype=torch.float64, device=G.device)
        grad[:, prob.x_free] = Dg
        return grad.to(G.dtype), None, None, None, None


class FastRelaxation:
    """X_tau = argmax_{x in P} <Z, x> - f(x) for the built-in ``entropy``, ``binary_entropy`` and
    ``euclidean`` on a polytope with a linear declaration, by the batched dual barrier-Newton
    method of this module; differentiable (exact implicit backward).

    ``Z (B, *event_shape)`` on any device -> X of the same shape, dtype and device.  Elements
    that do not converge are re-solved through the cvxpylayers layer with a warning (a
    :class:`~sstcvx.SolverError` names an element that fails there too).  ``max_iter`` caps the
    Newton steps per element (a documented knob; the tests force a failure with it).
    """

    def __init__(self, P, regularizer, max_iter: int = MAX_ITER):
        from ..regularizers import SeparableRegularizer

        name = regularizer.name
        separable = isinstance(regularizer, SeparableRegularizer)
        if not separable and name not in FAST_REGULARIZERS:
            raise ValueError(
                f"regularizer: the fast generic solver serves {FAST_REGULARIZERS} and Regularizer.separable, got {name!r}"
            )
        self.polytope = P
        self.regularizer = regularizer
        self.name = name
        # what the solver's conjugate functions dispatch on: a built-in name or the separable regularizer
        self.kind = regularizer if separable else name
        self.max_iter = max_iter
        self.problem = build_dual_problem(P.linear_form(), self.kind)
        self._on_device: dict = {}

    def problem_on(self, device) -> DualProblem:
        key = str(device)
        prob = self._on_device.get(key)
        if prob is None:
            prob = self._on_device[key] = self.problem.to(device)
        return prob

    def solve(self, Z: torch.Tensor, max_iter: int | None = None) -> FastSolution:
        """The raw batched solution of ``Z (B, *event_shape)`` (no fallback, no autograd)."""
        prob = self.problem_on(Z.device)
        return solve(prob, self.kind, Z.detach().reshape(Z.shape[0], -1), max_iter or self.max_iter)

    def __call__(self, Z: torch.Tensor, solver_args: dict | None = None, max_iter: int | None = None) -> torch.Tensor:
        B = Z.shape[0]
        sol = self.solve(Z, max_iter)
        Zf = Z.reshape(B, -1)
        X = sol.x
        if torch.is_grad_enabled() and Z.requires_grad:
            X = _Backward.apply(Zf, X, self.problem_on(Z.device), sol.chol, sol.Dx)
        X = X.to(Z.dtype).reshape(Z.shape)
        failed = (sol.status != STATUS_CONVERGED).nonzero().flatten().tolist()
        if failed:
            X = self._fallback(Z, X, sol, failed, solver_args)
        return X

    def _fallback(self, Z, X, sol, failed, solver_args):
        from . import generic_relaxation

        layer = generic_relaxation(self.polytope, self.regularizer)
        rows = []
        for i in failed:  # normally none: one conic solve per element that did not converge
            status = STATUS_NAMES[int(sol.status[i])]
            try:
                row = layer(Z[i : i + 1], solver_args=solver_args)
            except SolverError as error:
                raise SolverError(
                    f"fast generic solver on {self.polytope.name} with regularizer {self.name!r}: batch element {i} "
                    f"did not converge ({status}, residual {float(sol.residual[i]):.2e} after "
                    f"{int(sol.iterations[i])} Newton steps), and the cvxpylayers fallback failed too ({error})",
                    element=i,
                    solver="fast",
                    status=status,
                ) from error
            warnings.warn(
                f"fast generic solver on {self.polytope.name} with regularizer {self.name!r}: batch element {i} did "
                f"not converge ({status}); solved through cvxpylayers instead",
                RuntimeWarning,
                stacklevel=3,
            )
            rows.append(row)
        index = torch.tensor(failed, device=X.device)
        return X.index_put((index,), torch.cat(rows).to(X.dtype))
