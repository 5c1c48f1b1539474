"""The interior-point iteration of :mod:`~sstcvx.generic.interior_point` per element, compiled by numba.

Problem and algorithm: those of :mod:`~sstcvx.generic.interior_point` (start with per-element multiplier
scaling and the central start, Mehrotra's predictor-corrector with sigma = (mu_aff / mu)^3 and its target
floor, the proximal weight on the auxiliary variables, the fraction to the boundary max(FRACTION, 1 - mu),
the stop test, statuses and iteration counts), on the same state layout ``[v | lambda | y | zl, zu | s |
sl, su]``, element by element in one compiled loop over the batch instead of batched tensor operations
(whose dispatch, a few microseconds per operation and about a hundred operations per iteration, is most
of the torch code's time at small sizes).  The kernels write the final states, phi'' / sz where each
element stopped, statuses, iteration counts and residuals; :func:`~sstcvx.generic.interior_point.solve`
then factors the Newton system at the returned point in torch for the unchanged backward.

Newton systems, per element and iteration:

* the dense normal matrix ``M = C Phi^-1 C^T + diag(0, s / y)`` (m x m), assembled from C's columns,
  equilibrated to a unit diagonal plus the torch code's jitter and factored by a dense Cholesky (with
  the torch code's growing jitter where it fails);
* where the torch code takes the primal reduction and every inequality row holds at most one auxiliary
  column and every auxiliary column lies in at most one inequality row (the capacity rows of a flow
  formulation), the same reduction ``H = Phi + G^T diag(y / s) G`` with its diagonal w block eliminated
  exactly: ``Sx = Phi_x + sum_rows (y/s) Phi_w / (Phi_w + (y/s) g_w^2) g_x g_x^T`` (nx x nx), and the
  equality rows' Schur complement ``K = A H^-1 A^T`` (m_eq x m_eq), both factored densely; for the first
  ``PRIMAL_ITERATIONS`` iterations, then M (as the torch code).

Entry point: :func:`iterate` runs the whole iteration for the built-in entropies (phi', phi'' in closed
form, from the bound slacks where a bound is the domain's end, as the torch code) and for a user's separable
regularizer's table (:mod:`~sstcvx.generic.derivative_table`: one row of cubic coefficients per segment,
the segment found by arithmetic in the table's coordinate), or one iteration on the still-running elements
with a user's phi', phi'' that the caller (:func:`run`) evaluates in torch between calls (the exact
iteration after the table's, or the whole iteration where there is no table).  :func:`table_gap` measures
the table against phi' where the exact iteration starts.  One thread (no ``parallel``: the benchmarks run one
thread).

Differences from the torch code: the reductions' order of summation (results agree to the solver's
tolerance, not bitwise); the stop pre-test is per element (the torch code runs the full test on every
element once some element's mean complementarity is low or NaN: an element's own test can pass only then,
but one whose residual is not finite while its mean complementarity is not stops here at its own next NaN,
there possibly earlier); on the primal reduction, directions differ in the last digits (the w block is
eliminated exactly, the torch factorization of H cancels digits), iteration counts by a few.

Cost per element-iteration: O(nnz(M) + m^3 / 3) with M, or O(nx^3 / 3 + m_eq^2 nx + m_eq^3 / 3 + nnz(C))
with the reduction, without allocation (workspaces per call).
"""

from __future__ import annotations

import math

import numba
import numpy as np
import torch

from . import derivative_table

EPS4 = 4 * np.finfo(np.float64).eps

