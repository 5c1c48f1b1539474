"""Products of simplices: choose one item in each of G groups ("one item per group").

P = Delta_{M_1} x ... x Delta_{M_G} = conv{x in {0, 1}^n : exactly one 1 in each group}
= {x >= 0, sum_{i in group g} x_i = 1 for every g}: G independent categorical variables,
the latent structure of the paper's categorical experiments.  Two layouts:

* ``ProductSimplex(groups, items)``: G groups of M items, event shape ``(G, M)``, group g is
  row g;
* ``ProductSimplex(sizes)`` with a sequence of group sizes: event shape ``(sum(sizes),)``,
  the groups are consecutive blocks.

Every regularizer below is separable over the groups and every group is a simplex, so each
solver is the simplex's, applied per group (Z = U / tau, shape (B, *event_shape)):

* hard argmax: the best item of each group;
* ``entropy`` and ``exp_family_entropy`` (the Gibbs law of a product set factorises over the
  groups, so its marginals are per-group softmaxes too): softmax per group;
* ``euclidean``: sparsemax per group (the projection onto a product is the product of the
  projections).

Groups of unequal sizes are gathered into a (G, max size) array padded with -inf, which
softmax, sparsemax and argmax all give weight 0; equal sizes need only a reshape.
"""

from __future__ import annotations

import itertools
import math
import numbers

import cvxpy as cp
import numpy as np
import scipy.sparse
import torch

from sstcvx import Polytope, register_argmax, register_relaxation
from sstcvx.families import Family, register_family
from sstcvx.recognition import Match, row_space_projector

from ._validation import check_int
from .simplex import sparsemax

# _enumerate_vertices returns None above this many vertices or this many entries (8 MB in float64).
MAX_VERTICES = 5000
MAX_ENTRIES = 1_000_000


class ProductSimplex(Polytope):
    """{x >= 0 : the entries of each group sum to 1}, the product of G simplices.

    ``ProductSimplex(groups, items)`` (ints >= 1): event shape ``(groups, items)``, one group
    per row.  ``ProductSimplex(sizes)`` (a sequence of ints >= 1): event shape
    ``(sum(sizes),)``, group g the consecutive block of ``sizes[g]`` entries.  Attributes:
    ``sizes`` (tuple), ``groups`` (G), ``items`` (M, or ``None`` for unequal blocks).
    Vertices: the prod(sizes) one-per-group 0/1 points (listed while prod(sizes) <=
    ``MAX_VERTICES`` and n prod(sizes) <= ``MAX_ENTRIES``).
    """

    def __init__(self, groups, items: int | None = None):
        if items is not None:
            G = check_int(groups, "groups", 1)
            M = check_int(items, "items", 1)
            sizes, shape = (M,) * G, (G, M)
            name = f"ProductSimplex(groups={G}, items={M})"
        else:
            if isinstance(groups, numbers.Integral) or isinstance(groups, (str, bytes)):
                raise TypeError(
                    "groups: expected a sequence of group sizes, or ProductSimplex(groups, items) with two ints; "
                    f"got groups={groups!r} and no items"
                )
            try:
                sizes = tuple(check_int(s, f"groups[{g}]", 1) for g, s in enumerate(groups))
            except TypeError as error:
                if "groups[" in str(error):
                    raise
                raise TypeError(f"groups: expected a sequence of group sizes, got {type(groups).__name__}") from None
            if not sizes:
                raise ValueError("groups: expected at least one group, got an empty sequence")
            shape = (sum(sizes),)
            M = None
            name = f"ProductSimplex(sizes={list(sizes)})"
        super().__init__(shape, name=name)
        self.sizes = sizes
        self.groups = len(sizes)
        self.items = M
        self.offsets = tuple(itertools.accumulate((0,) + sizes))
        width = max(sizes)
        # position of each coordinate in the padded (G, width) layout, and the layout's source coordinates
        self._positions = torch.tensor(
            [g * width + i for g, size in enumerate(sizes) for i in range(size)], dtype=torch.long
        )
        source = torch.zeros(self.groups * width, dtype=torch.long)
        source[self._positions] = torch.arange(sum(sizes))
        self._source = source
        self._padding = torch.ones(self.groups * width, dtype=torch.bool)
        self._padding[self._positions] = False
        self._on_device = {}

    @property
    def regular(self) -> bool:
        """Whether every group has the same size (then the layout is a reshape)."""
        return len(set(self.sizes)) == 1

    def _declare(self):
        x = cp.Variable(tuple(self.event_shape))
        if self.items is not None:
            return x, [x >= 0, cp.sum(x, axis=1) == 1]
        n = self.offsets[-1]
        rows = np.repeat(np.arange(self.groups), self.sizes)
        S = scipy.sparse.csr_matrix((np.ones(n), (rows, np.arange(n))), shape=(self.groups, n))
        return x, [x >= 0, S @ x == np.ones(self.groups)]

    def _enumerate_vertices(self):
        count = math.prod(self.sizes)
        n = self.offsets[-1]
        if count > MAX_VERTICES or count * n > MAX_ENTRIES:
            return None
        choice = torch.tensor(list(itertools.product(*(range(s) for s in self.sizes))), dtype=torch.long)
        columns = choice + torch.tensor(self.offsets[:-1], dtype=torch.long)  # (count, G) chosen coordinates
        V = torch.zeros(count, n, dtype=torch.float64).scatter_(1, columns, 1.0)
        return V.reshape((count,) + tuple(self.event_shape))

    # -- the per-group layout ----------------------------------------------------------------
    def _layout(self, device):
        key = str(device)
        entry = self._on_device.get(key)
        if entry is None:
            entry = self._on_device[key] = (
                self._source.to(device),
                self._padding.to(device),
                self._positions.to(device),
            )
        return entry

    def to_groups(self, T: torch.Tensor, fill: float = float("-inf")) -> torch.Tensor:
        """``T`` ``(B, *event_shape)`` -> ``(B, G, max size)``, padding entries set to ``fill``."""
        B = T.shape[0]
        if self.regular:
            return T.reshape(B, self.groups, self.sizes[0])
        source, padding, _ = self._layout(T.device)
        grouped = T.reshape(B, -1).index_select(-1, source).masked_fill(padding, fill)
        return grouped.reshape(B, self.groups, -1)

    def from_groups(self, Y: torch.Tensor) -> torch.Tensor:
        """``Y`` ``(B, G, max size)`` -> ``(B, *event_shape)`` (padding dropped)."""
        B = Y.shape[0]
        if self.regular:
            return Y.reshape((B,) + tuple(self.event_shape))
        _, _, positions = self._layout(Y.device)
        return Y.reshape(B, -1).index_select(-1, positions).reshape((B,) + tuple(self.event_shape))


