"""k-subsets: P = conv{x in {0, 1}^n : sum x = k} = {0 <= x <= 1, sum x = k}, event shape (n,).

Specialized solvers (Z = U / tau, shape (B, n)):

* hard argmax: the indicator of the k largest U_i (top-k);
* ``binary_entropy``: sigmoid(Z - nu) with the scalar nu solving
  sum_i sigmoid(Z_i - nu) = k (the "limited multi-label projection" of Amos,
  Koltun & Kolter, 2019), by safeguarded Newton with an implicit backward;
* ``euclidean``: the Euclidean projection onto the capped simplex
  {0 <= x <= 1, sum x = k}, clamp(Z - nu, 0, 1), with nu found exactly from the
  sorted breakpoints;
* ``exp_family_entropy``: the marginals of the Gibbs law p(y) ~ exp<Z, y> on
  k-subsets, the gradient of log e_k(exp Z) (e_k the elementary symmetric
  polynomial) computed by a log-space dynamic program.
"""

from __future__ import annotations

import math

import cvxpy as cp
import torch

from sstcvx import Polytope, register_argmax, register_relaxation
from sstcvx.families import Family, register_family

from ._validation import check_int

# _enumerate_vertices returns None above this many vertices or this many entries (8 MB in float64).
MAX_VERTICES = 5000
MAX_ENTRIES = 1_000_000


class KSubset(Polytope):
    """conv of the k-hot vectors of length n: {x in R^n : 0 <= x <= 1, sum_i x_i = k}.

    ``KSubset(n, k)`` with n >= 2 and 1 <= k <= n - 1; event shape ``(n,)``.
    Vertices: the C(n, k) k-hot vectors in lexicographic order of their index
    sets (listed while C(n, k) <= ``MAX_VERTICES`` and n C(n, k) <= ``MAX_ENTRIES``).
    """

    def __init__(self, n: int, k: int):
        n, k = check_int(n, "n"), check_int(k, "k")
        if n < 2:
            raise ValueError(f"n: expected an int >= 2 (k-subsets need 1 <= k <= n - 1), got n={n}")
        if not 1 <= k <= n - 1:
            raise ValueError(f"k: expected 1 <= k <= n - 1 = {n - 1} for n={n}, got k={k}")
        super().__init__((n,), name=f"KSubset(n={n}, k={k})")
        self.n, self.k = n, k

    def _declare(self):
        x = cp.Variable(self.n)
        return x, [x >= 0, x <= 1, cp.sum(x) == self.k]

    def _enumerate_vertices(self):
        count = math.comb(self.n, self.k)
        if count > MAX_VERTICES or count * self.n > MAX_ENTRIES:
            return None
        index = torch.combinations(torch.arange(self.n), self.k)  # (C(n, k), k), lexicographic
        if index.dim() == 1:  # torch.combinations of r = 1 returns a vector
            index = index.unsqueeze(-1)
        v = torch.zeros(index.shape[0], self.n, dtype=torch.float64)
        return v.scatter_(1, index, 1.0)


# ----------------------------------------------------------------------------------------------
# hard argmax
# ----------------------------------------------------------------------------------------------


@register_argmax(KSubset)
def top_k(P: KSubset, U: torch.Tensor) -> torch.Tensor:
    """The k-hot vertex on the k largest entries of U (torch.topk's choice on ties).

    U: (..., n) -> (..., n) in {0, 1} with k ones, same dtype and device.  Cost O(n log k).
    """
    index = U.topk(P.k, dim=-1).indices
    return torch.zeros_like(U).scatter_(-1, index, 1.0)


# ----------------------------------------------------------------------------------------------
# binary entropy: limited multi-label projection
# ----------------------------------------------------------------------------------------------