# dims: the problem's integers
_N, _NX, _M, _MEQ, _KIND, _PRIMAL_ITERS, _MAX_ITER, _ALL_PAIRS, _NW, _TAB_MAP = range(10)
# cf: the problem's and the algorithm's numbers
(
    _SCALE,
    _PAIRS_EXIST,
    _TOL,
    _MU_TOL,
    _PROXIMAL,
    _PROXIMAL_DELAY,
    _FRACTION,
    _FRACTION_GAP,
    _DOM_LO,
    _DOM_HI,
    _JITTER,
    _TAB_A,
    _TAB_B,
    _TAB_S_LO,
    _TAB_INV_STEP,
    _TAB_SLOPE_A,
    _TAB_SLOPE_B,
    _TAB_POWER,
) = range(18)
#: the kinds of derivatives: the built-in entropies (computed here), given per iteration (a user's phi), a table
KIND_ENTROPY, KIND_BINARY_ENTROPY, KIND_GIVEN, KIND_TABLE = range(4)
#: the table's maps and smallest distance to an end (:mod:`~sstcvx.generic.derivative_table`'s, checked by
#: :func:`run`: a kernel reads only its own file's constants)
MAP_SIGMOID, MAP_LOWER, MAP_UPPER, MAP_SINE = range(4)
TINY = 1e-300


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _cholesky_in_place(M, n):
    """Lower Cholesky factor of M[:n, :n] (its lower triangle) in place, with the reciprocals of its diagonal on
    the diagonal (the solves multiply: a division's latency is on their critical path); False where a pivot is
    not positive."""
    for j in range(n):
        s = M[j, j]
        for k in range(j):
            s -= M[j, k] * M[j, k]
        if not s > 0.0:
            return False
        r = 1.0 / math.sqrt(s)
        M[j, j] = r
        for i in range(j + 1, n):
            t = M[i, j]
            for k in range(j):
                t -= M[i, k] * M[j, k]
            M[i, j] = t * r
    return True


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _factor(M, n, q, copy, jitter):
    """Equilibrate M[:n, :n] (lower triangle) to a unit diagonal (``q = 1 / sqrt(diag M)`` kept), add ``jitter``,
    factor in place (:func:`_cholesky_in_place`); where that fails, retry with a growing jitter (1e-12 .. 1e-4
    times the largest diagonal entry, as the torch code's Cholesky); a factor of NaN where every try fails (the
    element then stops as not finite)."""
    for i in range(n):
        q[i] = 1.0 / math.sqrt(max(M[i, i], 1e-300))
    for i in range(n):
        for j in range(i + 1):
            M[i, j] = M[i, j] * (q[i] * q[j])
        M[i, i] += jitter
    for i in range(n):
        for j in range(i + 1):
            copy[i, j] = M[i, j]
    if _cholesky_in_place(M, n):
        return
    top = 1e-300
    for i in range(n):
        top = max(top, abs(copy[i, i]))
    extra = 1e-12
    while extra < 1e-2:
        for i in range(n):
            for j in range(i + 1):
                M[i, j] = copy[i, j]
            M[i, i] += extra * top
        if _cholesky_in_place(M, n):
            return
        extra *= 100.0
    for i in range(n):
        for j in range(i + 1):
            M[i, j] = math.nan


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _factor_solve(L, q, n, r):
    """Solve M x = r in place with :func:`_factor`'s factor of M."""
    for i in range(n):
        r[i] *= q[i]
    for i in range(n):
        t = r[i]
        for k in range(i):
            t -= L[i, k] * r[k]
        r[i] = t * L[i, i]
    for i in range(n - 1, -1, -1):
        t = r[i]
        for k in range(i + 1, n):
            t -= L[k, i] * r[k]
        r[i] = t * L[i, i]
    for i in range(n):
        r[i] *= q[i]


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _h_solve(nx, nw, Sx, qx, g_rw, g_rwv, g_rxn, g_rx, g_rxv, Dr, w_row, Dw, r, out, tmp):
    """out = H^-1 r with H = Phi + G^T diag(Dr) G whose w block is diagonal (``Dw``: the reciprocals of its
    entries): the x block through the factor of its Schur complement Sx, then w."""
    rw, outw = r[nx:], out[nx:]  # (zero-based views: see _iterate)
    for i in range(nx):
        tmp[i] = r[i]
    for rr in range(g_rw.shape[0]):
        jw = g_rw[rr]
        if jw >= 0:
            t = Dr[rr] * g_rwv[rr] * rw[jw] * Dw[jw]
            for a in range(g_rxn[rr]):
                tmp[g_rx[rr, a]] -= t * g_rxv[rr, a]
    _factor_solve(Sx, qx, nx, tmp)
    for i in range(nx):
        out[i] = tmp[i]
    for j in range(nw):
        t = rw[j]
        rr = w_row[j]
        if rr >= 0:
            gx = 0.0
            for a in range(g_rxn[rr]):
                gx += g_rxv[rr, a] * tmp[g_rx[rr, a]]
            t -= Dr[rr] * g_rwv[rr] * gx
        outw[j] = t * Dw[j]


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _workspace(dims):
    """The per-element work arrays (allocated once per kernel call)."""
    N, nx, m, m_eq, nw = dims[_N], dims[_NX], dims[_M], dims[_MEQ], dims[_NW]
    mi = m - m_eq
    P = mi + 2 * N
    W = N + m_eq + 2 * P
    one = max(m_eq, 1)
    fl = (
        np.empty(W),  # 0 dT
        np.empty(W),  # 1 dA (predictor)
        np.empty(N),  # 2 rd
        np.empty(max(m, 1)),  # 3 rp
        np.empty(P),  # 4 SY
        np.empty(N),  # 5 phi_inv
        np.empty(N),  # 6 phi
        np.empty(max(mi, 1)),  # 7 r0 = s / y
        np.empty(2 * N),  # 8 r1b = [zl / sl | zu / su]
        np.empty(P),  # 9 rc
        np.empty(2 * N),  # 10 rcb
        np.empty(max(mi, 1)),  # 11 rcy
        np.empty(N),  # 12 r1
        np.empty(N),  # 13 u
        np.empty(max(m, 1)),  # 14 rhs / q of M
        np.empty(N),  # 15 dv
        np.empty(max(nw, 1)),  # 16 Dw
        np.empty(max(mi, 1)),  # 17 Dr
        np.empty(max(mi, 1)),  # 18 rows_in
        np.empty(N),  # 19 tmp
        np.empty(N),  # 20 tmp2
        np.empty(one),  # 21 tl
        np.empty(max(m, 1)),  # 22 q (M)
        np.empty(max(nx, 1)),  # 23 qx
        np.empty(one),  # 24 qk
        np.empty(2 * P),  # 25 1 / [Y | S]
    )
    mats = (
        np.empty((max(m, 1), max(m, 1))),  # 0 M
        np.empty((max(m, nx, 1), max(m, nx, 1))),  # 1 copy for retries
        np.empty((max(nx, 1), max(nx, 1))),  # 2 Sx
        np.empty((one, one)),  # 3 K
        np.empty((one, max(nx, 1))),  # 4 E
    )
    return fl, mats


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _table_point(x, cf, mp, tab):
    """The table's (phi'(x), phi''(x)) (:class:`~sstcvx.generic.derivative_table.DerivativeTable`, map ``mp``,
    its numbers in ``cf``, rows ``tab``), by the arithmetic of its ``derivatives``, and whether x lies between
    its first and last node (where its error was measured); NaN at a NaN x."""
    if not x == x:
        return math.nan, math.nan, False
    a, b = cf[_TAB_A], cf[_TAB_B]
    s_lo, inv_step = cf[_TAB_S_LO], cf[_TAB_INV_STEP]
    if mp == MAP_SINE:
        # the sine map's tangent lines beyond an end that is only a bound
        slope = cf[_TAB_SLOPE_A]
        if x < a and slope == slope:
            return tab[0, 0] + slope * (x - a), slope, False
        slope = cf[_TAB_SLOPE_B]
        if x > b and slope == slope:
            last = tab.shape[0] - 1
            return tab[last, 0] + tab[last, 1] + tab[last, 2] + tab[last, 3] + slope * (x - b), slope, False
    da = max(x - a, TINY)
    db = max(b - x, TINY)
    if mp == MAP_SIGMOID:
        s = math.log(da) - math.log(db)
        dx = da * db / (da + db)
    elif mp == MAP_LOWER:
        s = math.log(da)
        dx = da
    elif mp == MAP_UPPER:
        s = -math.log(db)
        dx = db
    elif cf[_TAB_POWER] == 1.0:
        sa, sb = math.sqrt(da), math.sqrt(db)
        s = math.atan2(sa, sb) * (2.0 / math.pi)
        dx = math.pi * sa * sb
    else:  # x = a + w sin^(2p)(pi s / 2): q = sin^2 = (da / w)^(1/p) from the nearer end's distance
        power = cf[_TAB_POWER]
        w = da + db
        if da <= db:
            q = math.exp(math.log(da / w) / power)
            rest = 1.0 - q
        else:
            rest = -math.expm1(math.log1p(-db / w) / power)
            q = 1.0 - rest
        sin, cos = math.sqrt(q), math.sqrt(rest)
        s = math.atan2(sin, cos) * (2.0 / math.pi)
        dx = power * math.pi * da / sin * cos  # w p pi sin^(2p - 1) cos, with sin^(2p) = da / w
    p = (s - s_lo) * inv_step
    last = tab.shape[0] - 1
    i = int(min(max(math.floor(p), 0.0), float(last)))
    t = p - i
    ti = min(max(t, 0.0), 1.0)  # linear beyond the first and the last node
    c0, c1, c2, c3 = tab[i, 0], tab[i, 1], tab[i, 2], tab[i, 3]
    dG = c1 + ti * (2.0 * c2 + 3.0 * ti * c3)
    G = c0 + ti * (c1 + ti * (c2 + ti * c3)) + (t - ti) * dG
    return G, dG * inv_step / dx, t == ti


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _own_derivatives(T, g, h, sz, dims, cf, at_lo, at_hi, tab):
    """phi'(x) / sz and phi''(x) / sz into ``g, h``: of the built-in entropies (x log x, the binary entropy), the
    distances to the domain's ends from the bound slacks where the bound is the end; or of a user's phi from its
    table ``tab`` (at x itself, as the torch code evaluates a user's phi)."""
    N, nx, m, m_eq, kind = dims[_N], dims[_NX], dims[_M], dims[_MEQ], dims[_KIND]
    if kind == KIND_TABLE:
        mp = dims[_TAB_MAP]
        for j in range(nx):
            G, H, _ = _table_point(T[j], cf, mp, tab)
            g[j] = G / sz
            h[j] = H / sz
        return
    mi = m - m_eq
    o = N + m_eq + 2 * (mi + 2 * N) - 2 * N  # where the bound slacks [sl | su] start
    dom_lo, dom_hi = cf[_DOM_LO], cf[_DOM_HI]
    for j in range(nx):
        a = T[o + j] if at_lo[j] else T[j] - dom_lo
        if kind == KIND_ENTROPY:
            g[j] = (math.log(a) + 1.0) / sz
            h[j] = (1.0 / a) / sz
        else:
            b = T[o + N + j] if at_hi[j] else dom_hi - T[j]
            g[j] = (math.log(a) - math.log(b)) / sz
            h[j] = (1.0 / a + 1.0 / b) / sz


