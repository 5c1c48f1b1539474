"""Compiled CPU kernels of :mod:`polytopes.sinkhorn`: the Sinkhorn forward and its implicit adjoint.

Both loop over the batch inside one compiled call and solve one element at a time, so an element
stops as soon as it has converged (the batched torch code steps until its slowest element is done),
and a step costs its arithmetic, not a few microseconds of dispatch per operation.  They run on one
thread (no ``parallel=True``), like the torch paths they replace at the benchmarks' one thread.

Arrays are float64 and C-contiguous (numpy views of CPU tensors), outputs preallocated by the caller,
so each kernel compiles for one signature.  The n x n systems are factorised by a Cholesky written
out here (n is small: no LAPACK call or allocation per element).

* :func:`sinkhorn_forward`: the forward of :func:`polytopes.sinkhorn._sinkhorn_solve` per element:
  for a spread of Z up to 64 the narrow path of :func:`polytopes.sinkhorn._narrow_newton`
  (linear-space Sinkhorn sweeps, then Newton steps on the dual with the grounded Laplacian, cut to
  max |d| <= 0.8), above it the epsilon-scaling stages of the damped log-domain Newton of
  :func:`polytopes.sinkhorn._newton`.  Elements with a non-finite entry or a failed factorisation
  are marked for the torch path (step count -1).
* :func:`sinkhorn_adjoint`: :func:`polytopes.sinkhorn.sinkhorn_vjp` (and the lean
  :func:`polytopes.sinkhorn._sinkhorn_adjoint`) per element.

Cost O(n^3) per Newton step and per adjoint, in plain loops (the lower half of X^T X and a
Cholesky factorisation); at n above a few hundred the torch code's BLAS calls are faster, and
:func:`polytopes.sinkhorn._takes_compiled` sends such batches there.
"""

from __future__ import annotations

import math

import numba
import numpy as np

# Floating-point contraction and reassociation (vectorised sums, fused multiply-adds): changes
# results at rounding level only; no finite-math flags (the kernels test for NaN).
_FASTMATH = {"reassoc", "contract", "arcp", "nsz"}


@numba.njit(cache=True, nogil=True, fastmath=_FASTMATH)
def _cholesky(H, n):
    """Lower Cholesky factor of H (n x n) in place (lower triangle read and written); False if not definite."""
    for j in range(n):
        s = H[j, j]
        for k in range(j):
            s -= H[j, k] * H[j, k]
        if not s > 0.0:  # (NaN included)
            return False
        pivot = math.sqrt(s)
        H[j, j] = pivot
        for i in range(j + 1, n):
            s = H[i, j]
            for k in range(j):
                s -= H[i, k] * H[j, k]
            H[i, j] = s / pivot
    return True


@numba.njit(cache=True, nogil=True, fastmath=_FASTMATH)
def _cholesky_solve(L, b, n):
    """Solve L L^T x = b in place of b, L the lower factor of :func:`_cholesky`."""
    for i in range(n):
        s = b[i]
        for k in range(i):
            s -= L[i, k] * b[k]
        b[i] = s / L[i, i]
    for i in range(n - 1, -1, -1):
        s = b[i]
        for k in range(i + 1, n):
            s -= L[k, i] * b[k]
        b[i] = s / L[i, i]


@numba.njit(cache=True, nogil=True, fastmath=_FASTMATH)
def _gram_lower(X, Y, W, n):
    """Lower triangle of W = X^T Y, for X^T Y symmetric (X^T X, or (D X)^T X with D diagonal); the upper one is
    not touched."""
    for j in range(n):
        for k in range(j + 1):
            W[j, k] = 0.0
    for i in range(n):
        for j in range(n):
            x = X[i, j]
            for k in range(j + 1):
                W[j, k] += x * Y[i, k]


@numba.njit(cache=True, nogil=True, fastmath=_FASTMATH)
def _grounded_laplacian(W, diagonal, n):
    """1 1^T + diag(diagonal) - W in place of W's lower triangle, the diagonal given (see the callers)."""
    for j in range(n):
        for k in range(j):
            W[j, k] = 1.0 - W[j, k]
        W[j, j] = 1.0 + diagonal[j]


