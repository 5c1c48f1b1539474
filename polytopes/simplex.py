"""The probability simplex: P = conv{e_1, ..., e_n} = {x >= 0, sum x = 1}, event shape (n,).

Specialized solvers (Z = U / tau, shape (B, n)):

* hard argmax: the one-hot vector of argmax_i U_i;
* ``entropy`` (f = sum x log x) and ``exp_family_entropy`` (on the simplex the
  Gibbs marginals are the same map): softmax(Z), the Gumbel-Softmax relaxation;
* ``euclidean`` (f = 1/2 ||x||^2): sparsemax(Z), the Euclidean projection of Z
  onto the simplex (Martins & Astudillo, 2016), exact (a sort for short rows, Newton steps on
  the threshold for long ones).
"""

from __future__ import annotations

import cvxpy as cp
import torch

from sstcvx import Polytope, register_argmax, register_relaxation
from sstcvx.families import Family, register_family
from sstcvx.recognition import Match

from ._kernels import rank_one_vjp, simplex_threshold
from ._validation import check_int

# _enumerate_vertices returns None above this many vertices or this many entries (8 MB in float64).
MAX_VERTICES = 5000
MAX_ENTRIES = 1_000_000


class Simplex(Polytope):
    """conv of the n one-hot vectors of length n: {x in R^n : x >= 0, sum_i x_i = 1}.

    ``Simplex(n)``, n >= 1; event shape ``(n,)``.  Vertices: the rows of the
    identity (listed while n <= ``MAX_VERTICES`` and n^2 <= ``MAX_ENTRIES``, i.e. n <= 1000).
    """

    def __init__(self, n: int):
        n = check_int(n, "n", 1)
        super().__init__((n,), name=f"Simplex(n={n})")
        self.n = n

    def _declare(self):
        x = cp.Variable(self.n)
        return x, [x >= 0, cp.sum(x) == 1]

    def _enumerate_vertices(self):
        if self.n > MAX_VERTICES or self.n * self.n > MAX_ENTRIES:
            return None
        return torch.eye(self.n, dtype=torch.float64)


@register_argmax(Simplex)
def one_hot_argmax(P: Simplex, U: torch.Tensor) -> torch.Tensor:
    """The vertex e_i with i = argmax_i U_i (first index on ties).

    U: (..., n) -> (..., n) one-hot, same dtype and device.  Cost O(n) per row.
    """
    index = U.argmax(dim=-1, keepdim=True)
    return torch.zeros_like(U).scatter_(-1, index, 1.0)


# entropy, and exp_family_entropy (on the simplex the Gibbs marginals are the same map): softmax(Z),
# in the input's precision; torch's softmax subtracts the row maximum, so it is exact to rounding for
# any finite Z and sums to 1 to O(n eps) of that dtype.  O(n).
register_relaxation(Simplex, "entropy")(lambda P, Z: torch.softmax(Z, dim=-1))
register_relaxation(Simplex, "exp_family_entropy")(lambda P, Z: torch.softmax(Z, dim=-1))


class _Sparsemax(torch.autograd.Function):
    """max(Z - t, 0) with sum 1; exact forward (Newton steps on t, or a sort), backward on the support S = {x > 0}."""

    @staticmethod
    def forward(ctx, Z):
        z = Z.detach().to(torch.float64)
        x = (z - simplex_threshold(z)).clamp_min(0.0)
        support = x > 0
        ctx.save_for_backward(support.to(Z.dtype))
        return x.to(Z.dtype)

    @staticmethod
    def backward(ctx, g):
        # dt = sum_S dZ / |S|, so J = diag(s) - s s^T / |s| (symmetric) and J^T g = s (g - mean_S g);
        # linear in g through differentiable ops, so it differentiates again (to zero, as it should)
        (support,) = ctx.saved_tensors
        return rank_one_vjp(support, g, 1.0)


def sparsemax(Z: torch.Tensor) -> torch.Tensor:
    """argmin_{x in simplex} ||x - Z||^2 = max(Z - t, 0), sum = 1: sparsemax.

    Z: (..., n) -> (..., n), same dtype.  The threshold t = (sum_{i in S}
    Z_i - 1) / |S| over the support S is found exactly: for n < 64 from the
    sorted cumulative sums (Martins & Astudillo, 2016, Alg. 1; O(n log n)), for
    longer rows by Newton's steps on t from below, each a recomputation of that
    formula over the current support {Z > t} (O(n) per step, a handful of
    steps; see ``simplex_threshold``).
    Backward: the exact Jacobian diag(s) - s s^T / |s| (s the support
    indicator) applied in O(n) (a torch.autograd.Function).

    Precision: float64 internally, cast back.  t is a difference of sums of
    size |Z| and the output a difference Z_i - t; in float32 the rounding of
    those sums (|Z| n eps) would break sum x = 1 by more than 1e-6 as soon as
    |Z| reaches about 10 (tau = 1e-3 with |theta| = 1e-2 already gives that).
    """
    return _Sparsemax.apply(Z)


register_relaxation(Simplex, "euclidean")(lambda P, Z: sparsemax(Z))


def recognize(form):
    """A candidate for :mod:`sstcvx.recognition`: one all-ones equality row with right-hand
    side 1 and n >= 2 coordinates proposes Simplex(n) (symmetric, so the identity map);
    the core certifies it."""
    n = form.n
    if n < 2 or form.m_eq != 1 or not bool((form.A[0, :n] == 1).all()) or abs(float(form.b[0]) - 1.0) > 1e-9:
        return None
    return Match(Simplex(n), range(n))


@register_relaxation(Simplex, "separable")
def separable_simplex(P: Simplex, Z: torch.Tensor, regularizer) -> torch.Tensor:
    """argmax_{x in simplex} <Z, x> - sum_i phi(x_i) for any ``Regularizer.separable``: x_i = x(Z_i - nu).

    x(v) is phi's mirror map on [0, 1] intersected with its domain, nu the one scalar per row
    with sum_i x(Z_i - nu) = 1 (safeguarded Newton); exact implicit backward
    dZ = D (g - <D, g> / sum D), D = 1 / phi''(x).  See :func:`sstcvx.separable.sum_relaxation`.
    """
    from sstcvx.separable import sum_relaxation

    return sum_relaxation(regularizer, Z, 1.0, 0.0, 1.0, P.name)


register_family(
    Family(
        name="simplex",
        make=lambda n, k: Simplex(n),
        regularizers=("entropy", "euclidean", "exp_family_entropy"),
        n=10,
        sizes=(5, 10, 20, 50, 100, 300, 1000),
        quick_sizes=(5, 20, 100),
        max_generic_n=300,
        device_check_n=50,
        quick_device_check_n=10,
        recognize=recognize,
    )
)