@numba.njit(cache=True, nogil=True, error_model="numpy")
def table_gap(T_all, active, n_active, g_raw, dims, cf, tab):
    """The largest |phi'_table(x) - phi'(x)| / max(1, |phi'(x)|) over the elements ``active[:n_active]`` (rows of
    ``T_all``) and the coordinates between the table's first and last node, phi' given in ``g_raw (n_active,
    nx)``: how far the table is from the user's phi now."""
    nx, mp = dims[_NX], dims[_TAB_MAP]
    gap = 0.0
    for i in range(n_active):
        T = T_all[active[i]]
        for j in range(nx):
            G, _, inside = _table_point(T[j], cf, mp, tab)
            if not inside:
                continue  # the table's extension, whose error was not measured
            e = abs(G - g_raw[i, j]) / max(1.0, abs(g_raw[i, j]))
            if not e <= gap:
                gap = e
    return gap


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _iterate(T, g, h, zs, sz, k_first, k_stop, own, at_lo, at_hi, dims, cf, pb, fl, mats, tab):
    """The iterations ``k_first .. k_stop - 1`` of one element's state ``T (width,)`` for z / sz = ``zs``: in
    each, phi' / sz and phi'' / sz into ``g, h`` (``own``: from T here; else given, one iteration), the
    residuals and the stop test (``k == max_iter``: the last allowed), and where the element does not stop,
    one predictor-corrector step in place.  Returns ``(status, k, residual)`` at the stop, status -1 where
    it has not stopped (0 converged, 1 last iteration, 2 not finite: dual_newton's codes).  (One function for
    the whole loop: its arrays are unpacked once per element.)"""
    (
        d,
        has_lo,
        has_up,
        mask,
        rptr,
        ridx,
        rval,
        cptr,
        cidx,
        cval,
        g_rw,
        g_rwv,
        g_rxn,
        g_rx,
        g_rxv,
        aw_n,
        aw_r,
        aw_v,
        Ax,
        w_row,
    ) = pb
    dT, dA, rd, rp, SY, phi_inv, phi, r0, r1b, rc, rcb, rcy, r1, u, rhs, dv = fl[:16]
    Dw, Dr, rows_in, tmp, tmp2, tl, q, qx, qk, inv = fl[16:]
    M, Mcopy, Sx, K, E = mats
    N, nx, m, m_eq = dims[_N], dims[_NX], dims[_M], dims[_MEQ]
    nw = N - nx
    mi = m - m_eq
    P = mi + 2 * N
    o_y = N + m_eq
    o_s = o_y + P
    W = o_s + P
    scale = cf[_SCALE]
    tol, mu_tol = cf[_TOL], cf[_MU_TOL]
    jitter = cf[_JITTER]
    # views of the multipliers and slacks (indices from 0: numba's negative-index wrap then folds away and the
    # loops over them vectorize)
    # (Ty, Ay, Ty_d: the multipliers and then the slacks, 2P entries; Yb: the bounds' multipliers)
    Ty, Ts, Yb, Tl = T[o_y:W], T[o_s:W], T[o_y + mi : o_s], T[N:]
    Ay, As, Ty_d, Ts_d = dA[o_y:W], dA[o_s:W], dT[o_y:W], dT[o_s:W]
    inv_y, inv_s, inv_sb = inv[:P], inv[P:], inv[P + mi :]
    res = math.nan
    for k in range(k_first, k_stop):
        if own:
            _own_derivatives(T, g, h, sz, dims, cf, at_lo, at_hi, tab)
        last = k == dims[_MAX_ITER]
        # residuals
        for j in range(N):
            t = Yb[N + j] - Yb[j]
            for p in range(cptr[j], cptr[j + 1]):
                t += cval[p] * Tl[cidx[p]]
            rd[j] = t
        for j in range(nx):
            rd[j] += g[j] - zs[j]
        for i in range(m):
            t = -d[i]
            for p in range(rptr[i], rptr[i + 1]):
                t += rval[p] * T[ridx[p]]
            rp[i] = t
        for i in range(mi):
            rp[m_eq + i] += Ts[i]
        mu = 0.0
        top = 0.0
        nan = False
        for i in range(P):
            sy = Ts[i] * Ty[i]
            SY[i] = sy
            mu += sy
            if sy > top:
                top = sy
            elif sy != sy:
                nan = True
        mu /= cf[_PAIRS_EXIST]
        # the stop test (torch's _converged, NaN propagated as there), as the torch code only where the mean
        # product (a lower bound of the largest, up to the sum's rounding) lets it pass, or is NaN, or k is the last
        if P == 0 or last or not mu > mu_tol * scale * (1.0 + 1e-9):
            pmax = 0.0
            for i in range(m):
                a = abs(rp[i])
                if a > pmax:
                    pmax = a
                elif a != a:
                    nan = True
            dd = 0.0
            for j in range(N):
                a = abs(rd[j])
                if j < nx and a <= EPS4 * h[j] * max(abs(T[j]), 1.0):
                    a = 0.0
                if a > dd:
                    dd = a
                elif a != a:
                    nan = True
            res = max(max(pmax, mu) / scale, dd)
            if nan or mu != mu:
                res = math.nan
            finite = res < math.inf
            if P == 0:
                top = mu
            # (a NaN fails every comparison there: here the maxima skipped it, the flag stands for it)
            done = not nan and mu == mu and pmax <= tol * scale and dd <= tol and top <= mu_tol * scale
            if done:
                return 0, k, res
            if not finite:
                return 2, k, res
            if last:
                return 1, k, res
        # ---- one predictor-corrector step
        prox = mu if (k < cf[_PROXIMAL_DELAY] or N == nx) else max(mu, cf[_PROXIMAL])
        # (reciprocals once: every quotient by a slack or a multiplier below is a product; 0 at the multiplier of
        # an absent pair, which is 0, for the ratio test)
        for i in range(2 * P):
            t = Ty[i]
            inv[i] = 1.0 / t if t != 0.0 else 0.0
        for i in range(mi):
            r0[i] = Ts[i] * inv_y[i]
        for j in range(2 * N):
            r1b[j] = Yb[j] * inv_sb[j]
        for j in range(N):
            phi[j] = r1b[j] + r1b[N + j] + (h[j] if j < nx else prox)
            phi_inv[j] = 1.0 / phi[j]
        use_primal = k < dims[_PRIMAL_ITERS]
        if use_primal:
            # H = Phi + G^T D G with its w block diagonal; Sx = H_xx - H_xw Dw^-1 H_wx; K = A H^-1 A^T
            for i in range(mi):
                Dr[i] = Ty[i] * inv_s[i]
            for j in range(nw):
                Dw[j] = phi[nx + j]
            for r in range(mi):
                jw = g_rw[r]
                if jw >= 0:
                    Dw[jw] += Dr[r] * g_rwv[r] * g_rwv[r]
            for j in range(nw):  # (its reciprocal from here on)
                Dw[j] = 1.0 / Dw[j]
            for i in range(nx):
                for j in range(i + 1):
                    Sx[i, j] = 0.0
                Sx[i, i] = phi[i]
            for r in range(mi):
                jw = g_rw[r]
                # D_r - (D_r g_w)^2 / Dw = D_r phi_w / Dw (no cancellation)
                e = Dr[r] * phi[nx + jw] * Dw[jw] if jw >= 0 else Dr[r]
                for a in range(g_rxn[r]):
                    ia = g_rx[r, a]
                    va = g_rxv[r, a] * e
                    for c in range(g_rxn[r]):
                        ic = g_rx[r, c]
                        if ic <= ia:
                            Sx[ia, ic] += va * g_rxv[r, c]
            _factor(Sx, nx, qx, Mcopy, jitter)
            if m_eq:
                for i in range(m_eq):
                    for j in range(m_eq):
                        K[i, j] = 0.0
                    for a in range(nx):
                        E[i, a] = Ax[i, a]
                for jw in range(nw):
                    r = w_row[jw]
                    coef = Dr[r] * g_rwv[r] * Dw[jw] if r >= 0 else 0.0
                    for p in range(aw_n[jw]):
                        ip_ = aw_r[jw, p]
                        vp = aw_v[jw, p] * Dw[jw]
                        for p2 in range(aw_n[jw]):
                            K[ip_, aw_r[jw, p2]] += vp * aw_v[jw, p2]
                        if r >= 0:
                            cp_ = aw_v[jw, p] * coef
                            for a in range(g_rxn[r]):
                                E[ip_, g_rx[r, a]] -= cp_ * g_rxv[r, a]
                # K += E Sx^-1 E^T = V^T V (lower triangle), V = L^-1 diag(qx) E^T by forward substitutions (Sx's
                # equilibrated factor L; E's rows overwritten with V's columns)
                for i in range(m_eq):
                    for a in range(nx):
                        t = E[i, a] * qx[a]
                        for c in range(a):
                            t -= Sx[a, c] * E[i, c]
                        E[i, a] = t * Sx[a, a]
                for i in range(m_eq):
                    for i2 in range(i, m_eq):
                        t = 0.0
                        for a in range(nx):
                            t += E[i2, a] * E[i, a]
                        K[i2, i] += t
                _factor(K, m_eq, qk, Mcopy, jitter)
        else:
            for i in range(m):
                for j in range(i + 1):
                    M[i, j] = 0.0
            for c in range(N):
                for p in range(cptr[c], cptr[c + 1]):
                    vp = cval[p] * phi_inv[c]
                    for p2 in range(cptr[c], p + 1):
                        M[cidx[p], cidx[p2]] += vp * cval[p2]
            for i in range(m_eq, m):
                M[i, i] += r0[i - m_eq]
            _factor(M, m, q, Mcopy, jitter)
        alpha_aff = 0.0
        fraction = cf[_FRACTION]
        all_pairs = dims[_ALL_PAIRS] != 0
        for phase in range(2):
            D = dA if phase == 0 else dT
            Dy = Ay if phase == 0 else Ty_d
            Dl = dA[N:] if phase == 0 else dT[N:]
            Ds = As if phase == 0 else Ts_d
            Dyb, Dsb = Dy[mi:], Ds[mi:]  # the bounds' multipliers and slacks
            if phase == 0:
                if all_pairs:
                    # the predictor's targets -S Y over S are -Y exactly (as the torch code)
                    for j in range(2 * N):
                        rcb[j] = -Yb[j]
                    for i in range(mi):
                        rcy[i] = -Ts[i]
                else:
                    for j in range(2 * N):
                        rcb[j] = -SY[mi + j] * inv_sb[j]
                    for i in range(mi):
                        rcy[i] = -SY[i] * inv[i]
            else:
                mu_aff = 0.0
                for i in range(P):
                    mu_aff += (Ts[i] + alpha_aff * As[i]) * (Ty[i] + alpha_aff * Ay[i])
                mu_aff /= cf[_PAIRS_EXIST]
                sig = min(max(mu_aff / max(mu, 1e-300), 0.0), 1.0) ** 3
                target = max(sig * mu, 0.1 * mu_tol * scale)
                for i in range(P):
                    rc[i] = target * mask[i] - SY[i] - As[i] * Ay[i]
                for j in range(2 * N):
                    rcb[j] = rc[mi + j] * inv_sb[j]
                for i in range(mi):
                    rcy[i] = rc[i] * inv[i]
            for j in range(N):
                r1[j] = rcb[j] - rcb[N + j] - rd[j]
            if use_primal:
                for i in range(mi):
                    rows_in[i] = -rp[m_eq + i] - rcy[i]
                for j in range(N):
                    tmp[j] = r1[j]
                for r in range(mi):
                    t = Dr[r] * rows_in[r]
                    for a in range(g_rxn[r]):
                        tmp[g_rx[r, a]] += t * g_rxv[r, a]
                    if g_rw[r] >= 0:
                        tmp[nx + g_rw[r]] += t * g_rwv[r]
                # dv = H^-1 (r - A^T dlambda) with K dlambda = A H^-1 r + rp_eq
                if m_eq:
                    _h_solve(nx, nw, Sx, qx, g_rw, g_rwv, g_rxn, g_rx, g_rxv, Dr, w_row, Dw, tmp, tmp2, u)
                    for i in range(m_eq):
                        t = rp[i]
                        for p in range(rptr[i], rptr[i + 1]):
                            t += rval[p] * tmp2[ridx[p]]
                        tl[i] = t
                    _factor_solve(K, qk, m_eq, tl)
                    for c in range(N):
                        t = tmp[c]
                        for p in range(cptr[c], cptr[c + 1]):  # (rows ascending: the equality rows first)
                            if cidx[p] >= m_eq:
                                break
                            t -= cval[p] * tl[cidx[p]]
                        tmp[c] = t
                    for i in range(m_eq):
                        Dl[i] = tl[i]
                _h_solve(nx, nw, Sx, qx, g_rw, g_rwv, g_rxn, g_rx, g_rxv, Dr, w_row, Dw, tmp, dv, u)
                for r in range(mi):
                    t = -rows_in[r]
                    for p in range(rptr[m_eq + r], rptr[m_eq + r + 1]):
                        t += rval[p] * dv[ridx[p]]
                    Dy[r] = Dr[r] * t
            else:
                for j in range(N):
                    u[j] = phi_inv[j] * r1[j]
                for i in range(m):
                    t = rp[i]
                    for p in range(rptr[i], rptr[i + 1]):
                        t += rval[p] * u[ridx[p]]
                    if i >= m_eq:
                        t += rcy[i - m_eq]
                    rhs[i] = t
                _factor_solve(M, q, m, rhs)
                for j in range(N):
                    t = 0.0
                    for p in range(cptr[j], cptr[j + 1]):
                        t += cval[p] * rhs[cidx[p]]
                    dv[j] = u[j] - phi_inv[j] * t
                for i in range(m):
                    Dl[i] = rhs[i]
            for j in range(N):
                D[j] = dv[j]
                dsl = dv[j] * has_lo[j]
                dsu = -dv[j] * has_up[j]
                Dsb[j] = dsl
                Dsb[N + j] = dsu
                Dyb[j] = rcb[j] - r1b[j] * dsl
                Dyb[N + j] = rcb[N + j] - r1b[N + j] * dsu
            for i in range(mi):
                Ds[i] = rcy[i] - r0[i] * Dy[i]
            # the ratio test: the largest -d / p over the existing pairs' slacks and multipliers (an absent pair's
            # multiplier has 1 / p = 0 in inv and d = 0), NaN propagated; without branches, in four independent
            # maxima (a maximum is exact in any order: the chain of one running maximum bounds the loop otherwise)
            w0 = w1 = w2 = w3 = 0.0
            bad = False
            n4 = (2 * P) // 4 * 4
            for i in range(0, n4, 4):
                a0 = -Dy[i] * inv[i]
                a1 = -Dy[i + 1] * inv[i + 1]
                a2 = -Dy[i + 2] * inv[i + 2]
                a3 = -Dy[i + 3] * inv[i + 3]
                w0 = a0 if a0 > w0 else w0
                w1 = a1 if a1 > w1 else w1
                w2 = a2 if a2 > w2 else w2
                w3 = a3 if a3 > w3 else w3
                bad |= (a0 != a0) | (a1 != a1) | (a2 != a2) | (a3 != a3)
            for i in range(n4, 2 * P):
                a0 = -Dy[i] * inv[i]
                w0 = a0 if a0 > w0 else w0
                bad |= a0 != a0
            worst = max(max(w0, w1), max(w2, w3))
            if bad:
                worst = math.nan
            if phase == 0:
                alpha_aff = fraction / max(worst, fraction) if worst == worst else math.nan
            else:
                fr = min(max(1.0 - mu, fraction), 1.0 - cf[_FRACTION_GAP])
                alpha = fr / max(worst, fr) if worst == worst else math.nan
                for i in range(W):
                    T[i] += alpha * dT[i]
    return -1, k_stop, res


