"""Compiled CPU kernels of the k-subset Gibbs marginals (``exp_family_entropy`` on ``KSubset``).

The marginals x_t = P(t in S) of the Gibbs law p(S) ~ exp<z, S> on the k-subsets S of n items,
and their backward H g (H = dx / dz, the Gibbs covariance, symmetric), for the rows where the
linear-space recurrences are exact (``polytopes.ksubset._linear_weights`` states the rule; the
kernel applies the same one).  Per row, with weights w = exp(max(z - max z, -floor)):

* forward messages P[t][j] = e_j(w_0 .. w_{t-1}), j = 0 .. k - 1, t = 0 .. n (a table of
  (n + 1) x k), by P[t + 1][j] = P[t][j] + w_t P[t][j - 1];
* backward messages R[i] = e_{k-1-i}(w_t .. w_{n-1}), one vector of k updated from t = n - 1 down
  to 0 (R[i] += w_t R[i + 1]), combined on the way with the table: item t's leave-one-out
  coefficient e_{k-1}(others) = sum_i P[t][i] R[i] (R taken before w_t joins it), its unnormalised
  marginal m_t = w_t e_{k-1}(others), and x = k m / sum m (k e_k = sum_t m_t).

The backward is the tangent of the same recurrences along g (dw = w g): the table and its tangent
dP are recomputed (cheaper than keeping B (n + 1) k entries from the forward), then one suffix
sweep with R and dR gives d e_{k-1}(others), dm = w (d others + g others) and
H g = (k / sum m) (dm - x sum(dm) / k).  Every sum of the forward has positive terms; all in
float64, with a * b + c contracted into fused multiply-adds (``fastmath={"contract"}``, no
reassociation): the results agree with the torch path to a few ulps.  Work per row: 3 n k
multiply-adds forward, 8 n k backward; scratch (n + 1) k per row of a block (twice backward).

Layout: the rows are processed in blocks of up to ``LANES`` rows held side by side (tables of
shape (n + 1, k, lanes)), so that every step of the recurrences is a loop over the rows of the
block, which LLVM vectorises (a loop over the degrees j would be short, and its dot product a
chain of dependent additions).  The kernels run on one thread (no ``parallel=True``: the
benchmarks and the torch paths they replace run on one thread).  Rows that do not qualify are
marked and left to the caller (the log-space route).
"""

from __future__ import annotations

import numba
import numpy as np

#: Rows per block: the recurrences run as loops over the rows of a block (vectorised).
LANES = 32
#: Fewer rows per block where a table (n + 1, k, rows) would exceed this many entries (32 MB).
TABLE_ENTRIES = 1 << 22