@numba.njit(cache=True, nogil=True)
def _nan_max(a, b):
    """max(a, b), NaN if b is NaN (the builtin max drops it), so that a NaN violation is seen."""
    return a if b <= a else b


@numba.njit(cache=True, nogil=True, fastmath=_FASTMATH)
def _newton_direction(X, d, ridge, bump, H, diagonal, n):
    """d <- H^{-1} d with H = 1 1^T + diag(w + ridge) - X^T X, w_j the off-diagonal weights of row j of X^T X.

    H is the grounded Laplacian of :func:`polytopes.sinkhorn.grounded_laplacian` (r = 1), its
    diagonal formed as the sum of the off-diagonal weights (no cancellation near a
    permutation).  ``bump``: a failed factorisation is repeated with 1e-8 (1 + the largest
    diagonal entry) added to the diagonal (as :func:`polytopes.sinkhorn.solve_spd`).  Returns
    False where the factorisation failed (d is then undefined).  Cost O(n^3).
    """
    for attempt in range(2 if bump else 1):
        _gram_lower(X, X, H, n)
        for j in range(n):
            s = 0.0
            for k in range(j):
                s += H[j, k]
            for k in range(j + 1, n):
                s += H[k, j]
            diagonal[j] = s + ridge
        _grounded_laplacian(H, diagonal, n)
        if attempt == 1:
            largest = 0.0
            for j in range(n):
                largest = max(largest, abs(H[j, j]))
            for j in range(n):
                H[j, j] += 1e-8 * (1.0 + largest)
        if _cholesky(H, n):
            _cholesky_solve(H, d, n)
            return True
    return False


@numba.njit(cache=True, nogil=True, fastmath=_FASTMATH)
def _narrow(z, X, K, H, v, u, d, n, tol, max_iter, sweeps, max_step, newton_ridge, ridge_floor):
    """One element by the narrow path (see :func:`sinkhorn_forward`); returns (steps, err), steps -1 if it failed."""
    for i in range(n):
        top = -np.inf
        for j in range(n):
            top = max(top, z[i, j])
        for j in range(n):
            K[i, j] = math.exp(z[i, j] - top)
    # linear-space sweeps: v = 1 / K^T u, u = 1 / K v
    for j in range(n):
        v[j] = 0.0
    for i in range(n):
        for j in range(n):
            v[j] += K[i, j]
    for j in range(n):
        v[j] = 1.0 / v[j]
    for _ in range(sweeps):
        for i in range(n):
            s = 0.0
            for j in range(n):
                s += K[i, j] * v[j]
            u[i] = 1.0 / s
        for j in range(n):
            v[j] = 0.0
        for i in range(n):
            for j in range(n):
                v[j] += K[i, j] * u[i]
        for j in range(n):
            v[j] = 1.0 / v[j]
    steps = 0
    while True:
        for j in range(n):
            d[j] = 1.0
        for i in range(n):
            s = 0.0
            for j in range(n):
                X[i, j] = K[i, j] * v[j]
                s += X[i, j]
            s = 1.0 / s
            for j in range(n):
                X[i, j] *= s
                d[j] -= X[i, j]  # the right side 1 - c, solved in place into the direction
        err = 0.0
        for j in range(n):
            err = _nan_max(err, abs(d[j]))
        if not err == err:
            return -1, err
        if err <= tol or steps >= max_iter:
            return steps, err
        if not _newton_direction(X, d, newton_ridge * err + ridge_floor, False, H, u, n):
            return -1, err
        longest = 0.0
        for j in range(n):
            longest = max(longest, abs(d[j]))
        t = 1.0 if longest <= max_step else max_step / longest
        if not t == t:
            return -1, err
        for j in range(n):
            v[j] *= math.exp(t * d[j])
        steps += 1


@numba.njit(cache=True, nogil=True, fastmath=_FASTMATH)
def _normalize_rows(W, n, floor):
    """W_ij -= log sum_k exp(W_ik), terms more than -floor below the row's maximum counted at that floor."""
    for i in range(n):
        top = -np.inf
        for j in range(n):
            top = max(top, W[i, j])
        s = 0.0
        for j in range(n):
            s += math.exp(max(W[i, j] - top, floor))
        shift = top + math.log(s)
        for j in range(n):
            W[i, j] -= shift


