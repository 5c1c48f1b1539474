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
  polynomial) by prefix sums in linear space (a log-space DP for extreme rows).
"""

from __future__ import annotations

import itertools
import math

import cvxpy as cp
import torch

from sstcvx import Polytope, register_argmax, register_relaxation
from sstcvx.families import Family, register_family
from sstcvx.recognition import Match

from ._compiled import enabled_for
from ._kernels import floored_logsumexp, rank_one_vjp
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
        return _k_hot_rows(self.n, self.k)


def _k_hot_rows(n: int, k: int) -> torch.Tensor:
    """The C(n, k) k-hot float64 rows of length n, in lexicographic order of their index sets.

    By itertools: torch.combinations builds an n^k grid first, which exhausts memory for k near n.
    """
    index = torch.tensor(list(itertools.combinations(range(n), k)), dtype=torch.long).reshape(-1, k)
    return torch.zeros(index.shape[0], n, dtype=torch.float64).scatter_(1, index, 1.0)


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
        return rank_one_vjp(x * (1.0 - x), g, torch.finfo(x.dtype).tiny), None


def limited_multilabel(Z: torch.Tensor, k: int) -> torch.Tensor:
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
    return _LML.apply(Z, k)


register_relaxation(KSubset, "binary_entropy")(lambda P, Z: limited_multilabel(Z, P.k))


# ----------------------------------------------------------------------------------------------
# euclidean: projection onto the capped simplex
# ----------------------------------------------------------------------------------------------


class _CappedSimplexProjection(torch.autograd.Function):
    """x = clamp(Z - nu, 0, 1) with sum x = k; exact forward, backward on the free set F = {0 < x < 1}."""

    @staticmethod
    def forward(ctx, Z, k):
        z = Z.detach().to(torch.float64)
        free = _capped_simplex_fast_newton(z, k)
        if free is None:
            free = _capped_simplex_newton(z, k)
        if free is None:
            free = _capped_simplex_sorted(z, k)
        x, free = free
        ctx.save_for_backward(free.to(Z.dtype))
        return x.to(Z.dtype)

    @staticmethod
    def backward(ctx, g):
        # dnu = sum_F dZ / |F|, so J = diag(F) - F F^T / |F| (symmetric) and J^T g = F (g - mean_F g);
        # linear in g through differentiable ops, so it differentiates again (to zero, as it should)
        (free,) = ctx.saved_tensors
        return rank_one_vjp(free, g, 1.0), None


# Newton iterations of the capped-simplex threshold before the sorting method takes over.
_CAPPED_NEWTON_STEPS = 64


def _capped_simplex_newton(z: torch.Tensor, k: int):
    """(x, free) for the capped simplex by exact Newton steps on the threshold, or None if they did not settle.

    g(nu) = sum_i clamp(z_i - nu, 0, 1) is piecewise linear and non-increasing.
    At nu the free set F = {nu < z < nu + 1} and capped set A = {z >= nu + 1}
    give the candidate nu' = (sum_F z + |A| - k) / |F|, the root if the sets stay
    the same; they do iff the counts |{z > nu}| and |{z >= nu + 1}| (nested
    threshold sets) agree at nu and nu', and then nu' is exact (not a tolerance).
    Candidates outside the bracket of the root kept from the signs of g - k (or
    with F empty) are replaced by bisection.  Start: nu = (sum z - k) / n.  Cost
    O(n) per step, a handful of steps; one host synchronisation per step.
    """
    n = z.shape[-1]
    lo, hi = z.amin(-1, keepdim=True) - 1.0, z.amax(-1, keepdim=True)
    nu = ((z.sum(-1, keepdim=True) - k) / n).clamp(lo, hi)
    counts = newton = None
    for _ in range(_CAPPED_NEWTON_STEPS):
        above, capped = z > nu, z >= nu + 1.0
        free = above & ~capped
        new_counts = torch.cat([above.sum(-1, keepdim=True), capped.sum(-1, keepdim=True)], -1)
        n_free = new_counts[..., :1] - new_counts[..., 1:]
        excess = torch.where(free, z - nu, 0.0).sum(-1, keepdim=True) + new_counts[..., 1:] - k  # g(nu) - k
        # settled: nu came from a Newton candidate whose sets it keeps, or g(nu) = k exactly (e.g. F empty)
        settled = excess == 0
        if counts is not None:
            settled = settled | (newton & (new_counts == counts).all(-1, keepdim=True))
        if bool(settled.all()):
            return torch.where(free, z - nu, capped.to(z.dtype)), free
        counts = new_counts
        lo = torch.where(excess > 0, nu, lo)
        hi = torch.where(excess < 0, nu, hi)
        candidate = (torch.where(free, z, 0.0).sum(-1, keepdim=True) + new_counts[..., 1:] - k) / n_free.clamp_min(1)
        settled = settled | (n_free > 0) & (candidate == nu)  # the sets at nu give nu itself: exact
        newton = (n_free > 0) & (candidate > lo) & (candidate < hi)
        if bool(settled.all()):
            return torch.where(free, z - nu, capped.to(z.dtype)), free
        nu = torch.where(settled, nu, torch.where(newton, candidate, 0.5 * (lo + hi)))
        newton = newton | settled
    return None


def _capped_simplex_fast_newton(z: torch.Tensor, k: int):
    """(x, free) for the capped simplex by cheap exact Newton steps on the threshold, or None if they did not settle.

    The steps of :func:`_capped_simplex_newton` with the Newton point taken as
    nu + (g(nu) - k) / |F| from one clamp and two counts (no masked sums), which
    settles in a few steps on generic input; when the root sits on a breakpoint
    (ties, integer-valued z) the rounding of that update can keep it from
    settling, and :func:`_capped_simplex_newton` takes over.

    In detail: g(nu) = sum_i clamp(z_i - nu, 0, 1) is piecewise linear and non-increasing,
    with slope -|F| on the free set F = {nu < z < nu + 1}.  The Newton point
    nu' = nu + (g(nu) - k) / |F| is the root if the sets F and A = {z >= nu + 1}
    stay the same between nu and nu'; they do iff the counts |{z > nu}| and
    |{z >= nu + 1}| (nested threshold sets) agree at nu and nu', and then nu' is
    exact up to rounding (not a tolerance).  Newton points outside the bracket of
    the root kept from the signs of g - k (or with F empty) are replaced by
    bisection.  Start: nu = (sum z - k) / n.  Each step is a handful of passes
    over z (subtract, clamp, sum, two counts) and one host synchronisation.
    """
    n = z.shape[-1]
    lo, hi = z.amin(-1, keepdim=True) - 1.0, z.amax(-1, keepdim=True)
    nu = ((z.sum(-1, keepdim=True) - k) / n).clamp(lo, hi)
    counts = newton = None
    tiny_bracket = 8.0 * torch.finfo(z.dtype).eps * torch.maximum(hi.abs(), lo.abs()).clamp_min(1.0)
    for _ in range(_CAPPED_FAST_STEPS):
        y = z - nu
        x = y.clamp(0.0, 1.0)
        excess = x.sum(-1, keepdim=True) - k  # g(nu) - k
        new_counts = torch.cat([torch.count_nonzero(x, -1).unsqueeze(-1), (y >= 1.0).sum(-1, keepdim=True)], -1)
        # settled: nu came from a Newton point whose sets it keeps, or g(nu) = k exactly (e.g. F empty)
        settled = (excess == 0) | (hi - lo <= tiny_bracket)  # a bracket of a few ulps: any point in it is the root
        if counts is not None:
            settled = settled | (newton & (new_counts == counts).all(-1, keepdim=True))
        if bool(settled.all()):
            return x, (x > 0) & (x < 1)
        counts = new_counts
        n_free = new_counts[..., :1] - new_counts[..., 1:]
        lo = torch.where(excess > 0, nu, lo)
        hi = torch.where(excess < 0, nu, hi)
        candidate = nu + excess / n_free.clamp_min(1)
        # inside the bracket (strictly: Newton on a piecewise-linear g can cycle between its ends), or = nu (settled next step)
        newton = (n_free > 0) & ((candidate > lo) & (candidate < hi) | (candidate == nu))
        nu = torch.where(newton, candidate, 0.5 * (lo + hi))
    return None


# Cheap Newton steps before the exact-candidate Newton steps take over (generic input needs about 6).
_CAPPED_FAST_STEPS = 16


def _capped_simplex_sorted(z: torch.Tensor, k: int):
    """(x, free) for the capped simplex from the sorted z: every breakpoint evaluated at once (see below)."""
    if True:
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
        return torch.where(free, z - nu, capped.to(z.dtype)).clamp(0.0, 1.0), free


def capped_simplex_projection(Z: torch.Tensor, k: int) -> torch.Tensor:
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
    return _CappedSimplexProjection.apply(Z, k)


register_relaxation(KSubset, "euclidean")(lambda P, Z: capped_simplex_projection(Z, P.k))


# ----------------------------------------------------------------------------------------------
# exponential-family entropy: Gibbs marginals by prefix sums over the items (log-space DP for extreme rows)
# ----------------------------------------------------------------------------------------------


# Padding items sit this far below the row minimum: every k-subset that uses one weighs less than
# exp(-_PAD_GAP) times one that swaps it for an unused real item, so they change nothing in float64.
_PAD_GAP = 1000.0
# logsumexp floor of the log-space DP (relative weight exp(-700) < 1e-304: exact in float64).
_LOG_FLOOR = -700.0


def _log_convolution(left: torch.Tensor, right: torch.Tensor, d_out: int) -> torch.Tensor:
    """out[c] = logsumexp_i (left[i] + right[c - i]) for c = 0..d_out; left, right (..., d + 1).

    The pairs are read as sliding windows (a view, no gather) of ``right``
    padded with d entries of -inf on the left: window c holds right[c - d + i']
    against left[d - i'].  Absent pairs (c - i outside 0..d) meet a -inf pad,
    which :func:`floored_logsumexp` floors at exp(-700) relative weight.
    """
    d = left.shape[-1] - 1
    pad_left = right.new_full(right.shape[:-1] + (d,), float("-inf"))
    pad_right = right.new_full(right.shape[:-1] + (max(0, d_out - d),), float("-inf"))
    windows = torch.cat([pad_left, right, pad_right], dim=-1).unfold(-1, d + 1, 1)[..., : d_out + 1, :]
    return floored_logsumexp(left.flip(-1).unsqueeze(-2) + windows, -1, _LOG_FLOOR)


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
    terms :func:`floored_logsumexp` floors at relative weight exp(-700), so they
    change log e_k by less than 1e-300.  Every stored entry is finite (the
    -inf pads of the convolution never leave :func:`floored_logsumexp`), so the first
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
    table = torch.stack(
        [torch.zeros_like(a), floored_logsumexp(torch.stack([a, b], dim=-1), -1, _LOG_FLOOR), a + b], dim=-1
    )
    table = table[..., : k + 1]  # (B, groups, degree + 1)
    while table.shape[-2] > 1:
        d_out = min(2 * (table.shape[-1] - 1), k)
        table = _log_convolution(table[..., 0::2, :], table[..., 1::2, :], d_out)
    return table[..., 0, k]


def _log_space_marginals(z: torch.Tensor, k: int, create_graph: bool) -> torch.Tensor:
    """grad_z log e_k(exp z) by autograd through :func:`log_elementary_symmetric`; z float64 (B, n) requiring grad.

    z is first shifted per row by its k-th largest entry (log e_k changes by k
    times the shift, the marginals not at all), so the log-space sums round at
    eps |z - shift|.  ``create_graph``: record the sweep, so that the marginals
    differentiate again (a Hessian-vector product).
    """
    shift = z.detach().topk(k, dim=-1).values[..., k - 1 :]
    log_partition = log_elementary_symmetric(z - shift, k)
    (marginals,) = torch.autograd.grad(log_partition.sum(), z, create_graph=create_graph)
    return marginals


def _log_space_rows(z: torch.Tensor, rows: torch.Tensor, k: int) -> torch.Tensor:
    """The forward's :func:`_log_space_marginals` of the rows ``rows`` of z (no graph kept), under any grad mode.

    Autograd runs on a copy of the rows made outside inference mode: a tensor made under
    ``torch.inference_mode`` cannot enter autograd even where grad mode is re-enabled.
    """
    with torch.inference_mode(False), torch.enable_grad():
        return _log_space_marginals(z.detach()[rows].requires_grad_(True), k, False)


# Linear-space DP: a row qualifies when its k largest entries lie within _SPAN of its maximum (and within
# (_RANGE - log max_c C(n, c)) / k); entries more than _SPAN + _FLOOR_MARGIN below it count at that depth.
_RANGE = 600.0
_SPAN = 30.0
_FLOOR_MARGIN = 45.0


def _linear_weights(z: torch.Tensor, k: int):
    """w = exp(max(z - max z, -floor)) (B, n) and the rows (B,) bool where the linear-space DP is exact.

    With w <= 1, every coefficient e_c of a group is <= C(n, c) <= exp(log_count);
    on a qualifying row e_k >= exp(-k span) (k entries have w >= exp(-span)), so
    every product that contributes to e_k more than 1e-16 of it has factors above
    exp(-_RANGE - 37): no relevant term overflows or underflows.  An entry with
    w below exp(-span - _FLOOR_MARGIN) has marginal <= k w exp(span) (an
    exchange argument: swapping it for one of the k entries above exp(-span)),
    so raising it to that floor changes the marginals by < k exp(-45) < 1e-18.
    """
    span = _linear_span(z.shape[-1], k)
    y = z - z.amax(-1, keepdim=True)
    if span < 1.0:  # n and k so large that C(n, k) alone leaves no range: the log-space path
        return None, torch.zeros(z.shape[:-1], dtype=torch.bool, device=z.device)
    qualifies = (y >= -span).sum(-1) >= k
    return torch.exp(y.clamp_min(-(span + _FLOOR_MARGIN))), qualifies


def _linear_span(n: int, k: int) -> float:
    """The depth below the row maximum within which a row's k largest entries must lie for the linear-space DP."""
    c = min(k, n // 2)
    log_count = math.lgamma(n + 1) - math.lgamma(c + 1) - math.lgamma(n - c + 1)
    return min(_SPAN, (_RANGE - log_count) / k)


def _mirror(Q: torch.Tensor) -> torch.Tensor:
    """Rows and items reversed.  On a stack [prefix rows; suffix rows] whose suffix rows are the
    prefix rows reversed (rows and items), the two halves trade places, each in the other's order."""
    return Q.flip((0, 1))


def _pair_weight(c: int, k: int) -> float:
    """The pair (c, k - 1 - c) of degrees is counted once; the middle c = (k - 1) / 2 pairs with itself (half weight)."""
    return 0.5 if 2 * c == k - 1 else 1.0


def _linear_forward(w: torch.Tensor, k: int):
    """Gibbs marginals (B, n) from the weights w (B, n) by prefix sums in linear space; also the state for the backward.

    The rows of W = [w; mirror(w)] (2B, n) hold w's prefixes on top and its
    suffixes below.  Q_j[:, t] = e_j(first t entries of the row) follows from
    Q_{j-1} by one cumulative sum over the items, Q_j[:, t + 1] = sum_{s <= t} W_s Q_{j-1}[:, s]
    (Q_0 = 1), two batched operations per degree, in one buffer.  Item t's
    leave-one-out coefficient is e_{k-1}(others) = sum_c e_{k-1-c}(before t) e_c(after t);
    the top half of Q_{k-1-c} * mirror(Q_c) holds term c and its bottom half the
    mirror of term k - 1 - c, so the pairs c <= (k - 1) / 2 suffice (only their
    mirrors are kept).  Marginal w_t e_{k-1}(others) / e_k, with k e_k = sum_t w_t e_{k-1}(others).
    """
    B = w.shape[0]
    if k == 1:  # one item: the softmax
        return w / w.sum(-1, keepdim=True), (w, None, None, None)
    half = (k - 1) // 2
    W = torch.cat([w, _mirror(w)])
    step = torch.zeros_like(W)  # column 0 stays 0 (e_j of no entries, j >= 1)
    head, left = step[:, 1:], W[:, :-1]  # views made once: every degree reuses the same buffers
    head.copy_(left)
    Q = torch.cumsum(step, -1)
    Q_left = Q[:, :-1]
    mirrored, acc = [], None
    for j in range(1, k):
        if j > 1:
            torch.mul(left, Q_left, out=head)
            torch.cumsum(step, -1, out=Q)
        if j <= half:
            mirrored.append(_mirror(Q))
        c = k - 1 - j
        if c == 0:  # mirror(Q_0) = 1
            acc = Q.clone() if acc is None else acc.add_(Q)
        elif c <= half:
            if acc is None:
                acc = torch.mul(Q, mirrored[c - 1])
                if 2 * c == k - 1:
                    acc.mul_(0.5)
            else:
                acc.addcmul_(Q, mirrored[c - 1], value=_pair_weight(c, k))
    others = acc[:B] + _mirror(acc[B:])
    m = w * others
    scale = k / m.sum(-1, keepdim=True)  # 1 / e_k
    # (the state does not hold x, the caller's output: an in-place change of it must not reach the backward)
    return m.mul_(scale), (W, mirrored, others, scale)


def _linear_hvp(state, g: torch.Tensor, k: int) -> torch.Tensor:
    """H g (B, n) for H = d marginals / dz (the Gibbs covariance, symmetric): the tangent of :func:`_linear_forward` along g.

    The prefix sums are recomputed with their tangents in one buffer X_j = [Q_j; dQ_j]
    (4B rows; recomputing costs fewer fresh pages than keeping them): dQ_j obeys
    Q_j's recurrence with the source dW_s Q_{j-1}[:, s] added (dW = W g; the tangent
    of a cumulative sum is the cumulative sum of the tangents).  The pair products
    differentiate to dQ_{k-1-c} mirror(Q_c) + Q_{k-1-c} mirror(dQ_c).
    """
    W, mirrored, others, scale = state
    if k == 1:  # (W is w here)
        x = W / W.sum(-1, keepdim=True)
        return x * (g - (x * g).sum(-1, keepdim=True))
    B, n = g.shape
    x = torch.mul(W[:B], others).mul_(scale)  # the forward's marginals, recomputed (as rounded there)
    R, half = 2 * B, (k - 1) // 2
    dW = torch.cat([g, _mirror(g)]).mul_(W)
    step = W.new_zeros(2, R, n)  # [Q; dQ] inputs of the cumulative sums; column 0 stays 0
    head, d_head, left, d_left = step[:, :, 1:], step[1, :, 1:], W[:, :-1], dW[:, :-1]
    head[0].copy_(left)
    d_head.copy_(d_left)
    X = torch.cumsum(step, -1)
    Q, dQ, X_left, Q_left = X[0], X[1], X[:, :, :-1], X[0, :, :-1]
    flips, d_acc = [], None
    for j in range(1, k):
        if j > 1:
            torch.mul(left, X_left, out=head)  # both halves: W broadcasts over [Q; dQ]
            d_head.addcmul_(d_left, Q_left)
            torch.cumsum(step, -1, out=X)
        if j <= half:
            flips.append(_mirror(dQ))
        c = k - 1 - j
        if c == 0:
            d_acc = dQ.clone() if d_acc is None else d_acc.add_(dQ)
        elif c <= half:
            weight = _pair_weight(c, k)
            if d_acc is None:
                d_acc = torch.mul(dQ, mirrored[c - 1]).addcmul_(Q, flips[c - 1])
                if weight != 1.0:
                    d_acc.mul_(weight)
            else:
                d_acc.addcmul_(dQ, mirrored[c - 1], value=weight).addcmul_(Q, flips[c - 1], value=weight)
    d_others = d_acc[:B] + _mirror(d_acc[B:])
    dm = W[:B] * torch.addcmul(d_others, g, others)  # the tangent of m = w e_{k-1}(others)
    return torch.addcmul(dm, x, dm.sum(-1, keepdim=True), value=-1.0 / k).mul_(scale)


class _GibbsMarginals(torch.autograd.Function):
    """Gibbs marginals of the k-subsets (B, n) float64: forward and backward by explicit prefix-sum passes
    (on the CPU by the compiled kernels of :mod:`polytopes._compiled_gibbs`)."""

    @staticmethod
    def forward(ctx, z, k):
        ctx.k, ctx.compiled = k, False
        ctx.save_for_backward(z)
        if enabled_for(z):
            span = _linear_span(z.shape[-1], k)
            if span >= 1.0:
                ctx.compiled = True
                return _compiled_forward(ctx, z, k, span)
        w, linear = _linear_weights(z, k)
        everywhere = bool(linear.all())
        ctx.everywhere = everywhere
        if everywhere:
            m, ctx.state = _linear_forward(w, k)
            return m
        out = torch.empty_like(z)
        ctx.linear_rows = rows = linear.nonzero().squeeze(-1)
        ctx.log_rows = others = (~linear).nonzero().squeeze(-1)
        if rows.numel():
            out[rows], ctx.state = _linear_forward(w[rows], k)
        out[others] = _log_space_rows(z, others, k)
        return out

    @staticmethod
    def backward(ctx, g):
        (z,) = ctx.saved_tensors
        k = ctx.k
        if torch.is_grad_enabled():
            # double backward requested (create_graph): differentiate the log-space DP twice by autograd
            m = _log_space_marginals(z, k, True)
            (hvp,) = torch.autograd.grad(m, z, g, create_graph=True)
            return hvp, None
        if ctx.compiled:
            return _compiled_hvp(ctx, z, g, k), None
        if ctx.everywhere:
            return _linear_hvp(ctx.state, g, k), None
        out = torch.empty_like(z)
        if ctx.linear_rows.numel():
            out[ctx.linear_rows] = _linear_hvp(ctx.state, g[ctx.linear_rows], k)
        with torch.enable_grad():
            rows = z[ctx.log_rows].detach().requires_grad_(True)
            m = _log_space_marginals(rows, k, True)
            (out[ctx.log_rows],) = torch.autograd.grad(m, rows, g[ctx.log_rows])
        return out, None


def _compiled_forward(ctx, z: torch.Tensor, k: int, span: float) -> torch.Tensor:
    """:meth:`_GibbsMarginals.forward` on the CPU: the compiled kernel on the qualifying rows, the log-space DP on the others."""
    from . import _compiled_gibbs

    z = z.detach().resolve_neg()  # (numpy() refuses a tensor with the negative bit, e.g. from torch._neg_view)
    x, ctx.state, count = _compiled_gibbs.gibbs_forward(
        z.numpy() if z.is_contiguous() else z.contiguous().numpy(), k, span, span + _FLOOR_MARGIN
    )
    out = torch.from_numpy(x)
    ctx.log_rows = None
    if count:
        ctx.log_rows = log_rows = torch.from_numpy(ctx.state[:, -1] == 0.0).nonzero().squeeze(-1)
        out[log_rows] = _log_space_rows(z, log_rows, k)
    return out


def _compiled_hvp(ctx, z: torch.Tensor, g: torch.Tensor, k: int) -> torch.Tensor:
    """:meth:`_GibbsMarginals.backward` (first order) after :func:`_compiled_forward`: H g by the compiled tangent passes."""
    from . import _compiled_gibbs

    g = g.detach().resolve_neg()
    out = torch.from_numpy(
        _compiled_gibbs.gibbs_hvp(ctx.state, g.numpy() if g.is_contiguous() else g.contiguous().numpy(), k)
    )
    log_rows = ctx.log_rows
    if log_rows is not None:
        with torch.enable_grad():
            rows = z[log_rows].detach().requires_grad_(True)
            m = _log_space_marginals(rows, k, True)
            (out[log_rows],) = torch.autograd.grad(m, rows, g[log_rows])
    return out


def k_subset_marginals(Z: torch.Tensor, k: int) -> torch.Tensor:
    """grad_Z log e_k(exp Z): the marginals P(i in S) of the Gibbs law p(S) ~ exp(sum_{i in S} Z_i), |S| = k.

    This is argmax_{x in P} <Z, x> - A*(x) on P = KSubset(n, k), with A the
    k-subset log-partition function (:func:`log_elementary_symmetric`).
    Z: (..., n) -> (..., n), same dtype and device; sum x = k.

    Algorithm: with w = exp(Z - max Z), item i's marginal is w_i e_{k-1}(others) / e_k
    (e_c the elementary symmetric polynomials of the weights).  The prefix
    polynomials e_j(w_1..w_t), j < k, for all t, come from one cumulative sum over
    the items per degree, for the rows and the reversed rows stacked (prefixes and
    suffixes at once); e_{k-1}(others) = sum_c e_{k-1-c}(before i) e_c(after i)
    pairs them.  All sums have positive terms (no cancellation), in float64.
    Backward: H g with H the Gibbs covariance, the tangent of the same recurrences
    along g (the tangent of a cumulative sum is a cumulative sum), no autograd
    recording.  Work O(n k) per pass; about 2k batched operations forward and 3k
    backward, with the batch vectorised.  On the CPU (``polytopes._compiled``) the
    same recurrences run in a compiled kernel (``polytopes._compiled_gibbs``: one
    forward-message table and one backward-message vector per row, blocks of rows
    vectorised): a few calls instead of the 5k dispatched torch operations of a
    forward and backward.  For k > n / 2 the complements are
    computed, x(Z, k) = 1 - x(-Z, n - k).  Rows whose k largest entries spread more
    than min(30, (600 - log C(n, k)) / k) below the maximum (small tau), where
    positive sums in float64 could over- or underflow, take the log-space DP
    (:func:`log_elementary_symmetric`) and its autograd instead.

    When C(n, k) n <= 4096 the subsets are enumerated instead: a softmax over the
    C(n, k) subset scores, differentiated by autograd (exact, and fewer operations);
    on the CPU only while B C(n, k) n <= 16384 as well (at larger batches the kernel
    takes less time).

    Precision: about 1e-15 absolute against brute force on the linear-space rows;
    on the log-space rows 1e-16 * spread(Z) (1e-10 at a spread of 1e6).  In
    float32 the sum constraint would be lost at spreads beyond about 10, so the
    computation is always float64, cast back.

    Differentiable twice: a double backward (create_graph) differentiates the
    log-space DP by autograd.
    """
    n = Z.shape[-1]
    if not 1 <= k <= n - 1:
        raise ValueError(f"k: expected 1 <= k <= n - 1 = {n - 1}, got {k}")
    if 2 * k > n:  # fewer degrees for the complements: S ~ exp<Z, S> iff its complement ~ exp<-Z, .>
        return 1.0 - k_subset_marginals(-Z, n - k)
    # (the reshape and cast are skipped where they would return Z itself: on the CPU each costs a dispatch)
    z = Z if Z.dim() == 2 and Z.dtype == torch.float64 else Z.reshape(-1, n).to(torch.float64)
    if z.shape[0] == 0:
        return Z * 0
    entries = math.comb(n, k) * n
    if entries <= _ENUMERATE_ENTRIES and (z.shape[0] * entries <= _ENUMERATE_BATCH_ENTRIES or not enabled_for(z)):
        # few subsets: the softmax over their scores is exact and costs a few batched products (on the
        # CPU, at a small batch only: at a larger one the compiled kernel takes less time)
        V = _subset_matrix(n, k, z.device)
        X = torch.softmax(z @ V.T, dim=-1) @ V
    else:
        X = _GibbsMarginals.apply(z, k)
    return X if X.dtype == Z.dtype and X.shape == Z.shape else X.to(Z.dtype).reshape(Z.shape)


# k_subset_marginals enumerates the subsets while C(n, k) n is at most this, and on the CPU with the
# compiled kernels, while B C(n, k) n is at most _ENUMERATE_BATCH_ENTRIES too.
_ENUMERATE_ENTRIES = 4096
_ENUMERATE_BATCH_ENTRIES = 16384
_SUBSET_MATRICES: dict = {}


def _subset_matrix(n: int, k: int, device) -> torch.Tensor:
    """The C(n, k) x n float64 matrix of k-hot rows on ``device`` (cached: small by construction)."""
    key = (n, k, str(device))
    V = _SUBSET_MATRICES.get(key)
    if V is None:
        V = _k_hot_rows(n, k).to(device)
        _SUBSET_MATRICES[key] = V
    return V


register_relaxation(KSubset, "exp_family_entropy")(lambda P, Z: k_subset_marginals(Z, P.k))


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


def recognize(form):
    """A candidate for :mod:`sstcvx.recognition`: one all-ones equality row whose right-hand
    side is an integer k with 1 <= k <= n - 1 proposes KSubset(n, k) (identity map); the
    core certifies it (the bounds must be [0, 1] where they are facets)."""
    n = form.n
    if n < 2 or form.m_eq != 1 or not bool((form.A[0, :n] == 1).all()):
        return None
    k = round(float(form.b[0]))
    if abs(float(form.b[0]) - k) > 1e-9 or not 1 <= k <= n - 1:
        return None
    return Match(KSubset(n, k), range(n))


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
        recognize=recognize,
    )
)