@numba.njit(cache=True, nogil=True, error_model="numpy")
def iterate(
    own,
    k,
    dims,
    cf,
    pb,
    at_lo,
    at_hi,
    T_all,
    h_all,
    active,
    n_active,
    g_raw,
    h_raw,
    zs_all,
    sz_all,
    status,
    iters,
    res,
    tab,
):
    """The elements ``active[:n_active]`` (rows of ``T_all (B, width)``, z / sz ``zs_all``, sz ``sz_all``), each
    from its state: ``own`` (phi' and phi'' computed here: the built-in entropies, or a table ``tab`` of a user's
    phi, ``dims[_KIND]`` says which), the whole iteration from its start; else (a user's regularizer) the
    ``k``-th iteration only (the last allowed where k is max_iter), with phi' and phi'' at the
    states in ``g_raw, h_raw (n_active, nx)`` (row i for element active[i]; divided by sz here).  An element
    that stops gets its status, iteration count, residual and phi'' / sz (``h_all``) written; the others' states
    advance in place and their indices move to the front of ``active``.  Returns how many are still running.
    (One entry point for both: each kernel costs its compilation.)"""
    fl, mats = _workspace(dims)
    nx = dims[_NX]
    g = np.empty(max(nx, 1))
    k_first = 0 if own else k
    k_stop = dims[_MAX_ITER] + 1 if own else k + 1
    kept = 0
    for i in range(n_active):
        b = active[i]
        sz = sz_all[b]
        h = h_all[b]
        if not own:
            for j in range(nx):
                g[j] = g_raw[i, j] / sz
                h[j] = h_raw[i, j] / sz
        code, kk, r = _iterate(
            T_all[b], g, h, zs_all[b], sz, k_first, k_stop, own, at_lo, at_hi, dims, cf, pb, fl, mats, tab
        )
        if code >= 0:
            status[b] = code
            iters[b] = kk
            res[b] = r
        else:
            active[kept] = b
            kept += 1
    return kept


