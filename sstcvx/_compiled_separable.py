"""The table part of the joint iteration of :func:`~sstcvx.separable._joint_sum`, per element, compiled by numba.

Problem: the start of the joint Newton iteration on (x, nu) for argmax {<z, x> - sum phi(x_i) : a <= x <= b,
sum x = total} on a bounded interval with a tabulated inverse of phi' (:class:`~sstcvx.separable._IntervalInfo`):
no evaluation of phi, only the cached tables.  Per row, in one compiled loop over the batch (one thread, no
``parallel``: the benchmarks run one thread), the steps of the torch code with its constants:

* the start in nu: :func:`~sstcvx.separable._barrier_start` towards one barrier end (a sort of the row and the
  water-filling log-sum-exp), else the middle of the total-th and next largest entries less phi'(c) (between
  two barriers) or the middle of the end slopes; clamped to the bracket [min z - phi'(c), max z - phi'(c)];
* :func:`~sstcvx.separable._surrogate_root`: Newton steps on nu (on log of the moving part where
  ``use_log``) with the tabulated x~, inside a bracket, bisection where a step leaves it, the multiplicity
  scaling where the table's interval can have a double root, the hand-off to the fine table;
* :meth:`~sstcvx.separable._IntervalInfo.refine` where the interval has a fine table: one Newton step on nu
  with the fine x~ on the coarse estimates' segments (found by arithmetic, its nodes being uniform in s);
* x clamped to [inner_a, inner_b], and the exact active set at the returned nu.

The coarse table is searched by bisection on its sorted slopes at a row's first lookup, then each
coordinate's segment is found by walking from the previous one (Newton steps move v by little); both give
``torch.searchsorted``'s (left) segment.

Differences from the torch code: its stopping rules are per row, where the torch code's are over the batch
(it steps every row until the largest residual of the sum is within tolerance, and hands off to the fine table
only when every row may): a row stops here as soon as its own sum is within tolerance, so that the start differs
from the torch code's by at most the table's precision; the exact joint steps that follow make the results
agree to their tolerance.  The fine table's segment of a coordinate comes from the s of its last coarse
evaluation (the torch code takes s(x) of that x, equal to rounding; a coordinate near a node takes either
neighbor's cubic, which agree there).  Sums over a row are taken in index order.

Cost per row: O(n log n) for the start's sort, then about SURROGATE_ITER passes of O(n) without allocation
(workspaces per call).
"""

from __future__ import annotations

import math

import numba
import numpy as np

TINY = np.finfo(np.float64).tiny

# kinds of table (the stretched coordinate s of the table's nodes)
_BOTH, _LOWER, _UPPER, _SINE = range(4)

# cf: the interval's and the call's numbers
(
    _A,
    _B,
    _GA,
    _GB,
    _GC,
    _INNER_A,
    _INNER_B,
    _TOTAL,
    _TOL,
    _HAND_OFF,
    _FINE_LO,
    _FINE_INVERSE_STEP,
    _OFFSET,
    _D_C,
    _ALPHA,
    _LOG_WIDTH,
    _SIGN,
) = range(17)
# ci: the integers
_KIND, _BARRIER_START, _K, _USE_LOG, _DOUBLE_ROOTS, _HAS_FINE, _MAX_ITER, _MULTIPLICITY_AFTER = range(8)


@numba.njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _x_of_s(kind, a, b, s):
    """x and dx/ds of the table's stretched coordinate (:meth:`~sstcvx.separable._IntervalInfo.x_of_s`, barrier
    kinds only)."""
    if kind == _BOTH:
        p = 1.0 / (1.0 + math.exp(-s))
        dp = p - p * p
        return p * (b - a) + a, dp * (b - a)
    if kind == _LOWER:
        e = math.exp(s)
        return (e + a if a != 0.0 else e), e
    e = math.exp(-s)
    return b - e, e


@numba.njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _evaluate(kind, a, b, row, v):
    """x~(v), dx~/dv and s on one row of a table (a cubic in v for s towards a barrier, a quadratic for x between
    finite-slope ends, where s is returned as x)."""
    t = v - row[0]
    if kind == _SINE:
        x = row[1] + (row[2] + row[3] * t) * t
        return x, row[2] + 2.0 * (row[3] * t), x
    c3t = row[4] * t
    s = row[1] + (row[2] + (row[3] + c3t) * t) * t
    dsdv = row[2] + 2.0 * ((row[3] + 1.5 * c3t) * t)
    x, dxds = _x_of_s(kind, a, b, s)
    return x, dxds * dsdv, s