def _lml_threshold(z: torch.Tensor, k: int, max_iter: int = 200) -> torch.Tensor:
    """The nu (..., 1) with sum_i sigmoid(z_i - nu) = k, for float64 z (..., n).

    f(nu) = sum sigmoid(z - nu) - k decreases from n - k to -k.  The bracket
    [min z - logit(k/n), max z - logit(k/n)] holds the root (every term is >= k/n
    at its left end, <= k/n at its right end); Newton steps that leave the
    current bracket are replaced by bisection, so the iteration converges from
    any start: about log2(spread of z) bisections while the sigmoids saturate,
    then quadratic convergence.  Stops when |f| <= 4 n eps or the bracket is
    down to a few ulps of nu.
    """
    n = z.shape[-1]
    eps = torch.finfo(z.dtype).eps
    offset = math.log(k / (n - k))  # logit(k / n)
    lo = z.amin(-1, keepdim=True) - offset
    hi = z.amax(-1, keepdim=True) - offset
    # start between the k-th and (k+1)-th largest entries: right when the answer is nearly hard
    top = z.topk(k + 1, dim=-1).values
    nu = (0.5 * (top[..., k - 1 : k] + top[..., k : k + 1])).clamp(lo, hi)
    tol = 4.0 * n * eps
    for _ in range(max_iter):
        s = torch.sigmoid(z - nu)
        f = s.sum(-1, keepdim=True) - k
        d = (s * (1.0 - s)).sum(-1, keepdim=True)
        lo = torch.where(f > 0, nu, lo)
        hi = torch.where(f < 0, nu, hi)
        done = (f.abs() <= tol) | (hi - lo <= 4.0 * eps * nu.abs().clamp_min(1.0))
        if bool(done.all()):
            break
        newton = nu + f / d.clamp_min(torch.finfo(z.dtype).tiny)
        inside = (newton > lo) & (newton < hi)
        nu = torch.where(done, nu, torch.where(inside, newton, 0.5 * (lo + hi)))
    return nu


