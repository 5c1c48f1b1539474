"""Compiled CPU kernels of :mod:`polytopes.sinkhorn`: the Sinkhorn forward and its implicit adjoint.

Both loop over the batch inside one compiled call and solve one element at a time, so an element
stops as soon as it has converged (the batched torch code steps until its slowest element is done),
and a step costs its arithmetic, not a few microseconds of dispatch per operation.  They run on one
thread (no ``parallel=True``), like the torch paths they replace at the benchmarks' one thread.

Arrays are float64 and C-contiguous (numpy views of CPU tensors), outputs preallocated by the caller,
so each kernel compiles for one signature.  The n x n systems are factorised by a Cholesky written
out here (n is small: no LAPACK call or allocation per element).

* :func:`sinkhorn_forward`: the narrow path of :func:`polytopes.sinkhorn._narrow_newton` per element
  (spread of Z at most ``narrow_spread``): linear-space Sinkhorn sweeps, then Newton steps on the dual
  with the grounded Laplacian, the step cut to max |d| <= ``max_step``.  Elements with a larger spread,
  a non-finite entry or a failed factorisation are marked for the torch path (step count -1).
* :func:`sinkhorn_adjoint`: :func:`polytopes.sinkhorn.sinkhorn_vjp` (and the lean
  :func:`polytopes.sinkhorn._sinkhorn_adjoint`) per element.
"""

from __future__ import annotations

import math

import numba
import numpy as np


@numba.njit(cache=True, nogil=True, fastmath={"reassoc", "contract", "arcp", "nsz"})
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


@numba.njit(cache=True, nogil=True, fastmath={"reassoc", "contract", "arcp", "nsz"})
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


@numba.njit(cache=True, nogil=True, fastmath={"reassoc", "contract", "arcp", "nsz"})
def _gram_lower(X, W, n):
    """Lower triangle of W = X^T X (the upper one is not touched)."""
    for j in range(n):
        for k in range(j + 1):
            W[j, k] = 0.0
    for i in range(n):
        for j in range(n):
            x = X[i, j]
            for k in range(j + 1):
                W[j, k] += x * X[i, k]


@numba.njit(cache=True, nogil=True, fastmath={"reassoc", "contract", "arcp", "nsz"})
def _grounded_laplacian(W, diagonal, n):
    """1 1^T + diag(diagonal) - W in place of W's lower triangle, the diagonal given (see the callers)."""
    for j in range(n):
        for k in range(j):
            W[j, k] = 1.0 - W[j, k]
        W[j, j] = 1.0 + diagonal[j]


@numba.njit(cache=True, nogil=True, fastmath={"reassoc", "contract", "arcp", "nsz"})
def sinkhorn_forward(
    Z, tol, max_iter, narrow_spread, sweeps, max_step, newton_ridge, ridge_floor, X_out, err_out, steps_out
):
    """X = exp(Z + a 1^T + 1 b^T) doubly stochastic per element of Z (B, n, n), in X_out (B, n, n).

    Per element: K = exp(Z - row max) (entries >= exp(-narrow_spread): no floors needed),
    ``sweeps`` Sinkhorn sweeps in linear space on the column scalings v (from 1 / K^T 1),
    then Newton steps: X = diag(1 / r) K diag(v) with unit rows, c its column sums,
    d = H^{-1} (1 - c) with H = 1 1^T + diag(c - diag(X^T X) + ridge) - X^T X (the grounded
    Laplacian; its diagonal formed as the sum of the off-diagonal weights, no cancellation),
    ridge = newton_ridge max |c - 1| + ridge_floor (Levenberg-Marquardt), and v *= exp(t d),
    t = min(1, max_step / max |d|) (no line search needed for max_step <= 0.87; see
    :func:`polytopes.sinkhorn._narrow_newton`).  Stops when max |c - 1| <= tol or after
    max_iter steps.  err_out: max |c - 1| of the returned X; steps_out: the Newton steps
    taken, or -1 where the element is left to the caller (spread of Z above
    ``narrow_spread`` or non-finite, or a factorisation that failed).  Returns (the number of
    elements short of ``tol``, their largest violation, the most steps an element took, the number
    of elements left), the first three over the elements not left.
    Cost per step O(n^3): the lower half of X^T X and a Cholesky factorisation.
    """
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
        low, high = np.inf, -np.inf
        for i in range(n):
            for j in range(n):
                low = min(low, z[i, j])
                high = max(high, z[i, j])
        if not high - low <= narrow_spread:  # (NaN and infinities included)
            steps_out[b], err_out[b] = -1, np.nan
            left += 1
            continue
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
                c[j] = 0.0
            for i in range(n):
                s = 0.0
                for j in range(n):
                    X[i, j] = K[i, j] * v[j]
                    s += X[i, j]
                s = 1.0 / s
                for j in range(n):
                    X[i, j] *= s
                    c[j] += X[i, j]
            err = 0.0
            for j in range(n):
                d[j] = 1.0 - c[j]  # the right side g = 1 - c, solved in place into the direction
                err = max(err, abs(d[j]))
            if not err == err:
                steps = -1
                break
            if err <= tol or steps >= max_iter:
                break
            _gram_lower(X, H, n)
            ridge = newton_ridge * err + ridge_floor
            for j in range(n):  # the diagonal of the Laplacian: the off-diagonal weights of row j
                s = 0.0
                for k in range(j):
                    s += H[j, k]
                for k in range(j + 1, n):
                    s += H[k, j]
                u[j] = s + ridge
            _grounded_laplacian(H, u, n)
            if not _cholesky(H, n):
                steps = -1
                break
            _cholesky_solve(H, d, n)
            longest = 0.0
            for j in range(n):
                longest = max(longest, abs(d[j]))
            t = 1.0 if longest <= max_step else max_step / longest
            if not t == t:
                steps = -1
                break
            for j in range(n):
                v[j] *= math.exp(t * d[j])
            steps += 1
        steps_out[b], err_out[b] = steps, err
        if steps < 0:
            left += 1
        else:
            most_steps = max(most_steps, steps)
            violation = max(violation, err)
            if not err <= tol:
                unconverged += 1
    return unconverged, violation, most_steps, left


@numba.njit(cache=True, nogil=True, fastmath={"reassoc", "contract", "arcp", "nsz"})
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
            for j in range(n):  # the lower half of (X / r)^T X
                for k in range(j + 1):
                    H[j, k] = 0.0
            for i in range(n):
                for j in range(n):
                    y = Xr[i, j]
                    for k in range(j + 1):
                        H[j, k] += y * x[i, k]
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