@numba.njit(cache=True, nogil=True)
def _lanes(B, n, k):  # pragma: no cover - compiled
    """Rows per block: LANES, or fewer for a small batch or a table above TABLE_ENTRIES entries."""
    return max(1, min(B, LANES, TABLE_ENTRIES // ((n + 1) * k)))


@numba.njit(cache=True, nogil=True, fastmath={"contract"})
def gibbs_forward(z, k, span, floor):  # pragma: no cover - compiled
    """(x, state, count): the marginals x (B, n) of the rows of z (B, n) that qualify, the backward's state.

    z: float64 (B, n) C-contiguous; k: subset size (1 <= k <= n - 1); span, floor: the qualification
    depth and the weight floor of ``_linear_weights``.  state (B, 2 n + 2) holds per row the weights w
    (columns :n), e_{k-1} of the other items' weights (n:2n), k / sum m (2n) and 1.0 where the row
    qualifies, 0.0 where not (2n + 1); count: the rows that do not qualify (fewer than k entries
    within span of the maximum), whose x and state are left unset.
    """
    B, n = z.shape
    x = np.empty((B, n))
    state = np.empty((B, 2 * n + 2))
    w, others, scale, linear = state[:, :n], state[:, n : 2 * n], state[:, 2 * n], state[:, 2 * n + 1]
    count_log = 0
    L = _lanes(B, n, k)
    wl = np.empty((n, L))
    ol = np.empty((n, L))
    P = np.empty((n + 1, k, L))
    R = np.empty((k, L))
    acc = np.empty(L)
    total = np.empty(L)
    for start in range(0, B, L):
        for l in range(L):
            b = start + l
            if b >= B:  # padding lanes of the last block: finite weights, results dropped
                for t in range(n):
                    wl[t, l] = 1.0
                continue
            top = z[b, 0]
            for t in range(1, n):
                top = max(top, z[b, t])
            count = 0
            for t in range(n):
                if z[b, t] - top >= -span:
                    count += 1
            linear[b] = 1.0 if count >= k else 0.0
            count_log += count < k
            for t in range(n):
                wl[t, l] = np.exp(max(z[b, t] - top, -floor))
        # forward messages: P[t, j] = e_j(w_0 .. w_{t-1})
        P[0] = 0.0
        P[0, 0] = 1.0
        for t in range(n):
            wt, src, dst = wl[t], P[t], P[t + 1]
            dst[0] = 1.0
            for j in range(1, k):
                d, a, c = dst[j], src[j], src[j - 1]
                for l in range(L):
                    d[l] = a[l] + wt[l] * c[l]
        # backward messages: R[i] = e_{k-1-i}(w_{t+1} .. w_{n-1}), combined with P[t] on the way
        R[:] = 0.0
        R[k - 1] = 1.0
        total[:] = 0.0
        for t in range(n - 1, -1, -1):
            wt, Pt, ot = wl[t], P[t], ol[t]
            acc[:] = 0.0
            for i in range(k):
                p, r = Pt[i], R[i]
                for l in range(L):
                    acc[l] += p[l] * r[l]
            for l in range(L):
                ot[l] = acc[l]
                total[l] += wt[l] * acc[l]
            for i in range(k - 1):
                r, r1 = R[i], R[i + 1]
                for l in range(L):
                    r[l] += wt[l] * r1[l]
        for l in range(min(L, B - start)):
            b = start + l
            if linear[b] != 0.0:
                s = k / total[l]
                scale[b] = s
                for t in range(n):
                    w[b, t] = wl[t, l]
                    others[b, t] = ol[t, l]
                    x[b, t] = wl[t, l] * ol[t, l] * s
    return x, state, count_log


@numba.njit(cache=True, nogil=True, fastmath={"contract"})
def gibbs_hvp(state, g, k):  # pragma: no cover - compiled
    """out (B, n) with out[b] = H_b g[b] for the qualifying rows, H_b the Gibbs covariance of row b.

    state: what :func:`gibbs_forward` returned (the marginals x = w others scale are recomputed from
    it, so an output the caller changed in place is not read); g: float64 (B, n) C-contiguous.  The
    rows that do not qualify are left unset.
    """
    B, n = g.shape
    out = np.empty((B, n))
    w, others, scale, linear = state[:, :n], state[:, n : 2 * n], state[:, 2 * n], state[:, 2 * n + 1]
    L = _lanes(B, n, k)
    wl = np.empty((n, L))
    dwl = np.empty((n, L))
    dml = np.empty((n, L))
    P = np.empty((n + 1, k, L))
    dP = np.empty((n + 1, k, L))
    R = np.empty((k, L))
    dR = np.empty((k, L))
    acc = np.empty(L)
    for start in range(0, B, L):
        for l in range(L):
            b = start + l
            if b >= B or linear[b] == 0.0:  # padding lanes, rows of the log-space route: finite, dropped
                for t in range(n):
                    wl[t, l] = 1.0
                    dwl[t, l] = 0.0
                    dml[t, l] = 0.0
                continue
            for t in range(n):
                wl[t, l] = w[b, t]
                dwl[t, l] = w[b, t] * g[b, t]
                dml[t, l] = dwl[t, l] * others[b, t]  # the term dw_t e_{k-1}(others) of dm_t
        P[0] = 0.0
        P[0, 0] = 1.0
        dP[0] = 0.0
        for t in range(n):
            wt, dwt, src, dst, dsrc, ddst = wl[t], dwl[t], P[t], P[t + 1], dP[t], dP[t + 1]
            dst[0] = 1.0
            ddst[0] = 0.0
            for j in range(1, k):
                d, a, c = dst[j], src[j], src[j - 1]
                dd, da, dc = ddst[j], dsrc[j], dsrc[j - 1]
                for l in range(L):
                    d[l] = a[l] + wt[l] * c[l]
                    dd[l] = da[l] + wt[l] * dc[l] + dwt[l] * c[l]
        R[:] = 0.0
        R[k - 1] = 1.0
        dR[:] = 0.0
        for t in range(n - 1, -1, -1):
            wt, dwt, Pt, dPt, dmt = wl[t], dwl[t], P[t], dP[t], dml[t]
            acc[:] = 0.0
            for i in range(k):
                p, dp, r, dr = Pt[i], dPt[i], R[i], dR[i]
                for l in range(L):
                    acc[l] += dp[l] * r[l] + p[l] * dr[l]
            for l in range(L):
                dmt[l] += wt[l] * acc[l]
            for i in range(k - 1):
                r, r1, dr, dr1 = R[i], R[i + 1], dR[i], dR[i + 1]
                for l in range(L):
                    dr[l] += wt[l] * dr1[l] + dwt[l] * r1[l]
                    r[l] += wt[l] * r1[l]
        for l in range(min(L, B - start)):
            b = start + l
            if linear[b] != 0.0:
                s = scale[b]
                mean = 0.0
                for t in range(n):
                    mean += dml[t, l]
                mean /= k
                for t in range(n):
                    out[b, t] = s * (dml[t, l] - w[b, t] * others[b, t] * s * mean)
    return out
