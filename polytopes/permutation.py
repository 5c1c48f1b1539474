"""The Birkhoff polytope: conv of the n x n permutation matrices, event shape (n, n).

x[i, j] = 1 iff item i takes position j; P = {x >= 0, x 1 = 1, x^T 1 = 1}
(Birkhoff-von Neumann).  This module holds the polytope, the hard argmax (the
maximum-weight assignment) and the registrations; the relaxations live beside it and
need no polytope object (Z = U / tau, shape (B, n, n)):

* hard argmax: :func:`max_weight_assignment`: SciPy's Hungarian method on the CPU
  (:func:`hungarian`), a batched auction on the tensor's device for CUDA tensors
  (:func:`auction_assignment`), both exact;
* ``entropy`` (f = sum x log x): the Sinkhorn fixed point (:func:`polytopes.sinkhorn.sinkhorn`);
* ``euclidean`` (f = ||x||^2 / 2): the projection onto the Birkhoff polytope
  (:func:`polytopes.birkhoff.birkhoff_projection`).

References: Paulus et al., "Gradient estimation with stochastic softmax tricks",
NeurIPS 2020; Bertsekas, "The auction algorithm: a distributed relaxation method for
the assignment problem", Annals of Operations Research 1988 (the auction and its
epsilon-scaling).
"""

from __future__ import annotations

import itertools
import math

import cvxpy as cp
import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from sstcvx.families import Family, register_family
from sstcvx.polytope import Polytope
from sstcvx.recognition import Match, row_space_projector
from sstcvx.registry import register_argmax, register_relaxation

from ._kernels import check_square
from ._validation import check_int
from .birkhoff import _birkhoff, birkhoff_projection
from .sinkhorn import _sinkhorn, sinkhorn

__all__ = ["Permutation", "max_weight_assignment", "hungarian", "auction_assignment", "sinkhorn", "birkhoff_projection"]

# _enumerate_vertices lists the n! permutation matrices up to this n (720 at n = 6).
MAX_ENUMERATE_N = 6


class Permutation(Polytope):
    """The Birkhoff polytope {x in R^(n x n) : x >= 0, rows and columns sum to 1}.

    ``Permutation(n)``, n >= 2; event shape ``(n, n)``, x[i, j] = 1 iff item i
    takes position j.  Its vertices are the n! permutation matrices (listed
    for n <= ``MAX_ENUMERATE_N``).
    """

    def __init__(self, n: int):
        n = check_int(n, "n", 2, "a permutation of at least two items")
        super().__init__((n, n), name=f"Permutation(n={n})")
        self.n = n

    def _declare(self):
        x = cp.Variable((self.n, self.n))
        return x, [x >= 0, cp.sum(x, axis=1) == 1, cp.sum(x, axis=0) == 1]

    def _enumerate_vertices(self):
        if self.n > MAX_ENUMERATE_N:
            return None
        perms = torch.tensor(list(itertools.permutations(range(self.n))), dtype=torch.long)
        eye = torch.eye(self.n, dtype=torch.float64)
        return eye[perms]  # (n!, n, n): row i of vertex k is e_{perm_k[i]}


# ---------------------------------------------------------------------------------------------
# Hard argmax: the maximum-weight assignment
# ---------------------------------------------------------------------------------------------


def _check_assignment_input(U) -> None:
    check_square(U, "U")
    if not bool(torch.isfinite(U).all()):
        raise ValueError("U: expected finite values")