@register_argmax(ProductSimplex)
def per_group_argmax(P: ProductSimplex, U: torch.Tensor) -> torch.Tensor:
    """The vertex with the best item of each group (first index on ties).

    U: (B, *event_shape) -> same shape, one 1 per group, U's dtype and device.  Cost O(n).
    """
    grouped = P.to_groups(U)
    hard = torch.zeros_like(grouped).scatter_(-1, grouped.argmax(-1, keepdim=True), 1.0)
    return P.from_groups(hard)


@register_relaxation(ProductSimplex, "entropy")
@register_relaxation(ProductSimplex, "exp_family_entropy")
def per_group_softmax(P: ProductSimplex, Z: torch.Tensor) -> torch.Tensor:
    """argmax_{x in P} <Z, x> - sum x log x = softmax(Z) in each group.

    It is also the exponential-family relaxation: the log-partition function of a product set
    is the sum of the groups' logsumexp, so the Gibbs marginals are the per-group softmax.

    Z: (B, *event_shape) -> same shape and dtype.  Cost O(n).  Exact to rounding for any
    finite Z (torch's softmax subtracts each group's maximum); each group sums to 1 to
    O(M eps) of the dtype.
    """
    return P.from_groups(torch.softmax(P.to_groups(Z), dim=-1))


@register_relaxation(ProductSimplex, "euclidean")
def per_group_sparsemax(P: ProductSimplex, Z: torch.Tensor) -> torch.Tensor:
    """argmin_{x in P} ||x - Z||^2 = sparsemax(Z) in each group.

    The squared distance is a sum over groups and the constraints are per group, so the
    projection is the simplex projection of each group (``polytopes.simplex.sparsemax``:
    exact by sorting, float64 internally, exact backward).  Padding entries (-inf) never
    enter a support.  Z: (B, *event_shape) -> same shape and dtype.  Cost O(n log M).
    """
    return P.from_groups(sparsemax(P.to_groups(Z)))


# ----------------------------------------------------------------------------------------------
# recognition
# ----------------------------------------------------------------------------------------------


def recognize(form):
    """A candidate for :mod:`sstcvx.recognition`: at least two equalities whose span splits the
    coordinates into as many groups of two or more.

    The groups are read from the projector R onto the span of the equality rows (independent
    of how they were written: scaled, combined or reordered): for the group sums of a product
    of simplices R is block-diagonal with blocks 1 1^T / M_g, so the groups are the connected
    components of {R_ij != 0}.  Groups are numbered by their smallest coordinate, items in
    increasing order, so a declared (G, M) matrix with row sums maps to itself; equal sizes
    give ``ProductSimplex(G, M)``, unequal ones ``ProductSimplex(sizes)``.  Cost O(n^2) after
    the projector; the core certifies the candidate.
    """
    from scipy.sparse.csgraph import connected_components

    n = form.n
    if form.m_eq < 2 or not bool((form.lower[:n] >= 0).all()):
        return None
    R = row_space_projector(form)
    count, labels = connected_components(np.abs(R) > 1e-9, directed=False)
    if count != form.m_eq:
        return None
    groups = sorted((np.flatnonzero(labels == c) for c in range(count)), key=lambda g: int(g[0]))
    sizes = [len(g) for g in groups]
    if min(sizes) < 2:
        return None
    index = np.concatenate(groups)
    Q = ProductSimplex(len(sizes), sizes[0]) if len(set(sizes)) == 1 else ProductSimplex(sizes)
    return Match(Q, index)


def _make(n: int, k: int | None) -> ProductSimplex:
    """n groups of k items (4 when not given)."""
    return ProductSimplex(n, 4 if k is None else k)


register_family(
    Family(
        name="product_simplex",
        make=_make,
        regularizers=("entropy", "euclidean", "exp_family_entropy"),
        n=5,
        sizes=(2, 5, 10, 20, 50, 100, 250),
        quick_sizes=(2, 5, 20),
        max_generic_n=50,
        device_check_n=20,
        quick_device_check_n=5,
        uses_k=True,
        recognize=recognize,
    )
)
