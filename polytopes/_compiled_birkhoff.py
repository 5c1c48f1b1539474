"""Numba kernels of the Birkhoff projection's CPU path (see :mod:`polytopes.birkhoff`).

Two kernels, each one compiled loop over the batch on one thread (no ``parallel=True``: the
benchmarks and the torch path they replace run on one thread), reading float64 C-contiguous
arrays and writing into preallocated outputs:

* :func:`newton_batch`: the forward, the semi-smooth Newton iteration on the full dual (u, v)
  of :func:`polytopes.birkhoff._birkhoff_newton`, element by element.  With
  Y = Z - u 1^T - 1 v^T and X = max(Y, 0), each step solves the generalised Newton system on the
  support S = {Y > -slack} (the grounded Laplacian of its bipartite graph after eliminating the
  row potentials, a dense n x n Cholesky solve, formed from the support's rows in
  O(sum of the squared row counts)), takes the full step when its largest residual does not grow
  or it decreases phi, and otherwise the exact minimiser of phi along the direction
  (:func:`_exact_step`, over the breakpoints in (0, 1]; the torch path searches exactly only up
  to n = 16 and quarters trial steps beyond, here the search is exact at every n).  It stops
  at marginals within the tolerance (as the torch path); since a step from the right support
  lands on the solution (phi is quadratic there), the last step is usually exact to rounding.
  Elements of large spread max(Z) - min(Z) take the same iteration by continuation in the
  scale of Z (the stages of :func:`polytopes.birkhoff._birkhoff_staged`).  Elements that miss
  the tolerance within the budget, or whose factorisation fails, are flagged for the caller
  (the staged torch solver takes them).
* :func:`support_vjp_batch`: the backward, :func:`polytopes.birkhoff._support_vjp`: the
  orthogonal projection of G onto the matrices supported on S = {X > 0} with zero row and
  column sums, one n x n Cholesky solve per element; an element whose factorisation fails is
  flagged (the caller takes :func:`polytopes.sinkhorn.sinkhorn_vjp` for it).

The tuning constants are arguments (not globals, which numba would freeze into its on-disk
cache), passed by :mod:`polytopes.birkhoff` from its own.  Cost per Newton step and per
backward: O(n^3 / 6) for the Cholesky factorisation, O(sum of the squared row counts of the
support) to form the system, O(n^2) passes, and no per-operation dispatch.  Precision:
float64 throughout.
"""

from __future__ import annotations

import math

import numba
import numpy as np

_EPS = float(np.finfo(np.float64).eps)

# The factorisation's inner products may be reordered (vectorised); NaN and inf keep their meaning.
_REASSOCIATE = {"reassoc", "contract"}

# status codes of newton_batch, per element
CONVERGED = 0
BUDGET = 1  # the tolerance not reached within the step budget
FACTORIZATION = 2  # a Cholesky factorisation failed (rounding on a nearly singular system)


@numba.njit(cache=True, nogil=True)
def _evaluate(Y, X, gu, gv):
    """X = max(Y, 0), gu = 1 - row sums, gv = 1 - column sums; returns (largest |g|, |X|^2)."""
    n = Y.shape[0]
    for j in range(n):
        gv[j] = 0.0
    square = 0.0
    for i in range(n):
        s = 0.0
        for j in range(n):
            x = Y[i, j]
            if not x > 0.0:
                x = 0.0
            X[i, j] = x
            s += x
            gv[j] += x
            square += x * x
        gu[i] = 1.0 - s
    err = 0.0
    for i in range(n):
        gv[i] = 1.0 - gv[i]
        a = abs(gu[i])
        if a > err:
            err = a
        a = abs(gv[i])
        if a > err:
            err = a
    return err, square


@numba.njit(cache=True, nogil=True, fastmath=_REASSOCIATE)
def _cholesky(A):
    """A (n, n) symmetric, its lower triangle overwritten by its Cholesky factor; False if not positive definite."""
    n = A.shape[0]
    for j in range(n):
        s = A[j, j]
        for k in range(j):
            s -= A[j, k] * A[j, k]
        if not s > 0.0:  # also catches NaN
            return False
        d = math.sqrt(s)
        A[j, j] = d
        for i in range(j + 1, n):
            s = A[i, j]
            for k in range(j):
                s -= A[i, k] * A[j, k]
            A[i, j] = s / d
    return True


@numba.njit(cache=True, nogil=True, fastmath=_REASSOCIATE)
def _cholesky_solve(L, x):
    """x <- (L L^T)^-1 x, L lower triangular (n, n)."""
    n = L.shape[0]
    for i in range(n):
        s = x[i]
        for k in range(i):
            s -= L[i, k] * x[k]
        x[i] = s / L[i, i]
    for i in range(n - 1, -1, -1):
        s = x[i]
        for k in range(i + 1, n):
            s -= L[k, i] * x[k]
        x[i] = s / L[i, i]