def _permutation_matrices(cols: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The permutation matrices (B, n, n) with ones at (i, cols[i]), in like's dtype and device."""
    X = torch.zeros(cols.shape + (cols.shape[-1],), dtype=like.dtype, device=like.device)
    return X.scatter_(-1, cols.unsqueeze(-1), 1.0)


def _scipy_columns(flat: torch.Tensor) -> torch.Tensor:
    """SciPy's optimal columns (B, n) long on the CPU for float64 U (B, n, n) on the CPU."""
    array = flat.numpy()
    cols = np.empty(array.shape[:2], dtype=np.int64)
    for b in range(array.shape[0]):  # SciPy solves one matrix per call
        cols[b] = linear_sum_assignment(array[b], maximize=True)[1]
    return torch.from_numpy(cols)


def hungarian(U: torch.Tensor) -> torch.Tensor:
    """The permutation matrix maximising <U, x>: argmax over the Birkhoff polytope's vertices, by SciPy.

    U: (..., n, n) -> (..., n, n) permutation matrices, U's dtype and device.
    Solved by the Hungarian method (SciPy's ``linear_sum_assignment``, a
    shortest augmenting path variant) in float64 on the CPU, one batch element
    at a time: O(n^3) each, plus a device round trip when U is on a GPU.
    Ties (probability zero under continuous noise) are broken by SciPy.  The
    reference for :func:`auction_assignment`.
    """
    _check_assignment_input(U)
    n = U.shape[-1]
    cols = _scipy_columns(U.detach().reshape(-1, n, n).to("cpu", torch.float64))
    return _permutation_matrices(cols.to(U.device), U).reshape(U.shape)


# Auction: epsilon shrinks this factor per phase; the first phase has epsilon = spread / factor.
_AUCTION_SCALE = 6.0
# Real (non-integer) utilities: the last phase's epsilon, relative to the spread of U over n.
_AUCTION_FINAL = 1e-9


@torch.no_grad()
def _auction(U: torch.Tensor, max_rounds: int):
    """Forward auction with Jacobi bidding and epsilon-scaling on U float64 (B, n, n); (cols, done) or None.

    Every unassigned person bids for its best object at price + (best - second best
    value) + eps; each object goes to its highest bidder (lowest index on ties) and
    its price rises to that bid.  A phase ends when everyone is assigned, which
    leaves eps-complementary slackness: the assignment is within n eps of optimal.
    Phases shrink eps by _AUCTION_SCALE, keeping the prices.  Integer U: the last
    phase has eps = 1 / (n + 1) < 1 / n, which makes the result optimal.  Returns
    None when ``max_rounds`` bidding rounds do not suffice.
    """
    B, n, _ = U.shape
    device = U.device
    spread = U.amax((-2, -1)) - U.amin((-2, -1))
    if bool((U == U.round()).all()):
        final = torch.full_like(spread, 1.0 / (n + 1))
    else:
        final = (spread * (_AUCTION_FINAL / n)).clamp_min(torch.finfo(U.dtype).tiny)
    eps = torch.maximum(spread / _AUCTION_SCALE, final).unsqueeze(-1)
    final = final.unsqueeze(-1)
    prices = U.new_zeros(B, n)
    persons = torch.arange(n, device=device).expand(B, n)
    none = torch.full((B, n), n, dtype=torch.long, device=device)
    rounds = 0
    while True:
        owner = none  # object -> person, n = unowned
        while True:
            assigned = torch.zeros(B, n + 1, dtype=torch.bool, device=device).scatter_(1, owner, True)[:, :n]
            bidders = ~assigned
            if not bool(bidders.any()):
                break
            rounds += 1
            if rounds > max_rounds:
                return None
            values = U - prices.unsqueeze(1)
            best, target = values.max(-1)
            second = values.scatter(-1, target.unsqueeze(-1), float("-inf")).amax(-1)
            bid = torch.where(bidders, best - second + eps + prices.gather(1, target), float("-inf"))
            top = torch.full_like(prices, float("-inf")).scatter_reduce(1, target, bid, "amax")
            wins = bidders & (bid == top.gather(1, target))
            winner = none.scatter_reduce(1, target, torch.where(wins, persons, n), "amin")
            has_bid = winner < n
            owner = torch.where(has_bid, winner, owner)
            prices = torch.where(has_bid, top, prices)
        if bool((eps <= final).all()):
            break
        eps = torch.maximum(eps / _AUCTION_SCALE, final)
    cols = torch.empty_like(owner).scatter_(1, owner, persons)
    return cols


@torch.no_grad()
def _certified(U: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """(B,) bool: no reassignment cycle improves the assignment cols of U float64 (B, n, n) beyond rounding.

    Gains A[i, i'] = U[i, cols[i']] - U[i, cols[i]] (person i taking i''s object);
    the assignment is optimal iff no cycle of A has positive total.  Longest paths
    from a virtual source by Bellman-Ford (max-plus, n rounds of O(n^2)): they settle
    iff there is no positive cycle.  Improvements below 8 n eps max|U| (the rounding
    of the sums) are ties.  Exact for integer U of magnitude below 2^40.
    """
    B, n, _ = U.shape
    own = U.gather(2, cols.unsqueeze(-1))
    A = U.gather(2, cols.unsqueeze(1).expand(B, n, n)) - own
    tol = (8 * n * torch.finfo(U.dtype).eps) * U.abs().amax((-2, -1), keepdim=True).squeeze(-1)
    d = U.new_zeros(B, n)
    for _ in range(n):
        new = torch.maximum(d, (d.unsqueeze(-1) + A).amax(1))
        if bool((new <= d).all()):
            break
        d = new
    new = torch.maximum(d, (d.unsqueeze(-1) + A).amax(1))
    return ~((new - d) > tol).any(-1)


def auction_assignment(U: torch.Tensor, max_rounds: int = 100_000) -> torch.Tensor:
    """The maximum-weight assignment by a batched auction on U's device; exact.

    U: (..., n, n) -> (..., n, n) permutation matrices, U's dtype and device.
    Algorithm: a forward auction (Bertsekas) with Jacobi bidding, vectorised over
    the batch, with epsilon-scaling (see :func:`_auction`); its result is within
    n eps of optimal.  Integer utilities end at eps < 1 / n, which is exact.  Every
    element is then certified by a longest-path check for improving cycles
    (:func:`_certified`, O(n^3)); elements that fail it (real utilities whose best
    two assignments differ by less than n eps = 1e-9 spread) or exceed
    ``max_rounds`` bidding rounds are solved by SciPy (:func:`hungarian`), so the
    result is always an optimal assignment (on exact ties possibly another one
    than SciPy's).  Cost: O(n^2) per bidding round and element, about 10-20 n
    rounds; one host synchronisation per round.  Computed in float64.
    """
    _check_assignment_input(U)
    n = U.shape[-1]
    flat = U.detach().reshape(-1, n, n).to(torch.float64)
    if flat.shape[0] == 0:
        return U.detach() * 0
    cols = _auction(flat, max_rounds)
    if cols is None:
        cols = _scipy_columns(flat.cpu()).to(U.device)
    else:
        bad = ~_certified(flat, cols)
        if bool(bad.any()):
            index = bad.nonzero().squeeze(-1)
            cols[index] = _scipy_columns(flat[index].cpu()).to(U.device)
    return _permutation_matrices(cols, U).reshape(U.shape)


def max_weight_assignment(U: torch.Tensor, method: str = "auto") -> torch.Tensor:
    """argmax over the permutation matrices of <U, x>, exact: the registered hard argmax of :class:`Permutation`.

    U: (..., n, n) -> (..., n, n), U's dtype and device.  ``method``: ``"scipy"``
    (:func:`hungarian`, on the CPU), ``"auction"`` (:func:`auction_assignment`, on
    U's device), or ``"auto"``: the auction for CUDA tensors (no device round trip),
    SciPy for CPU tensors (on the CPU the SciPy loop is the faster of the two at
    every size measured; see docs/benchmarks.md).
    """
    if method == "auto":
        method = "auction" if isinstance(U, torch.Tensor) and U.is_cuda else "scipy"
    if method == "scipy":
        return hungarian(U)
    if method == "auction":
        return auction_assignment(U)
    raise ValueError(f"method: expected 'auto', 'scipy' or 'auction', got {method!r}")


register_argmax(Permutation)(lambda P, U: max_weight_assignment(U))
register_relaxation(Permutation, "entropy")(lambda P, Z: _sinkhorn(Z))
register_relaxation(Permutation, "euclidean")(lambda P, Z: _birkhoff(Z))


def recognize(form):
    """A candidate for :mod:`sstcvx.recognition`: Permutation(s) when n = s^2 coordinates carry
    2s - 1 independent equalities that couple them like the rows and columns of an s x s grid.

    The grid is read from the projector R onto the span of the equality rows, which does not
    depend on how they were written: for the row and column sums of a grid,
    R[(i, j), (k, l)] = [i = k] / s + [j = l] / s - 1 / s^2, positive exactly when the two
    cells share a line.  Coordinate 0's neighbours form two cliques (its line-mates in either
    direction; the one holding the smaller index is called its row); every cell of its column
    then spans one row (itself and its neighbours off that column), and likewise for columns.
    Rows and columns are numbered by their smallest coordinate, so a declared (s, s) matrix
    maps to itself.  Cost O(n^2) after the projector; the core certifies the candidate.
    """
    from scipy.sparse.csgraph import connected_components

    n = form.n
    s = math.isqrt(n)
    if s < 2 or s * s != n or form.m_eq != 2 * s - 1 or not bool((form.lower[:n] >= 0).all()):
        return None
    R = row_space_projector(form)
    linked = R > 0.5 / n  # same line: (s - 1) / s^2; otherwise -1 / s^2
    np.fill_diagonal(linked, False)
    if not np.all(linked.sum(axis=1) == 2 * (s - 1)):
        return None
    neighbours = np.flatnonzero(linked[0])
    count, labels = connected_components(linked[np.ix_(neighbours, neighbours)], directed=False)
    if count != 2:
        return None
    row_side = labels == labels[0]  # neighbours[0] is the smallest neighbour
    row0 = np.concatenate([[0], neighbours[row_side]])
    col0 = np.concatenate([[0], neighbours[~row_side]])
    if len(row0) != s or len(col0) != s:
        return None
    row_of = np.full(n, -1)
    col_of = np.full(n, -1)
    for label, cells in ((row_of, col0), (col_of, row0)):
        lines = []
        for c in cells:
            mates = np.setdiff1d(np.flatnonzero(linked[c]), cells)
            lines.append(np.concatenate([[c], mates]))
        for number, line in enumerate(sorted(lines, key=lambda line: int(line.min()))):
            if len(line) != s or np.any(label[line] >= 0):
                return None
            label[line] = number
    if np.any(row_of < 0) or np.any(col_of < 0):
        return None
    index = np.full(n, -1)
    index[row_of * s + col_of] = np.arange(n)
    if np.any(index < 0):
        return None
    return Match(Permutation(s), index)


register_family(
    Family(
        name="permutation",
        make=lambda n, k: Permutation(n),
        regularizers=("entropy", "euclidean"),
        n=4,
        sizes=(3, 4, 6, 8, 12, 16, 32),
        quick_sizes=(3, 5, 8),
        max_generic_n=12,
        device_check_n=8,
        quick_device_check_n=4,
        recognize=recognize,
    )
)
