"""Small numerical kernels and argument checks shared by the polytope families' solvers.

* :func:`rank_one_vjp`: the vector-Jacobian product of the projections whose Jacobian
  is diag(D) - D D^T / sum D (LML, the capped simplex, sparsemax);
* :func:`floored_logsumexp`: logsumexp with terms far below the maximum floored, which
  keeps exp out of its slow subnormal range (the k-subset DP, Sinkhorn);
* :func:`sparsemax_threshold`: the exact threshold of the projection onto the simplex
  by sorting (the Birkhoff projection's row steps, short rows of sparsemax), and
  :func:`simplex_threshold`, the same threshold by exact Newton steps where they are cheaper
  (long rows of sparsemax);
* :func:`check_square` and :func:`check_solver_arguments`: the argument checks of the
  public solvers on (..., n, n) inputs (Sinkhorn, the Birkhoff projection, assignment).
"""

from __future__ import annotations

import torch


def rank_one_vjp(D: torch.Tensor, g: torch.Tensor, floor: float) -> torch.Tensor:
    """J^T g for the symmetric J = diag(D) - D D^T / sum(D) over the last dim: D (g - <D, g> / sum D).

    D, g: (..., n) -> (..., n).  ``floor`` bounds sum(D) from below (the count of a
    non-empty support is >= 1; LML's D = x (1 - x) may underflow).  O(n), written
    with differentiable ops, so it differentiates again.
    """
    total = D.sum(-1, keepdim=True).clamp_min(floor)
    return D * (g - (D * g).sum(-1, keepdim=True) / total)


def floored_logsumexp(x: torch.Tensor, dim: int, floor: float, keepdim: bool = False) -> torch.Tensor:
    """log sum exp(x) along ``dim``, terms more than -``floor`` below the maximum counted at exp(floor) times it.

    With floor = -700 the floored terms weigh < 1e-304 relative to the largest
    (exact in float64); with floor = -345, < n 1e-150.  The floor keeps exp out of
    the subnormal range, where CPUs take a slow path (10-100x), and keeps -inf
    (absent terms) out of the derivatives; the gradient of floored terms is cut.
    The maximum is detached (the value does not depend on it).
    """
    top = x.detach().amax(dim, keepdim=True)
    out = top + (x - top).clamp_min(floor).exp().sum(dim, keepdim=True).log()
    return out if keepdim else out.squeeze(dim)


def sparsemax_threshold(z: torch.Tensor):
    """t (..., 1) with sum max(z - t, 0) = 1 over the last dim, the support size (..., 1), and z sorted descending.

    Exact from the sorted cumulative sums (Martins & Astudillo, 2016, Alg. 1); O(n log n).
    """
    n = z.shape[-1]
    zs, _ = torch.sort(z, dim=-1, descending=True)
    cum = zs.cumsum(-1) - 1.0
    ranks = torch.arange(1, n + 1, dtype=z.dtype, device=z.device)
    # the support size is the largest r with z_(r) > (sum_{j<=r} z_(j) - 1) / r; the condition holds
    # exactly for r = 1..size, so counting it gives size
    size = (zs * ranks > cum).sum(-1, keepdim=True)
    return cum.gather(-1, size - 1) / size.to(z.dtype), size, zs


#: Rows at least this long get the Newton steps of :func:`simplex_threshold`; shorter ones sort faster than
#: they step (the crossover is measured in docs/benchmarks.md, "Sparsemax by Newton steps on its threshold").
NEWTON_FROM = 64
#: Newton steps before the sorting method takes over (generic input needs 1-6).
NEWTON_STEPS = 32


def simplex_threshold(z: torch.Tensor) -> torch.Tensor:
    """t (..., 1) with sum max(z - t, 0) = 1 over the last dim: the threshold of the projection onto the
    simplex, exact.

    f(t) = sum_i max(z_i - t, 0) - 1 is convex, piecewise linear and decreasing, so Newton's steps
    t' = t + f(t) / |S(t)| = (sum_{S(t)} z_i - 1) / |S(t)| from a point left of the root (S(t) =
    {z_i > t}) never pass it, and the support shrinks at every step until it is the root's: once the
    count |S| repeats, t is the sparsemax formula over the final support (as in the sorting method,
    not to a tolerance).  Start: the larger of two lower bounds of the root, max(z) - 1 (no
    coordinate of the projection exceeds 1) and (sum z - 1) / n.  Cost O(n) per step, a handful of
    steps, one host synchronisation per step; rows shorter than NEWTON_FROM, and any batch whose
    steps have not settled after NEWTON_STEPS (rounding can in principle make a support count
    alternate), use :func:`sparsemax_threshold` (a sort).
    """
    n = z.shape[-1]
    if n < NEWTON_FROM:
        return sparsemax_threshold(z)[0]
    t = torch.maximum(z.amax(-1, keepdim=True) - 1.0, (z.sum(-1, keepdim=True) - 1.0) / n)
    size = None
    for _ in range(NEWTON_STEPS):
        above = z > t
        count = above.sum(-1, keepdim=True)
        if size is not None and bool((count == size).all()):
            return t
        size = count
        t = (torch.where(above, z, 0.0).sum(-1, keepdim=True) - 1.0) / size
    return sparsemax_threshold(z)[0]


def check_square(T, name: str) -> None:
    """``T`` is a floating tensor of shape (..., n, n) with n >= 2; errors name the argument."""
    if not isinstance(T, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of shape (..., n, n), got {type(T).__name__}")
    if not T.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {T.dtype}")
    if T.dim() < 2 or T.shape[-1] != T.shape[-2] or T.shape[-1] < 2:
        raise ValueError(f"{name}: expected shape (..., n, n) with n >= 2, got {tuple(T.shape)}")


def check_solver_arguments(Z, tol, max_iter) -> None:
    """The public iterative solvers' checks: square finite Z, tol > 0, max_iter >= 1."""
    check_square(Z, "Z")
    if isinstance(tol, bool) or not isinstance(tol, (float, int)) or not tol > 0:
        raise ValueError(f"tol: expected a positive float, got {tol!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter: expected a positive int, got {max_iter!r}")
    if not bool(torch.isfinite(Z).all()):
        raise ValueError("Z: expected finite values")


_ONES: dict = {}


def ones_matrix(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The all-ones (n, n) matrix, cached per (n, dtype, device); read only (the grounding 1 1^T of
    the permutation solvers' Laplacians)."""
    key = (n, dtype, device)
    ones = _ONES.get(key)
    if ones is None:
        ones = _ONES[key] = torch.ones(n, n, dtype=dtype, device=device)
    return ones


def set_aside(index, X: torch.Tensor, err: torch.Tensor, X_out, err_out):
    """Record the current iterates of a shrinking batch before its converged elements are dropped.

    ``index`` (k,): the positions in the full batch of the rows of ``X`` (k, ...) and ``err`` (k,),
    or None while the batch is whole; ``X_out``, ``err_out``: the full-batch records (None at
    first).  Returns ``(X_out, err_out, index)`` with the rows of ``X`` and ``err`` written at
    ``index`` (at the first call, copies of them and ``arange``).
    """
    if index is None:
        return X.clone(), err.clone(), torch.arange(len(X), device=X.device)
    X_out.index_copy_(0, index, X)
    err_out.index_copy_(0, index, err)
    return X_out, err_out, index