@numba.njit(cache=True, nogil=True, fastmath=_FASTMATH)
def _normalize_columns(W, n, floor, top, total):
    """W_ij -= log sum_k exp(W_kj), floored as :func:`_normalize_rows`; top, total: scratch (n,)."""
    for j in range(n):
        top[j] = -np.inf
        total[j] = 0.0
    for i in range(n):
        for j in range(n):
            top[j] = max(top[j], W[i, j])
    for i in range(n):
        for j in range(n):
            total[j] += math.exp(max(W[i, j] - top[j], floor))
    for j in range(n):
        total[j] = top[j] + math.log(total[j])
    for i in range(n):
        for j in range(n):
            W[i, j] -= total[j]


@numba.njit(cache=True, nogil=True, fastmath=_FASTMATH)
def _log_newton(W, X, H, u, c, d, n, tol, budget, newton_ridge, ridge_floor, params):
    """Damped Newton on the column sums of X = exp(W), rows of W kept normalised (one element).

    :func:`polytopes.sinkhorn._newton` for one element: ``sweeps`` log-domain Sinkhorn sweeps,
    then Newton steps (the grounded Laplacian with the ridge max(newton_ridge err, ridge_floor),
    the bump on a failed factorisation); a step with max |d| <= safe_step is taken in full, a
    longer one is capped at max |t d| = max_step and halved until the Armijo test on the sum of
    the row log-normalisers holds, or after max_halvings a Sinkhorn sweep instead.  X = exp(W)
    with W floored at ``log_floor`` (entries >= 1e-150: products stay normal floats).  Returns
    (steps, err), steps -1 where both factorisations failed.
    """
    max_step, max_halvings, sweeps, safe_step = params[8], int(params[9]), int(params[10]), params[11]
    slack, floor = params[12] * n, params[13]
    for _ in range(sweeps):
        _normalize_columns(W, n, floor, u, c)
        _normalize_rows(W, n, floor)
    steps = 0
    while True:
        for j in range(n):
            d[j] = 1.0
        for i in range(n):
            for j in range(n):
                X[i, j] = math.exp(max(W[i, j], floor))
                d[j] -= X[i, j]
        err = 0.0
        for j in range(n):
            c[j] = -d[j]  # the gradient g = c - 1
            err = _nan_max(err, abs(d[j]))
        if not err == err:
            return -1, err
        if err <= tol or steps >= budget:
            return steps, err
        if not _newton_direction(X, d, max(newton_ridge * err, ridge_floor), True, H, u, n):
            return -1, err
        longest = 0.0
        for j in range(n):
            longest = max(longest, abs(d[j]))
        steps += 1
        if longest <= safe_step:
            for i in range(n):
                for j in range(n):
                    W[i, j] += d[j]
            _normalize_rows(W, n, floor)
            continue
        # Armijo: psi(b + t d) - psi(b) = sum of the row log-normalisers - t sum(d) <= 1e-4 t <g, d>
        armijo = 0.0
        for j in range(n):
            armijo += d[j] + 1e-4 * c[j] * d[j]
        t = min(1.0, max_step / longest)
        accepted = False
        for _ in range(max_halvings):
            total = 0.0
            for i in range(n):
                top = -np.inf
                for j in range(n):
                    top = max(top, W[i, j] + t * d[j])
                s = 0.0
                for j in range(n):
                    s += math.exp(max(max(W[i, j] + t * d[j], floor) - top, floor))
                u[i] = top + math.log(s)
                total += u[i]
            if total <= t * armijo + slack:
                for i in range(n):
                    for j in range(n):
                        W[i, j] += t * d[j] - u[i]
                accepted = True
                break
            t *= 0.5
        if not accepted:  # a Sinkhorn sweep (columns, then rows) instead
            _normalize_columns(W, n, floor, u, c)
            _normalize_rows(W, n, floor)