# ---------------------------------------------------------------------------------------------------------------
# The wrapper: the kernels' fixed arrays per problem, and the calls.

#: Where the torch code uses the normal matrix M, the kernels factor it densely per element: up to this many rows,
#: and for batches of B elements with B m^3 at most DENSE_WORK (beyond, the torch code's batched or
#: level-scheduled factorization is faster: measured on paths, docs/generic.md).
DENSE_ROWS = 48
DENSE_WORK = 10_000_000

_KINDS = {"entropy": KIND_ENTROPY, "binary_entropy": KIND_BINARY_ENTROPY}


class Plan:
    """The kernels' fixed arrays for one problem (see :func:`plan`)."""

    def __init__(self, ip, primal: bool, pb: tuple, at_lo, at_hi):
        self.primal = primal
        self.pb = pb
        self.at_lo, self.at_hi = at_lo, at_hi
        self.kind = _KINDS.get(ip.kind, KIND_GIVEN) if isinstance(ip.kind, str) else KIND_GIVEN
        self.m = ip.m
        # where a user's phi may get a table
        self.interval = _table_interval(ip) if self.kind == KIND_GIVEN else (-math.inf, math.inf)

    def serves(self, B: int) -> bool:
        """Whether the kernels take a batch of ``B`` elements (see DENSE_WORK)."""
        return self.primal or B * self.m**3 <= DENSE_WORK