@numba.njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _segment(bounds, v, index, first):
    """The first i with bounds[i] >= v (len(bounds) where none): a bisection over the table when ``first``,
    else over a range found by steps that double from ``index`` (a few comparisons where v moved by little)."""
    size = bounds.shape[0]
    if first:
        lo, hi = 0, size
    elif index < size and bounds[index] < v:  # the answer is above index
        lo, step = index + 1, 1
        hi = min(lo + step, size)
        while hi < size and bounds[hi - 1] < v:
            lo = hi
            step *= 2
            hi = min(lo + step, size)
    elif index > 0 and v <= bounds[index - 1]:  # below index
        hi, step = index - 1, 1
        lo = max(hi - step, 0)
        while lo > 0 and v <= bounds[lo]:
            hi = lo
            step *= 2
            lo = max(hi - step, 0)
    else:
        return index
    while lo < hi:
        mid = (lo + hi) >> 1
        if bounds[mid] < v:
            lo = mid + 1
        else:
            hi = mid
    return lo


@numba.njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _nu_step(x, slope, n, f, use_log):
    """The numerator of a Newton step on nu (:func:`~sstcvx.separable._nu_step`)."""
    if not use_log:
        return f
    moving = 0.0
    for i in range(n):
        if slope[i] > 0:
            moving += x[i]
    if moving > 0:
        return math.log(max(moving, TINY) / max(moving - f, TINY)) * moving
    return f