@numba.njit(cache=True, nogil=True, fastmath=_FASTMATH)
def _wide(z, X, W, H, u, c, d, n, tol, max_iter, spread, newton_ridge, ridge_floor, params):
    """One element by epsilon-scaling (see :func:`sinkhorn_forward`); returns (steps, err, converged)."""
    first_spread, scale_factor, stage_tol, floor = params[5], params[6], params[7], params[13]
    s = max(spread / first_spread, 1.0)
    for i in range(n):
        for j in range(n):
            W[i, j] = z[i, j] / s
    _normalize_rows(W, n, floor)
    steps = 0
    while True:
        final = s == 1.0
        used, err = _log_newton(
            W,
            X,
            H,
            u,
            c,
            d,
            n,
            tol if final else max(stage_tol, tol),
            max_iter - steps,
            newton_ridge,
            ridge_floor,
            params,
        )
        if used < 0:
            return -1, err, False
        steps += used
        if final or steps >= max_iter:
            break
        s_next = max(s / scale_factor, 1.0)
        for i in range(n):
            for j in range(n):
                W[i, j] *= s / s_next
        _normalize_rows(W, n, floor)
        s = s_next
    for i in range(n):
        for j in range(n):
            X[i, j] = math.exp(W[i, j]) if W[i, j] >= floor else 0.0
    return steps, err, final and err <= tol


@numba.njit(cache=True, nogil=True, fastmath=_FASTMATH)
def sinkhorn_forward(Z, tol, max_iter, params, X_out, err_out, steps_out):
    """X = exp(Z + a 1^T + 1 b^T) doubly stochastic per element of Z (B, n, n), in X_out (B, n, n).

    ``params``: the tuning constants of :mod:`polytopes.sinkhorn`, floats in the order
    (_NARROW_SPREAD, _LINEAR_SWEEPS, _NARROW_STEP, _NEWTON_RIDGE, _RIDGE_FLOOR, _FIRST_SPREAD,
    _SCALE_FACTOR, _STAGE_TOL, _MAX_STEP, _MAX_HALVINGS, _SWEEPS, _SAFE_STEP, _ARMIJO_SLACK,
    _LOG_FLOOR).

    Elements whose spread max(Z) - min(Z) is at most _NARROW_SPREAD take the narrow path of
    :func:`polytopes.sinkhorn._narrow_newton`: K = exp(Z - row max) (entries >= exp(-spread):
    no floors needed), _LINEAR_SWEEPS Sinkhorn sweeps in linear space on the column scalings v
    (from 1 / K^T 1), then Newton steps: X = diag(1 / r) K diag(v) with unit rows, c its column
    sums, d = H^{-1} (1 - c) with H the grounded Laplacian of :func:`_newton_direction`, ridge
    _NEWTON_RIDGE max |c - 1| + _RIDGE_FLOOR (Levenberg-Marquardt), and v *= exp(t d),
    t = min(1, _NARROW_STEP / max |d|) (no line search needed; see there).  Larger spreads take
    the epsilon-scaling of :func:`polytopes.sinkhorn._sinkhorn_solve`: Z / s for s from
    spread / _FIRST_SPREAD down to 1 by _SCALE_FACTOR, each stage solved to _STAGE_TOL (the
    last to ``tol``) by the damped log-domain Newton of :func:`_log_newton`, warm-started by
    the previous stage.  Stops an element when max |c - 1| <= tol or after max_iter Newton
    steps in all.  err_out: max |c - 1| of the returned X (of its last stage); steps_out: the
    Newton steps taken, or -1 where the element is left to the caller (non-finite entries, a
    failed factorisation: not seen on finite input).  Returns (the number of elements short of
    ``tol``, their largest violation, the most steps an element took, the number of elements
    left), the first three over the elements not left.
    Cost per Newton step O(n^3): the lower half of X^T X and a Cholesky factorisation.
    """
    narrow_spread, sweeps, max_step = params[0], int(params[1]), params[2]
    newton_ridge, ridge_floor = params[3], params[4]
    B, n = Z.shape[0], Z.shape[1]
    K = np.empty((n, n))
    H = np.empty((n, n))
    v = np.empty(n)
    u = np.empty(n)
    c = np.empty(n)
    d = np.empty(n)
    unconverged, violation, most_steps, left = 0, 0.0, 0, 0
    for b in range(B):
        z = Z[b]
        X = X_out[b]
        low, high, finite = np.inf, -np.inf, True
        for i in range(n):
            for j in range(n):
                low = min(low, z[i, j])
                high = max(high, z[i, j])
                finite = finite and math.isfinite(z[i, j])
        spread = high - low
        if not finite:
            steps, err, converged = -1, np.nan, False
        elif spread <= narrow_spread:
            steps, err = _narrow(z, X, K, H, v, u, d, n, tol, max_iter, sweeps, max_step, newton_ridge, ridge_floor)
            converged = err <= tol
        else:
            steps, err, converged = _wide(
                z, X, K, H, u, c, d, n, tol, max_iter, spread, newton_ridge, ridge_floor, params
            )
        steps_out[b], err_out[b] = steps, err
        if steps < 0:
            left += 1
        else:
            most_steps = max(most_steps, steps)
            violation = max(violation, err)
            if not converged:
                unconverged += 1
    return unconverged, violation, most_steps, left