#: The table's interval reaches this fraction of its width beyond a side that only the rows bound.
TABLE_MARGIN = 0.25


def _table_interval(ip) -> tuple[float, float]:
    """The interval [a, b] of a user's phi's table (:mod:`~sstcvx.generic.derivative_table`): it holds every
    coordinate of x at every point of P, by the bounds and the bounds that the rows imply (interval
    propagation), with a margin of TABLE_MARGIN times its width on each side that is not a bound of x or an end
    of phi's domain (the iterates may cross rows before they converge); +-inf where unbounded."""
    from .dual_newton import _implied_bounds

    nx, m_eq = ip.nx, ip.m_eq
    if not nx:
        return -math.inf, math.inf
    C, d = ip.C.cpu().numpy(), ip.d.cpu().numpy()
    lo = np.where(ip.has_lo.cpu().numpy() > 0, ip.lo.cpu().numpy(), -np.inf)
    up = np.where(ip.has_up.cpu().numpy() > 0, ip.up.cpu().numpy(), np.inf)
    rows = np.vstack([C[:m_eq], -C[:m_eq], C[m_eq:]])
    implied_lo, implied_up = _implied_bounds(rows, np.concatenate([d[:m_eq], -d[:m_eq], d[m_eq:]]), lo, up)
    a, b = float(implied_lo[:nx].min()), float(implied_up[:nx].max())
    if not (math.isfinite(a) and math.isfinite(b) and a < b):
        return -math.inf, math.inf
    margin = TABLE_MARGIN * (b - a)
    if not bool((lo[:nx] == a).any()):
        a = max(a - margin, ip.dom_lo)
    if not bool((up[:nx] == b).any()):
        b = min(b + margin, ip.dom_hi)
    return a, b