@numba.njit(cache=True, nogil=True)
def _sift_down(keys, first, second, root, size):
    """Restore the min-heap order of keys[:size] below ``root``, moving first and second along with the keys."""
    while True:
        child = 2 * root + 1
        if child >= size:
            return
        if child + 1 < size and keys[child + 1] < keys[child]:
            child += 1
        if not keys[child] < keys[root]:
            return
        keys[root], keys[child] = keys[child], keys[root]
        first[root], first[child] = first[child], first[root]
        second[root], second[child] = second[child], second[root]
        root = child


@numba.njit(cache=True, nogil=True)
def _exact_step(Y, D, breaks, jump_a, jump_b):
    """The t in [0, 1] minimising phi(t) = 1/2 |max(Y - t D, 0)|^2 + t sum(D) / n along D (n, n).

    phi'(t) = A + B t between the breakpoints t = Y_ij / D_ij where entries leave (D > 0) or
    enter (D < 0) the support.  Counted from t = 0+, where the entries with Y > 0, or Y = 0 and
    D < 0, are in the support: A = sum(D) / n - sum_in D Y, B = sum_in D^2; crossing a
    breakpoint adds |D| Y to A and -|D| D to B (the same pieces as
    :func:`polytopes.birkhoff._exact_step`, which counts from t = -infinity over all n^2
    breakpoints; only those in (0, 1] are taken here, usually a few).  They are crossed in
    order while phi' at the next one is negative (phi' is continuous and nondecreasing), and
    the root -A / B of the piece reached is clipped to [0, 1] (where B = 0 on it: 1 if phi' <= 0
    there, else 0).  ``breaks``, ``jump_a``, ``jump_b``: work arrays (n^2,).
    """
    n = Y.shape[0]
    total = 0.0
    A = 0.0
    B = 0.0
    m = 0
    for i in range(n):
        for j in range(n):
            d = D[i, j]
            y = Y[i, j]
            total += d
            if y > 0.0 or (y == 0.0 and d < 0.0):
                A -= d * y
                B += d * d
            if (d > 0.0 and y > 0.0 and y <= d) or (d < 0.0 and y < 0.0 and y >= d):
                breaks[m] = y / d  # in (0, 1]
                ad = abs(d)
                jump_a[m] = ad * y
                jump_b[m] = -ad * d
                m += 1
    A += total / n
    # cross the breakpoints in increasing order: a heap of them, popped one at a time (usually few are
    # crossed, and a heap compiles much faster than numpy's sort)
    for start in range(m // 2 - 1, -1, -1):
        _sift_down(breaks, jump_a, jump_b, start, m)
    while m > 0:
        if A + B * breaks[0] < 0.0:
            A += jump_a[0]
            B += jump_b[0]
        else:
            break
        m -= 1
        breaks[0], jump_a[0], jump_b[0] = breaks[m], jump_a[m], jump_b[m]
        _sift_down(breaks, jump_a, jump_b, 0, m)
    if B > 0.0:
        t = -A / B
    elif A > 0.0:
        t = 0.0
    else:
        t = 1.0
    return min(max(t, 0.0), 1.0)


# the entries of newton_batch's ``params`` (float64 array), set by polytopes.birkhoff from its constants
SUPPORT_SLACK = 0
SUPPORT_RIDGE = 1
SUPPORT_RIDGE_CAP = 2
NEWTON_RIDGE = 3
MERIT_SWITCH = 4
SPREAD_LIMIT = 5
FIRST_SPREAD = 6
SCALE_FACTOR = 7
STAGE_TOL = 8
N_PARAMS = 9


@numba.njit(cache=True, nogil=True)
def _newton(Y, X, tol, budget, params, work, gu, gv, vectors, support, breaks):
    """Newton steps on Y (n, n) in place until the residual is at most ``tol``; returns (err, steps, status).

    X (n, n) receives max(Y, 0) and gu, gv (n,) the gradient (1 - row sums, 1 - column sums).
    ``work`` (4, n, n), ``vectors`` (6, n), ``support`` (n,) int, ``breaks`` (3, n^2): work arrays.
    See :func:`newton_batch` for the step.
    """
    n = Y.shape[0]
    trial, X_trial, D, lap = work[0], work[1], work[2], work[3]
    gu_trial, gv_trial, counts = vectors[0], vectors[1], vectors[2]
    col_counts, dv, du = vectors[3], vectors[4], vectors[5]
    support_slack = params[SUPPORT_SLACK]
    err, square = _evaluate(Y, X, gu, gv)
    slack2 = 128 * n * n * _EPS * (0.5 * square + 1.0)
    step = 0
    while not err <= tol:  # (a NaN residual runs out the budget: never reported converged)
        if step == budget:
            return err, step, BUDGET
        # the support's counts, the right side, and the grounded Laplacian on the support (lower triangle)
        e = max(err, params[SUPPORT_RIDGE] / params[SUPPORT_RIDGE_CAP])
        far = e if e > 1.0 else 0.0
        ridge = params[SUPPORT_RIDGE] / e + params[NEWTON_RIDGE] * far * far
        for j in range(n):
            col_counts[j] = 0.0
            dv[j] = gv[j]
            for k in range(j + 1):
                lap[j, k] = 1.0
        for i in range(n):
            m = 0
            for j in range(n):
                if Y[i, j] > -support_slack:
                    support[m] = j
                    m += 1
                    col_counts[j] += 1.0
            counts[i] = max(m, 1)
            w = 1.0 / counts[i]
            wg = gu[i] * w
            for p in range(m):
                j = support[p]
                dv[j] -= wg
                for q in range(p + 1):
                    lap[j, support[q]] -= w  # support[q] <= j: the lower triangle
        for j in range(n):
            lap[j, j] += col_counts[j] + ridge
        if not _cholesky(lap):
            return err, step, FACTORIZATION
        _cholesky_solve(lap, dv)
        for i in range(n):
            s = gu[i]
            for j in range(n):
                if Y[i, j] > -support_slack:
                    s -= dv[j]
            du[i] = s / counts[i]
        total = 0.0
        for i in range(n):
            for j in range(n):
                E = du[i] + dv[j]
                D[i, j] = E
                total += E
                trial[i, j] = Y[i, j] + E
        err_trial, square_trial = _evaluate(trial, X_trial, gu_trial, gv_trial)
        step += 1
        ok = err_trial <= err
        if not ok:
            ok = (square_trial - square - (2.0 / n) * total <= slack2) and err >= params[MERIT_SWITCH]
        if ok:
            for i in range(n):
                gu[i] = gu_trial[i]
                gv[i] = gv_trial[i]
                for j in range(n):
                    Y[i, j] = trial[i, j]
                    X[i, j] = X_trial[i, j]
            err, square = err_trial, square_trial
            continue
        # the exact minimiser of phi along the direction -E
        for i in range(n):
            for j in range(n):
                D[i, j] = -D[i, j]
        t = _exact_step(Y, D, breaks[0], breaks[1], breaks[2])
        for i in range(n):
            for j in range(n):
                Y[i, j] -= t * D[i, j]
        err, square = _evaluate(Y, X, gu, gv)
    return err, step, CONVERGED


@numba.njit(cache=True, nogil=True)
def newton_batch(Z, tol, budget, stage_budget, params, X_out, err_out, steps_out, status_out):
    """Semi-smooth Newton on the full dual of the projection of each Z[b] (B, n, n) onto the Birkhoff polytope.

    Writes X_out (B, n, n) = max(Y, 0), err_out (B,) the largest |row or column sum - 1|,
    steps_out (B,) the Newton steps taken and status_out (B,) one of CONVERGED, BUDGET,
    FACTORIZATION; returns (the number of elements not CONVERGED, the most steps, the largest
    err of the converged elements).  An element converges when err <= tol + 16 n eps max|Z[b]|.  ``params``: the
    constants named by the indices above.

    Per element, as :func:`polytopes.birkhoff._birkhoff_newton`: Y starts at the projection of
    Z onto the affine hull (Z minus its row and column means plus its mean and 1 / n); each step
    forms, on S = {Y > -support_slack} with row counts r (at least 1) and column counts c, the
    grounded Laplacian 1 1^T + diag(c + ridge) - S^T diag(1 / r) S, ridge =
    support_ridge / e + newton_ridge (e where e > 1, else 0)^2 with e the residual (at least
    support_ridge / support_ridge_cap), solves it for dv with right side gv - S^T (gu / r),
    takes du = (gu - S dv) / r, and moves Y by E = du 1^T + 1 dv^T: the full step when the
    trial's residual does not grow, or when |X(1)|^2 - |X|^2 - 2 sum(E) / n <= slack (phi
    decreases up to rounding) with e >= merit_switch; else the exact line step.  At most
    ``budget`` steps.

    Elements whose spread max(Z) - min(Z) exceeds params[SPREAD_LIMIT] are solved by
    continuation instead, as :func:`polytopes.birkhoff._birkhoff_staged` (there on the reduced
    dual): the projections of Z / s for s from spread / params[FIRST_SPREAD] down to 1, divided
    by params[SCALE_FACTOR] per stage, the stages before the last to a residual of
    max(params[STAGE_TOL], tol); the state carries over as Y * (s / s_next) (the potentials
    scaled), and the steps of all stages count against ``stage_budget``.
    """
    batch, n = Z.shape[0], Z.shape[1]
    left, most_steps, largest_err = 0, 0, 0.0
    Y = np.empty((n, n))
    X = np.empty((n, n))
    work = np.empty((4, n, n))
    gu = np.empty(n)
    gv = np.empty(n)
    vectors = np.empty((6, n))
    row_mean = np.empty(n)
    col_mean = np.empty(n)
    support = np.empty(n, np.int64)
    breaks = np.empty((3, n * n))
    for b in range(batch):
        Zb = Z[b]
        high = Zb[0, 0]
        low = Zb[0, 0]
        for i in range(n):
            for j in range(n):
                z = Zb[i, j]
                if z > high:
                    high = z
                if z < low:
                    low = z
        element_tol = tol + 16 * n * _EPS * max(abs(high), abs(low))
        spread = high - low
        scale = 1.0
        steps_left = budget
        if spread > params[SPREAD_LIMIT]:
            scale = max(spread / params[FIRST_SPREAD], 1.0)
            steps_left = stage_budget
        # the start: Z / scale minus its row and column means plus its mean and 1 / n
        for j in range(n):
            col_mean[j] = 0.0
        for i in range(n):
            s = 0.0
            for j in range(n):
                s += Zb[i, j]
                col_mean[j] += Zb[i, j]
            row_mean[i] = s / n
        shift = 0.0
        for i in range(n):
            col_mean[i] /= n
            shift += row_mean[i]
        shift /= n
        for i in range(n):
            for j in range(n):
                Y[i, j] = (Zb[i, j] - row_mean[i] - col_mean[j] + shift) / scale + 1.0 / n
        steps = 0
        while True:
            final = scale == 1.0
            stage_tol = element_tol if final else max(params[STAGE_TOL], tol)
            err, used, status = _newton(Y, X, stage_tol, steps_left, params, work, gu, gv, vectors, support, breaks)
            steps += used
            steps_left -= used
            if final or status != CONVERGED:
                break
            following = max(scale / params[SCALE_FACTOR], 1.0)
            ratio = scale / following
            for i in range(n):
                for j in range(n):
                    Y[i, j] *= ratio
            scale = following
        for i in range(n):
            for j in range(n):
                X_out[b, i, j] = X[i, j]
        err_out[b] = err
        steps_out[b] = steps
        status_out[b] = status
        if status != CONVERGED:
            left += 1
        else:
            largest_err = max(largest_err, err)
        most_steps = max(most_steps, steps)
    return left, most_steps, largest_err


@numba.njit(cache=True, nogil=True)
def support_vjp_batch(X, G, ridge, out, failed):
    """The orthogonal projection of G[b] onto {D supported on S = {X[b] > 0}, zero row and column sums}.

    X (the support or X itself), G, out: (B, n, n); failed (B,): set to 1 where the Cholesky
    factorisation fails (out[b] not written), else 0; returns the number of failures.  As
    :func:`polytopes.birkhoff._support_vjp`: with r and c the row and column counts of S
    (r at least 1), a0 = (row sums of S * G) / r, b solves
    (1 1^T + diag(c + ridge) - S^T diag(1 / r) S) b = column sums of S * G - S^T a0, and the result
    is S * (G - a 1^T - 1 b^T) with a = a0 - S b / r.
    """
    batch, n = X.shape[0], X.shape[1]
    lap = np.empty((n, n))
    counts = np.empty(n)
    col_counts = np.empty(n)
    a0 = np.empty(n)
    rhs = np.empty(n)
    support = np.empty(n, np.int64)
    failures = 0
    for b in range(batch):
        Xb = X[b]
        Gb = G[b]
        for j in range(n):
            col_counts[j] = 0.0
            rhs[j] = 0.0
            for k in range(j + 1):
                lap[j, k] = 1.0
        for i in range(n):
            m = 0
            s = 0.0
            for j in range(n):
                if Xb[i, j] > 0.0:
                    support[m] = j
                    m += 1
                    s += Gb[i, j]
                    rhs[j] += Gb[i, j]
                    col_counts[j] += 1.0
            counts[i] = max(m, 1)
            w = 1.0 / counts[i]
            a0[i] = s * w
            for p in range(m):
                j = support[p]
                rhs[j] -= a0[i]
                for q in range(p + 1):
                    lap[j, support[q]] -= w
        for j in range(n):
            lap[j, j] += col_counts[j] + ridge
        if not _cholesky(lap):
            failed[b] = 1
            failures += 1
            continue
        failed[b] = 0
        _cholesky_solve(lap, rhs)
        for i in range(n):
            s = 0.0
            for j in range(n):
                if Xb[i, j] > 0.0:
                    s += rhs[j]
            a = a0[i] - s / counts[i]
            for j in range(n):
                if Xb[i, j] > 0.0:
                    out[b, i, j] = Gb[i, j] - a - rhs[j]
                else:
                    out[b, i, j] = 0.0
    return failures