@numba.njit(cache=True, nogil=True, error_model="numpy")
def table_start(z, bounds, rows, fine, log_rest, cf, ci, nu_out, x_out, at_a_out, at_b_out, lo_out, hi_out):
    """The start of the joint iteration for every row of z (B, n): writes nu (B, 1), x (B, n) (clamped to
    [inner_a, inner_b], a and b on the active set), the masks of the coordinates at a and at b, and the bracket
    [min z - phi'(c), max z - phi'(c)] (B, 1) each.  ``bounds`` (R - 1,) and ``rows`` (R, 5 or 4): the coarse table;
    ``fine`` (F, 5): the fine table (unused unless ci[_HAS_FINE]); ``log_rest`` (n,): the barrier start's log R_m."""
    batch, n = z.shape
    kind = ci[_KIND]
    a, b = cf[_A], cf[_B]
    ga, gb, gc = cf[_GA], cf[_GB], cf[_GC]
    total, tol, hand_off = cf[_TOTAL], cf[_TOL], cf[_HAND_OFF]
    use_log = ci[_USE_LOG] != 0
    near = 1e-5 * max(1.0, abs(total))
    last_fine = fine.shape[0] - 1
    x = np.empty(n)
    slope = np.empty(n)
    s_of = np.empty(n)
    work = np.empty(n)
    index = np.zeros(n, dtype=np.int64)
    for e in range(batch):
        zr = z[e]
        z_min, z_max = zr[0], zr[0]
        for i in range(1, n):
            z_min = min(z_min, zr[i])
            z_max = max(z_max, zr[i])
        lo, hi = z_min - gc, z_max - gc
        lo_out[e, 0], hi_out[e, 0] = lo, hi
        # the start in nu
        if ci[_BARRIER_START]:
            # water-filling on the model of the distances to the barrier (see _barrier_start): the logits sorted
            # in decreasing order (insertion sort: n is small), their tails' log-sum-exp
            scale = cf[_SIGN] * cf[_ALPHA]
            for i in range(n):
                value = (zr[i] - gc) * scale
                j = i
                while j > 0 and work[j - 1] < value:
                    work[j] = work[j - 1]
                    j -= 1
                work[j] = value
            top = work[0]
            accumulated = 0.0
            for m in range(n - 1, -1, -1):
                accumulated += math.exp(work[m] - top)
                x[m] = accumulated  # x holds the tails' sums for now
            # the first m whose largest uncapped term stays under the cap (0 if none); a log per m tried
            tail = math.log(x[0]) + top
            chosen, chosen_tail = 0, tail
            for m in range(n):
                if m > 0:
                    tail = math.log(x[m]) + top
                if work[m] - tail + log_rest[m] <= cf[_LOG_WIDTH]:
                    chosen, chosen_tail = m, tail
                    break
            nu = (chosen_tail - log_rest[chosen] + math.log(cf[_D_C])) * (cf[_SIGN] / cf[_ALPHA])
        else:
            # the middle of the k-th and (k+1)-th largest entries, less the offset
            k = ci[_K]
            count = min(k + 1, n)
            for i in range(n):
                value = zr[i]
                j = min(i, count)
                while j > 0 and work[j - 1] < value:
                    if j < count:
                        work[j] = work[j - 1]
                    j -= 1
                if j < count:
                    work[j] = value
            nu = 0.5 * (work[k - 1] + work[count - 1]) - cf[_OFFSET]
        if nu < lo:
            nu = lo
        if nu > hi:
            nu = hi
        # the root of the table's sum (_surrogate_root), its own bracket
        s_lo, s_hi = lo, hi
        nu_x = nu
        previous = 0.0
        for iteration in range(ci[_MAX_ITER]):
            f = 0.0
            sum_slope = 0.0
            for i in range(n):
                v = zr[i] - nu
                index[i] = _segment(bounds, v, index[i], iteration == 0)
                x[i], slope[i], s_of[i] = _evaluate(kind, a, b, rows[index[i]], v)
                f += x[i]
                sum_slope += slope[i]
            nu_x = nu
            f -= total
            if abs(f) <= tol:
                break
            if f > 0:
                s_lo = nu
            if f < 0:
                s_hi = nu
            step = _nu_step(x, slope, n, f, use_log) / max(sum_slope, TINY)
            if hand_off >= 0 and abs(f) <= near:
                new = nu + step
                if s_lo <= new and new <= s_hi:
                    # every coordinate moves by at most hand_off in the fine table's s
                    small = True
                    size = abs(step)
                    for i in range(n):
                        if kind == _BOTH:
                            speed = slope[i] / (x[i] - a) + slope[i] / (b - x[i])
                        elif kind == _LOWER:
                            speed = slope[i] / (x[i] - a)
                        else:
                            speed = slope[i] / (b - x[i])
                        if not size * speed <= hand_off:
                            small = False
                            break
                    if small:
                        nu_x = new
                        break
            if ci[_DOUBLE_ROOTS]:
                if iteration > ci[_MULTIPLICITY_AFTER]:
                    ratio = step / previous
                    previous = step
                    if ratio > 0.3 and ratio < 0.8:
                        step = step / (1.0 - ratio)
                else:
                    previous = step
            new = nu + step
            nu = new if s_lo <= new and new <= s_hi else 0.5 * (s_lo + s_hi)
        nu = nu_x
        if ci[_HAS_FINE]:
            # refine: one Newton step on nu with the fine table on the coarse x's segments, x~ there
            fine_lo, inverse_step = cf[_FINE_LO], cf[_FINE_INVERSE_STEP]
            f = 0.0
            sum_slope = 0.0
            for i in range(n):
                # the segment of the coarse x's s (the torch code takes s(x), equal to rounding)
                position = math.floor((s_of[i] - fine_lo) * inverse_step) + 1.0
                if position >= last_fine:
                    index[i] = last_fine
                elif position > 0:
                    index[i] = int(position)
                else:
                    index[i] = 0
                x[i], slope[i], _ = _evaluate(kind, a, b, fine[index[i]], zr[i] - nu)
                f += x[i]
                sum_slope += slope[i]
            f -= total
            nu = nu + _nu_step(x, slope, n, f, use_log) / max(sum_slope, TINY)
            for i in range(n):
                x[i] = _evaluate(kind, a, b, fine[index[i]], zr[i] - nu)[0]
        nu_out[e, 0] = nu
        inner_a, inner_b = cf[_INNER_A], cf[_INNER_B]
        for i in range(n):
            v = zr[i] - nu
            below, above = v <= ga, v >= gb
            at_a_out[e, i], at_b_out[e, i] = below, above
            if below:
                x_out[e, i] = a
            elif above:
                x_out[e, i] = b
            else:
                x_out[e, i] = min(max(x[i], inner_a), inner_b)