def plan(ip) -> Plan | None:
    """The kernels' arrays for ``ip`` where they serve it (a built-in entropy or a user's separable
    regularizer; the dense normal matrix up to DENSE_ROWS rows, or the primal reduction where the torch code
    takes it and the auxiliary columns are eliminable, see the module), else None."""
    if isinstance(ip.kind, str) and ip.kind not in _KINDS:
        return None
    C = ip.C.detach().cpu().numpy().astype(np.float64)
    m, N = C.shape
    nx, m_eq = ip.nx, ip.m_eq
    mi, nw = m - m_eq, N - nx
    G, A = C[m_eq:], C[:m_eq]
    g_rw = -np.ones(max(mi, 1), np.int64)
    g_rwv = np.zeros(max(mi, 1))
    kx = max(1, int((G[:, :nx] != 0).sum(1).max()) if mi else 1)
    g_rxn = np.zeros(max(mi, 1), np.int64)
    g_rx = np.zeros((max(mi, 1), kx), np.uint64)  # (indices unsigned, as ridx below)
    g_rxv = np.zeros((max(mi, 1), kx))
    w_row = -np.ones(max(nw, 1), np.int64)
    ka = max(1, int((A[:, nx:] != 0).sum(0).max()) if m_eq and nw else 1)
    aw_n = np.zeros(max(nw, 1), np.int64)
    aw_r = np.zeros((max(nw, 1), ka), np.uint64)
    aw_v = np.zeros((max(nw, 1), ka))
    Ax = np.ascontiguousarray(A[:, :nx]) if m_eq and nx else np.zeros((1, max(nx, 1)))
    primal = ip.primal is not None
    if primal:
        for r in range(mi):
            wc = np.nonzero(G[r, nx:])[0]
            if len(wc) > 1:
                return None
            if len(wc) == 1:
                if w_row[wc[0]] >= 0:
                    return None
                g_rw[r], g_rwv[r], w_row[wc[0]] = wc[0], G[r, nx + wc[0]], r
            xc = np.nonzero(G[r, :nx])[0]
            g_rxn[r], g_rx[r, : len(xc)], g_rxv[r, : len(xc)] = len(xc), xc, G[r, xc]
        for j in range(nw):
            rr = np.nonzero(A[:, nx + j])[0]
            aw_n[j], aw_r[j, : len(rr)], aw_v[j, : len(rr)] = len(rr), rr, A[rr, nx + j]
    elif m > DENSE_ROWS:
        return None
    rows, cols = np.nonzero(C)
    rptr = np.zeros(m + 1, np.int64)
    np.cumsum(np.bincount(rows, minlength=m), out=rptr[1:])
    order = np.lexsort((rows, cols))  # by column, then row
    cptr = np.zeros(N + 1, np.int64)
    np.cumsum(np.bincount(cols, minlength=N), out=cptr[1:])

    def f64(a):
        return np.ascontiguousarray(a, dtype=np.float64)

    lay = ip.layout
    pb = (
        f64(ip.d.cpu().numpy()),
        f64(ip.has_lo.cpu().numpy()),
        f64(ip.has_up.cpu().numpy()),
        f64(lay.mask.cpu().numpy()),
        rptr,
        cols.astype(np.uint64),  # (unsigned: numba indexes without the negative-index wrap)
        f64(C[rows, cols]),
        cptr,
        rows[order].astype(np.uint64),
        f64(C[rows[order], cols[order]]),
        g_rw,
        f64(g_rwv),
        g_rxn,
        g_rx,
        f64(g_rxv),
        aw_n,
        aw_r,
        f64(aw_v),
        f64(Ax),
        w_row,
    )
    return Plan(ip, primal, pb, f64(ip.at_lo.cpu().numpy()), f64(ip.at_hi.cpu().numpy()))