class _LML(torch.autograd.Function):
    """x = sigmoid(Z - nu(Z)) with sum x = k; forward by root finding, backward by the implicit function theorem."""

    @staticmethod
    def forward(ctx, Z, k):
        z = Z.detach().to(torch.float64)
        x = torch.sigmoid(z - _lml_threshold(z, k)).to(Z.dtype)
        ctx.save_for_backward(x)
        return x

    @staticmethod
    def backward(ctx, g):
        # sum_i x_i = k fixes dnu = <D, dZ> / sum D with D = x (1 - x), so
        # J = diag(D) - D D^T / sum D (symmetric) and J^T g = D (g - <D, g> / sum D).
        # Written with differentiable ops on the saved output, so it differentiates again.
        (x,) = ctx.saved_tensors
        D = x * (1.0 - x)
        total = D.sum(-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
        return D * (g - (D * g).sum(-1, keepdim=True) / total), None


@register_relaxation(KSubset, "binary_entropy")
def limited_multilabel(P: KSubset, Z: torch.Tensor) -> torch.Tensor:
    """argmax_{x in P} <Z, x> - sum_i [x_i log x_i + (1 - x_i) log(1 - x_i)] = sigmoid(Z - nu).

    The scalar nu per row solves sum_i sigmoid(Z_i - nu) = k (the KKT condition
    of the sum constraint; the box is implied by the entropy).  Z: (..., n) ->
    (..., n), same dtype.  Cost O(n) per iteration, about 10-60 iterations
    (bisection while saturated, then Newton).  Backward: implicit, O(n),
    dZ = D (g - <D, g> / sum D) with D = x (1 - x) (Amos, Koltun & Kolter, 2019).

    Precision: nu is found in float64, then x cast back.  The sigmoids must be
    evaluated at Z - nu to far better than the rounding of Z: with |Z| ~ 1e6
    (tau = 1e-3, |theta| = 1e3) float32 spaces representable values 0.06
    apart, which alone would break sum x = k; in float64 the sum holds to
    about n * 1e-16 relative to the steepness of the sigmoids.
    """
    return _LML.apply(Z, P.k)


# ----------------------------------------------------------------------------------------------
# euclidean: projection onto the capped simplex
# ----------------------------------------------------------------------------------------------


class _CappedSimplexProjection(torch.autograd.Function):
    """x = clamp(Z - nu, 0, 1) with sum x = k; exact forward, backward on the free set F = {0 < x < 1}."""

    @staticmethod
    def forward(ctx, Z, k):
        z = Z.detach().to(torch.float64)
        n = z.shape[-1]
        s, _ = torch.sort(z, dim=-1)  # s_0 <= ... <= s_{n-1}
        prefix = torch.nn.functional.pad(s.cumsum(-1), (1, 0))  # prefix[j] = s_0 + ... + s_{j-1}
        j = torch.arange(n, device=z.device).expand_as(s)
        # g(t) = #{Z >= t + 1} + sum_{t < Z < t + 1} (Z - t) at the breakpoints t = s_j and t = s_j - 1,
        # two ascending families; entries tied with t count either way (they add Z - t = 0, or 1 = the cap)
        cap_upper = torch.searchsorted(s, s + 1.0)  # first index with Z >= s_j + 1
        g_upper = (n - cap_upper) + (prefix.gather(-1, cap_upper) - prefix[..., 1:]) - (cap_upper - j - 1) * s
        lower = s - 1.0
        free_lower = torch.searchsorted(s, lower, right=True)  # first index with Z > s_j - 1
        g_lower = (n - j) + (prefix[..., :-1] - prefix.gather(-1, free_lower)) - (j - free_lower) * lower
        # g is non-increasing: in each family the breakpoints with g >= k come first.  g(s_0 - 1) = n > k
        # and g(s_{n-1}) = 0 < k, so the crossing lies between the last breakpoint with g >= k (of either
        # family) and the first with g < k.
        last_upper = (g_upper >= k).sum(-1, keepdim=True) - 1  # may be -1
        last_lower = (g_lower >= k).sum(-1, keepdim=True) - 1  # >= 0
        infinity = torch.full_like(s[..., :1], float("inf"))
        left = torch.maximum(
            torch.where(last_upper >= 0, s.gather(-1, last_upper.clamp_min(0)), -infinity), lower.gather(-1, last_lower)
        )
        right = torch.minimum(
            s.gather(-1, last_upper + 1),
            torch.where(last_lower + 1 < n, lower.gather(-1, (last_lower + 1).clamp_max(n - 1)), infinity),
        )
        inner = 0.5 * (left + right)
        capped = z - 1.0 >= inner
        free = (z > inner) & ~capped
        count = free.sum(-1, keepdim=True)
        # g crosses k strictly inside the segment, so F is non-empty; guard rounding anyway
        nu = (torch.where(free, z, 0.0).sum(-1, keepdim=True) + (capped.sum(-1, keepdim=True) - k)) / count.clamp_min(1)
        nu = torch.where(count > 0, nu, inner)
        x = torch.where(free, z - nu, capped.to(z.dtype)).clamp(0.0, 1.0)
        ctx.save_for_backward(free.to(Z.dtype))
        return x.to(Z.dtype)

    @staticmethod
    def backward(ctx, g):
        # dnu = sum_F dZ / |F|, so J = diag(F) - F F^T / |F| (symmetric) and J^T g = F (g - mean_F g);
        # linear in g through differentiable ops, so it differentiates again (to zero, as it should)
        (free,) = ctx.saved_tensors
        count = free.sum(-1, keepdim=True).clamp_min(1.0)
        return free * (g - (free * g).sum(-1, keepdim=True) / count), None


@register_relaxation(KSubset, "euclidean")
def capped_simplex_projection(P: KSubset, Z: torch.Tensor) -> torch.Tensor:
    """argmin_{0 <= x <= 1, sum x = k} ||x - Z||^2 = clamp(Z - nu, 0, 1) with sum = k.

    g(nu) = sum_i clamp(Z_i - nu, 0, 1) is non-increasing and piecewise linear
    with breakpoints {Z_i - 1, Z_i}, two ascending families once Z is sorted.
    It is evaluated at all 2n breakpoints at once from the sorted Z and its
    prefix sums (one binary search per breakpoint counts the entries beyond
    t + 1 or t), which locates the segment where g crosses k; on it the sets
    F = {0 < Z - nu < 1} (free) and A = {Z - nu >= 1} (at the cap) are fixed,
    and nu = (sum_F Z + |A| - k) / |F| exactly.  Backward: the exact Jacobian diag(F) - F F^T / |F| applied in
    O(n) (a torch.autograd.Function).  Z: (..., n) -> (..., n), same dtype.
    Cost O(n log n) (one sort, 2n binary searches), no iteration.

    Precision: float64 internally, cast back; nu is a difference of sums of
    size |Z| and x a difference Z - nu, which in float32 would lose sum x = k
    to rounding once |Z| reaches about 10 (see :func:`limited_multilabel`).
    """
    return _CappedSimplexProjection.apply(Z, P.k)


# ----------------------------------------------------------------------------------------------
# exponential-family entropy: Gibbs marginals by a log-space dynamic program
# ----------------------------------------------------------------------------------------------


# Padding items sit this far below the row minimum: every k-subset that uses one weighs less than
# exp(-_PAD_GAP) times one that swaps it for an unused real item, so they change nothing in float64.
_PAD_GAP = 1000.0


def _logsumexp(x: torch.Tensor) -> torch.Tensor:
    """logsumexp over the last dim, with terms more than 700 below the maximum floored at exp(-700).

    Floored terms weigh < 1e-304 relative to the largest, so the value is exact
    in float64, and their (zero) gradient is cut; the floor keeps exp out of its
    underflow range, where CPUs take a slow path (about 10x slower), and keeps
    -inf (absent terms) out of the derivatives.
    """
    top = x.detach().amax(-1, keepdim=True)
    return top.squeeze(-1) + (x - top).clamp_min(-700.0).exp().sum(-1).log()


def _log_convolution(left: torch.Tensor, right: torch.Tensor, d_out: int) -> torch.Tensor:
    """out[c] = logsumexp_i (left[i] + right[c - i]) for c = 0..d_out; left, right (..., d + 1).

    The pairs are read as sliding windows (a view, no gather) of ``right``
    padded with d entries of -inf on the left: window c holds right[c - d + i']
    against left[d - i'].  Absent pairs (c - i outside 0..d) meet a -inf pad,
    which :func:`_logsumexp` floors at exp(-700) relative weight.
    """
    d = left.shape[-1] - 1
    pad_left = right.new_full(right.shape[:-1] + (d,), float("-inf"))
    pad_right = right.new_full(right.shape[:-1] + (max(0, d_out - d),), float("-inf"))
    windows = torch.cat([pad_left, right, pad_right], dim=-1).unfold(-1, d + 1, 1)[..., : d_out + 1, :]
    return _logsumexp(left.flip(-1).unsqueeze(-2) + windows)


def log_elementary_symmetric(z: torch.Tensor, k: int) -> torch.Tensor:
    """log e_k(exp z) = log sum_{|S| = k} exp(sum_{i in S} z_i): the k-subset log-partition function.

    z: (..., n) -> (...).  A dynamic program over (items, count) in log space,
    organised as a balanced binary tree over the items so that it takes
    log2(n) vectorised steps instead of n: a group G of items carries
    L_G[c] = log e_c(exp z_G) for c = 0..min(|G|, k), and two sibling groups
    merge by the truncated log-space convolution
    L_{G+H}[c] = logsumexp_i (L_G[i] + L_H[c - i]), since
    e_c(G + H) = sum_i e_i(G) e_{c-i}(H).  Work O(n k) in total (the levels
    with |G| < k cost O(n |G|), those above O(n k^2 / |G|)).  n is padded to a
    power of two with items _PAD_GAP below the row minimum (detached), whose
    terms :func:`_logsumexp` floors at relative weight exp(-700), so they
    change log e_k by less than 1e-300.  Every stored entry is finite (the
    -inf pads of the convolution never leave :func:`_logsumexp`), so the first
    and second derivatives are finite.  Differentiable twice by autograd; the
    gradient is the vector of Gibbs marginals.  Runs in the dtype of z.
    """
    n = z.shape[-1]
    if not 1 <= k <= n:
        raise ValueError(f"k: expected 1 <= k <= n = {n}, got {k}")
    if n == 1:
        return z[..., 0]
    size = 1 << (n - 1).bit_length()
    if size > n:
        pad = z.detach().amin(-1, keepdim=True) - _PAD_GAP
        z = torch.cat([z, pad.expand(*z.shape[:-1], size - n)], dim=-1)
    # the first level in closed form: a pair {a, b} has log e_0 = 0, log e_1 = logaddexp(a, b), log e_2 = a + b
    a, b = z[..., 0::2], z[..., 1::2]
    table = torch.stack([torch.zeros_like(a), _logsumexp(torch.stack([a, b], dim=-1)), a + b], dim=-1)
    table = table[..., : k + 1]  # (B, groups, degree + 1)
    while table.shape[-2] > 1:
        d_out = min(2 * (table.shape[-1] - 1), k)
        table = _log_convolution(table[..., 0::2, :], table[..., 1::2, :], d_out)
    return table[..., 0, k]


@register_relaxation(KSubset, "exp_family_entropy")
def gibbs_marginals(P: KSubset, Z: torch.Tensor) -> torch.Tensor:
    """grad_Z log e_k(exp Z): the marginals P(i in S) of the Gibbs law p(S) ~ exp(sum_{i in S} Z_i), |S| = k.

    This is argmax_{x in P} <Z, x> - A*(x) with A the k-subset log-partition
    function (:func:`log_elementary_symmetric`).  Z: (..., n) -> (..., n),
    same dtype; sum x = k.  Cost O(n k) work in log2(n) vectorised steps for
    the DP, the same again for its reverse sweep (autograd.grad), which gives
    the marginals; when Z requires grad the reverse sweep is recorded
    (create_graph), so the marginals' own backward (the covariance of the
    Gibbs law, a Hessian-vector product) is exact too, at about twice the cost.

    Precision: float64 internally, cast back.  Z is first shifted per row by
    its k-th largest entry (log e_k changes by k times the shift, the marginals
    not at all).  The log-space sums round at eps * |Z - shift|, so the
    marginals are accurate to about 1e-16 * spread(Z) (1e-10 at a spread of
    1e6, i.e. tau = 1e-3 with |theta| = 1e3, and ~1e-15 for moderate Z); in
    float32 the same bound is 6e-8 * spread, which would lose the 1e-6 sum
    constraint as soon as the spread exceeds about 10.
    """
    k = P.k
    record = torch.is_grad_enabled() and Z.requires_grad
    with torch.enable_grad():
        z = Z.to(torch.float64)
        if not z.requires_grad:
            z = z.detach().requires_grad_(True)
        shift = z.detach().topk(k, dim=-1).values[..., k - 1 :]
        log_partition = log_elementary_symmetric(z - shift, k)
        (marginals,) = torch.autograd.grad(log_partition.sum(), z, create_graph=record)
    return marginals.to(Z.dtype)


@register_relaxation(KSubset, "separable")
def separable_ksubset(P: KSubset, Z: torch.Tensor, regularizer) -> torch.Tensor:
    """argmax_{0 <= x <= 1, sum x = k} <Z, x> - sum_i phi(x_i) for any ``Regularizer.separable``.

    x_i = x(Z_i - nu), x(v) phi's mirror map on [0, 1] intersected with its domain and nu the
    one scalar per row with sum_i x(Z_i - nu) = k (safeguarded Newton); exact implicit backward
    dZ = D (g - <D, g> / sum D), D = 1 / phi''(x).  See :func:`sstcvx.separable.sum_relaxation`.
    """
    from sstcvx.separable import sum_relaxation

    return sum_relaxation(regularizer, Z, float(P.k), 0.0, 1.0, P.name)


def _make_ksubset(n: int, k: int | None) -> KSubset:
    """KSubset(n, k), with k about n / 3 (within 1 <= k <= n - 1) when not given."""
    return KSubset(n, max(1, min(n - 1, n // 3)) if k is None else k)


register_family(
    Family(
        name="ksubset",
        make=_make_ksubset,
        regularizers=("binary_entropy", "euclidean", "exp_family_entropy"),
        n=10,
        sizes=(6, 10, 20, 50, 100, 300, 1000),
        quick_sizes=(6, 20, 100),
        max_generic_n=300,
        device_check_n=40,
        quick_device_check_n=10,
        uses_k=True,
    )
)