@numba.njit(cache=True, nogil=True, fastmath=_FASTMATH)
def sinkhorn_adjoint(X, G, unit_rows, lean, ridge, out):
    """dL/dZ = X * (G - alpha 1^T - 1 beta^T) per element of X, G (B, n, n), in out (B, n, n).

    With r, c the row and column sums of X (r = 1 if ``unit_rows``) and a0 = (G * X) 1 / r:
    beta solves (1 1^T + diag(c + ridge) - X^T diag(1 / r) X) beta = (G * X)^T 1 - X^T a0, and
    alpha = a0 - diag(1 / r) X beta (:func:`polytopes.sinkhorn.sinkhorn_vjp`).  ``lean``: the
    column sums are taken as 1 in the diagonal (:func:`polytopes.sinkhorn._sinkhorn_adjoint`);
    where that factorisation fails the element takes the general diagonal.  A failed
    factorisation of the general system is repeated with 1e-8 (1 + the largest diagonal entry)
    added to the diagonal (as :func:`polytopes.sinkhorn.solve_spd`); where that fails too the
    element's output is NaN, left to the caller.  Returns the number of such elements.  Cost O(n^3)
    per element.
    """
    B, n = X.shape[0], X.shape[1]
    Xr = np.empty((n, n))
    H = np.empty((n, n))
    a0 = np.empty(n)
    beta = np.empty(n)
    diagonal = np.empty(n)
    failed = 0
    for b in range(B):
        x, g, o = X[b], G[b], out[b]
        for i in range(n):
            s = 0.0
            q = 0.0
            for j in range(n):
                s += g[i, j] * x[i, j]
                q += x[i, j]
            if unit_rows:
                q = 1.0
            a0[i] = s / q
            for j in range(n):
                Xr[i, j] = x[i, j] / q
        for j in range(n):
            beta[j] = 0.0
        for i in range(n):
            for j in range(n):
                beta[j] += (g[i, j] - a0[i]) * x[i, j]
        # attempt 0: the lean diagonal, 1: the general one, 2: the general one with the bump
        attempt = 0 if lean else 1
        while True:
            _gram_lower(Xr, x, H, n)  # the lower half of (X / r)^T X
            for j in range(n):  # diag(c + ridge) (or (1 + ridge) I), less the weight of j on itself
                if attempt == 0:
                    diagonal[j] = 1.0 + ridge - H[j, j]
                else:
                    s = 0.0
                    for i in range(n):
                        s += x[i, j]
                    diagonal[j] = s + ridge - H[j, j]
            _grounded_laplacian(H, diagonal, n)
            if attempt == 2:
                largest = 0.0
                for j in range(n):
                    largest = max(largest, abs(H[j, j]))
                bump = 1e-8 * (1.0 + largest)
                for j in range(n):
                    H[j, j] += bump
            if _cholesky(H, n):
                break
            attempt += 1
            if attempt == 3:
                break
        if attempt == 3:  # left to the caller
            failed += 1
            for i in range(n):
                for j in range(n):
                    o[i, j] = np.nan
            continue
        _cholesky_solve(H, beta, n)
        for i in range(n):
            s = 0.0
            for j in range(n):
                s += Xr[i, j] * beta[j]
            alpha = a0[i] - s
            for j in range(n):
                o[i, j] = x[i, j] * (g[i, j] - alpha - beta[j])
    return failed
