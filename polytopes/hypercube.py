"""The unit hypercube: P = conv{0, 1}^n = [0, 1]^n, event shape (n,): n independent bits.

Specialized solvers (Z = U / tau, shape (B, n)), all coordinate-wise closed forms:

* hard argmax: the indicator of U > 0;
* ``binary_entropy`` (f = sum x log x + (1 - x) log(1 - x)) and
  ``exp_family_entropy`` (the Gibbs distribution on {0, 1}^n factorises into
  independent bits, so its marginals are the same map): sigmoid(Z);
* ``euclidean`` (f = 1/2 ||x||^2): the projection clamp(Z, 0, 1).
"""

from __future__ import annotations

import cvxpy as cp
import torch

from sstcvx import Polytope, register_argmax, register_relaxation
from sstcvx.families import Family, register_family
from sstcvx.recognition import Match

from ._validation import check_int

# Above this many vertices (2^n) _enumerate_vertices returns None.
MAX_VERTICES = 5000


class Hypercube(Polytope):
    """conv{0, 1}^n = {x in R^n : 0 <= x <= 1}.

    ``Hypercube(n)``, n >= 1; event shape ``(n,)``.  Vertices: all 2^n bit
    vectors (listed while 2^n <= ``MAX_VERTICES``, i.e. n <= 12).
    """

    def __init__(self, n: int):
        n = check_int(n, "n", 1)
        super().__init__((n,), name=f"Hypercube(n={n})")
        self.n = n

    def _declare(self):
        x = cp.Variable(self.n)
        return x, [x >= 0, x <= 1]

    def _enumerate_vertices(self):
        if 2**self.n > MAX_VERTICES:
            return None
        codes = torch.arange(2**self.n).unsqueeze(-1)
        bits = torch.arange(self.n - 1, -1, -1)
        return ((codes >> bits) & 1).to(torch.float64)


@register_argmax(Hypercube)
def threshold_argmax(P: Hypercube, U: torch.Tensor) -> torch.Tensor:
    """The vertex 1[U > 0] maximising <U, x> over [0, 1]^n (ties at 0 go to 0).

    U: (..., n) -> (..., n) in {0, 1}, same dtype and device.  Cost O(n).
    """
    return (U > 0).to(U.dtype)


# binary_entropy, and exp_family_entropy (the Gibbs law on {0, 1}^n has independent bits): sigmoid(Z),
# accurate to rounding for every finite Z, saturating to exactly 0 or 1.  euclidean: the projection
# clamp(Z, 0, 1), exact (no arithmetic); its Jacobian is the indicator of 0 < Z < 1.  All O(n), in the
# input's precision.
register_relaxation(Hypercube, "binary_entropy")(lambda P, Z: torch.sigmoid(Z))
register_relaxation(Hypercube, "exp_family_entropy")(lambda P, Z: torch.sigmoid(Z))
register_relaxation(Hypercube, "euclidean")(lambda P, Z: Z.clamp(0.0, 1.0))


def recognize(form):
    """A candidate for :mod:`sstcvx.recognition`: no rows at all (only bounds) proposes
    Hypercube(n) (identity map); the core certifies that the bounds are exactly [0, 1]."""
    if form.m_eq or form.m_in:
        return None
    return Match(Hypercube(form.n), range(form.n))


@register_relaxation(Hypercube, "separable")
def separable_hypercube(P: Hypercube, Z: torch.Tensor, regularizer) -> torch.Tensor:
    """argmax_{x in [0,1]^n} <Z, x> - sum_i phi(x_i) for any ``Regularizer.separable``: phi's mirror map.

    x_i = clamp((phi')^{-1}(Z_i), 0, 1) (on [0, 1] intersected with phi's domain), backward
    diag(1 / phi''(x)) (0 at the bounds).  See :func:`sstcvx.separable.box_relaxation`.
    """
    from sstcvx.separable import box_relaxation

    return box_relaxation(regularizer, Z, 0.0, 1.0, P.name)


register_family(
    Family(
        name="hypercube",
        make=lambda n, k: Hypercube(n),
        regularizers=("binary_entropy", "euclidean"),
        n=10,
        sizes=(5, 10, 20, 50, 100, 300, 1000),
        quick_sizes=(5, 20, 100),
        max_generic_n=300,
        device_check_n=50,
        quick_device_check_n=10,
        recognize=recognize,
    )
)