def run(ip, the_plan: Plan, T, zs, sz, max_iter: int):
    """Iterate from the starting states ``T (B, width)`` (float64, CPU; overwritten) for z / sz = ``zs (B, nx)``
    and ``sz (B, 1)``: ``(T, h, status, iterations, residual)`` as the torch code's iteration leaves them
    (each element's state and phi'' / sz where it stopped)."""
    from . import interior_point as IP
    from .dual_newton import STATUS_CONVERGED, STATUS_MAX_ITER, STATUS_NOT_FINITE
    from .normal_matrix import JITTER

    assert (STATUS_CONVERGED, STATUS_MAX_ITER, STATUS_NOT_FINITE) == (0, 1, 2)
    dt = derivative_table
    assert (dt.MAP_SIGMOID, dt.MAP_LOWER, dt.MAP_UPPER, dt.MAP_SINE, dt.TINY) == (
        MAP_SIGMOID,
        MAP_LOWER,
        MAP_UPPER,
        MAP_SINE,
        TINY,
    )
    B, nx = zs.shape
    lay = ip.layout
    dims = np.array(
        [
            lay.N,
            nx,
            lay.m,
            lay.m_eq,
            the_plan.kind,
            IP.PRIMAL_ITERATIONS if the_plan.primal else 0,
            max_iter,
            int(lay.all_pairs),
            lay.N - nx,
            0,
        ],
        dtype=np.int64,
    )
    # the constants read at each call (tests change them)
    cf = np.array(
        [
            float(ip.dual.scale),
            float(ip.existing_pairs),
            IP.TOLERANCE,
            IP.MU_TOLERANCE,
            IP.PROXIMAL,
            float(IP.PROXIMAL_DELAY),
            IP.FRACTION,
            IP.FRACTION_GAP,
            ip.dom_lo,
            ip.dom_hi,
            JITTER,
            0.0,
            0.0,
            0.0,
            0.0,
            0.0,
            0.0,
            1.0,
        ]
    )
    T = T.contiguous()
    h = torch.empty(B, nx, dtype=torch.float64)
    status = torch.empty(B, dtype=torch.long)
    iterations = torch.empty(B, dtype=torch.long)
    residual = torch.empty(B, dtype=torch.float64)
    Tn, hn, zn, szn = T.numpy(), h.numpy(), zs.contiguous().numpy(), sz.reshape(-1).contiguous().numpy()
    sn, itn, rn = status.numpy(), iterations.numpy(), residual.numpy()
    active = np.arange(B, dtype=np.int64)
    at_lo, at_hi = the_plan.at_lo, the_plan.at_hi
    none = np.zeros((1, 1))
    if the_plan.kind != KIND_GIVEN:
        iterate(True, 0, dims, cf, the_plan.pb, at_lo, at_hi, Tn, hn, active, B, none, none, zn, szn, sn, itn, rn, none)
        return T, h, status, iterations, residual
    table = None
    if IP.DERIVATIVE_TABLE and max_iter > 2 * IP.EXACT_ITERATIONS:
        table = derivative_table.table_for(ip.kind, *the_plan.interval)
    if table is None:
        _given(ip, dims, cf, the_plan, Tn, hn, active, B, 0, zn, szn, sn, itn, rn)
        return T, h, status, iterations, residual
    # the whole iteration on the table's phi', phi'' (kept for a restart: the starting states), then the exact
    # phi', phi'' from the table's solutions
    T_start = T.clone()
    dims[_KIND], dims[_TAB_MAP], dims[_MAX_ITER] = KIND_TABLE, table.map, max_iter - IP.EXACT_ITERATIONS
    cf[_TAB_A], cf[_TAB_B], cf[_TAB_S_LO], cf[_TAB_INV_STEP] = table.a, table.b, table.s_lo, table.inverse_step
    cf[_TAB_SLOPE_A], cf[_TAB_SLOPE_B], cf[_TAB_POWER] = table.slope_a, table.slope_b, table.power
    iterate(
        True, 0, dims, cf, the_plan.pb, at_lo, at_hi, Tn, hn, active, B, none, none, zn, szn, sn, itn, rn, table.rows
    )
    dims[_KIND] = KIND_GIVEN
    solved = np.flatnonzero(sn == 0)
    k_table = itn.copy()
    restart = np.flatnonzero(sn != 0)
    if len(solved):
        k_base = int(itn[solved].max())
        dims[_MAX_ITER] = k_base + IP.EXACT_ITERATIONS
        active[: len(solved)] = solved
        gap = _given(ip, dims, cf, the_plan, Tn, hn, active, len(solved), k_base, zn, szn, sn, itn, rn, table.rows)
        if not gap <= STALE_GAP:
            derivative_table.discard(ip.kind, *the_plan.interval)
        # each element's iterations: the table's, then the exact ones
        itn[solved] = k_table[solved] + itn[solved] - k_base
        restart = np.concatenate([restart, solved[sn[solved] != 0]])
    if len(restart):
        # where the exact iteration did not end what the table's started (or the table's did not end): the exact
        # iteration from the start, as without a table
        T[torch.from_numpy(restart)] = T_start[torch.from_numpy(restart)]
        dims[_MAX_ITER] = max_iter
        active[: len(restart)] = np.sort(restart)
        _given(ip, dims, cf, the_plan, Tn, hn, active, len(restart), 0, zn, szn, sn, itn, rn)
    return T, h, status, iterations, residual


#: The table is dropped (see :func:`~sstcvx.generic.derivative_table.discard`) where its phi' is farther than this
#: from the user's phi' (relative to max(1, |phi'|)) at the table's solutions.
STALE_GAP = 1e-6


def _given(ip, dims, cf, the_plan, Tn, hn, active, n, k_first, zn, szn, sn, itn, rn, table_rows=None):
    """The iterations ``k_first, k_first + 1, ...`` of the elements ``active[:n]`` with a user's phi', phi''
    evaluated in torch between the kernel's iterations, until every element has stopped (the last allowed is
    ``dims[_MAX_ITER]``).  With ``table_rows``: returns how far the table's phi' is from phi' at the first
    iteration's states (:func:`table_gap`), else 0."""
    nx = int(dims[_NX])
    inside = (math.nextafter(ip.dom_lo, math.inf), math.nextafter(ip.dom_hi, -math.inf))
    T_all = torch.from_numpy(Tn)
    gap = 0.0
    none = np.zeros((1, 1))
    B = Tn.shape[0]
    for k in range(k_first, int(dims[_MAX_ITER]) + 1):
        rows = T_all[:, :nx] if n == B else T_all[torch.from_numpy(active[:n].copy()), :nx]
        g_raw, h_raw = ip.kind.derivatives(rows.clamp(*inside))
        gn = g_raw.detach().to(torch.float64).contiguous().numpy()
        hr = h_raw.detach().to(torch.float64).contiguous().numpy()
        if table_rows is not None and k == k_first:
            gap = table_gap(Tn, active, n, gn, dims, cf, table_rows)
        n = iterate(
            False,
            k,
            dims,
            cf,
            the_plan.pb,
            the_plan.at_lo,
            the_plan.at_hi,
            Tn,
            hn,
            active,
            n,
            gn,
            hr,
            zn,
            szn,
            sn,
            itn,
            rn,
            none,
        )
        if n == 0:
            break
    return gap
