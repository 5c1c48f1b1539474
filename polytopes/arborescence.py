"""Arborescences: P = conv of the arc-indicator matrices of the spanning arborescences rooted at ``root``.

``Arborescence(n, root=0)``: event shape ``(n, n)``, x[h, d] = 1 iff the arc h→d is in the
arborescence; every non-root vertex has exactly one incoming arc, the root none, no
cycle.  The diagonal and the root's column are always 0 (entries of U there are
ignored).  ``Arborescence(n, root, mask=M)`` restricts the arcs to a digraph (every
vertex must be reachable from the root).

Specialized solvers (Z = U / tau, shape (B, n, n)):

* hard argmax: Chu-Liu/Edmonds, batched (``polytopes._mst.maximum_arborescence``);
* ``exp_family_entropy``: the arc marginals of p(A) ∝ exp⟨Z, A⟩ by the directed
  (Tutte) Matrix-Tree theorem (``polytopes._matrix_tree``), float64 inside, exact for
  any tau.

The CVXPY declaration is the exact arborescence polytope: x ≥ 0, fixed zeros, unit
in-degree at every non-root vertex, and Σ_{h, d ∈ S} x[h, d] ≤ |S| − 1 for every set S
of non-root vertices with |S| ≥ 2 (Edmonds' branching polytope intersected with the
in-degree face); one row per subset, so built only for n ≤ ``MAX_DECLARED_N``.
"""

from __future__ import annotations

import itertools

import cvxpy as cp
import numpy as np
import torch

from sstcvx.families import Family, register_family
from sstcvx.polytope import Polytope
from sstcvx.registry import register_argmax, register_relaxation

from ._matrix_tree import arborescence_log_partition, arborescence_marginals
from ._mst import maximum_arborescence
from ._validation import check_int
from .spanning_tree import rooted_parent_arrays

__all__ = ["Arborescence", "MAX_DECLARED_N", "MAX_ENUMERATED_N"]

#: Largest n whose CVXPY declaration is built (2^(n−1) subset rows).
MAX_DECLARED_N = 8
#: Largest n whose arborescences are listed by ``_enumerate_vertices`` (n^(n−2) for the complete digraph).
MAX_ENUMERATED_N = 7


class Arborescence(Polytope):
    """The polytope of spanning arborescences rooted at ``root`` of the complete digraph on n vertices.

    ``Arborescence(n, root=0, mask=None)``; event shape ``(n, n)``.  ``P.arcs`` is the
    (n, n) bool matrix of usable arcs (no diagonal, nothing into the root, ``mask``).
    Vertices listed for n ≤ ``MAX_ENUMERATED_N``.
    """

    def __init__(self, n: int, root: int = 0, mask=None):
        n = check_int(n, "n", 2, "an arborescence needs an arc")
        root = check_int(root, "root")
        if not 0 <= root < n:
            raise ValueError(f"root: expected a vertex in [0, {n}), got {root}")
        arcs = ~torch.eye(n, dtype=torch.bool)
        arcs[:, root] = False
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != (n, n):
                raise ValueError(
                    f"mask: expected a bool tensor of shape ({n}, {n}), got "
                    f"{getattr(mask, 'dtype', type(mask).__name__)} {tuple(getattr(mask, 'shape', ()))}"
                )
            arcs &= mask.cpu()
            reach = torch.zeros(n, dtype=torch.bool)
            reach[root] = True
            for _ in range(n):
                reach = reach | (reach.unsqueeze(1) & arcs).any(0)
            if not reach.all():
                v = int((~reach).nonzero()[0])
                raise ValueError(
                    f"mask: vertex {v} cannot be reached from the root {root}, so there is no arborescence"
                )
        name = f"Arborescence(n={n}, root={root}" + (")" if mask is None else ", masked)")
        super().__init__((n, n), name=name)
        self.n, self.root = n, root
        self.arcs = arcs
        self._mask = None if mask is None else arcs

    def _declare(self):
        """x ≥ 0; x = 0 off the arcs; Σ_h x[h, d] = 1 (d ≠ root); Σ_{h,d ∈ S} x[h, d] ≤ |S| − 1."""
        n, root = self.n, self.root
        if n > MAX_DECLARED_N:
            raise ValueError(
                f"{self.name}: the CVXPY declaration of the arborescence polytope needs one row per "
                f"subset of non-root vertices (2^{n - 1}); it is built only for n <= {MAX_DECLARED_N}. "
                "Use the specialized solvers instead: sstcvx.relax(P, U, tau, 'exp_family_entropy', "
                "solver='specialized') (directed Matrix-Tree marginals) and sstcvx.argmax(P, U, "
                "solver='specialized') (Chu-Liu/Edmonds)"
            )
        x = cp.Variable((n, n))
        off = (~self.arcs).numpy().astype(np.float64)
        others = [v for v in range(n) if v != root]
        constraints = [x >= 0, cp.multiply(off, x) == 0, cp.sum(x, axis=0)[others] == 1]
        rows, rhs = [], []
        for size in range(2, n):
            for S in itertools.combinations(others, size):
                inside = np.zeros((n, n))
                inside[np.ix_(S, S)] = 1.0
                inside *= self.arcs.numpy()
                if inside.any():
                    rows.append(inside.reshape(-1))
                    rhs.append(size - 1)
        if rows:
            constraints.append(np.array(rows) @ cp.vec(x, order="C") <= np.array(rhs, dtype=np.float64))
        return x, constraints

    def _enumerate_vertices(self):
        if self.n > MAX_ENUMERATED_N:
            return None
        n = self.n
        parent = rooted_parent_arrays(n, self.root, self.arcs.numpy())
        V = np.zeros((parent.shape[0], n, n))
        child = np.array([v for v in range(n) if v != self.root])
        V[np.arange(parent.shape[0])[:, None], parent[:, child], child] = 1.0
        return torch.from_numpy(V)

    def log_partition(self, Z: torch.Tensor) -> torch.Tensor:
        """log Σ_A exp⟨Z, A⟩ (…,) for arc log-weights Z (…, n, n); Tutte, float64 inside."""
        return arborescence_log_partition(Z, self.root, self._mask)


@register_argmax(Arborescence)
def maximum_arborescence_argmax(P: Arborescence, U: torch.Tensor) -> torch.Tensor:
    """argmax_{x ∈ P} ⟨U, x⟩: the arc-indicator matrix of a maximum-score arborescence.

    U: (B, n, n) -> (B, n, n) 0/1, same dtype and device; the diagonal, the root's column
    and non-arcs of U are ignored.  Chu-Liu/Edmonds with the batch contracting in
    lockstep (``polytopes._mst.maximum_arborescence``), reduced scores in float64.
    """
    return maximum_arborescence(U, P.root, mask=P._mask).to(U.dtype)


@register_relaxation(Arborescence, "exp_family_entropy")
def tutte_marginals(P: Arborescence, Z: torch.Tensor) -> torch.Tensor:
    """X_tau = ∇ log Σ_A exp⟨Z, A⟩: the arc marginals P(h→d ∈ A) of the Gibbs distribution.

    argmax_{x ∈ P} ⟨Z, x⟩ − A*(x) with A the log-partition over arborescences.
    Z: (B, n, n) -> (B, n, n), same dtype and device; exactly 0 on the diagonal, the
    root's column and non-arcs; each non-root column sums to 1.  Directed Matrix-Tree
    theorem: x[h, d] = w_hd (L̂⁻¹[d, d] − L̂⁻¹[d, h]) by one batched inverse where that is
    accurate, log-space Gaussian elimination (exact for any tau) elsewhere, per element;
    float64 inside.  Cost O(B n³); exact backward, differentiable to any order.  See
    ``polytopes._matrix_tree``.
    """
    return arborescence_marginals(Z, P.root, P._mask)


register_family(
    Family(
        name="arborescence",
        make=lambda n, k: Arborescence(n, root=0),
        regularizers=("exp_family_entropy",),
        n=5,
        sizes=(3, 4, 5, 6, 8, 12, 16, 32),
        quick_sizes=(3, 4, 5),
        max_generic_n=6,
        device_check_n=20,
        quick_device_check_n=6,
        test_sizes=(4, 5, 6, 12),
    )
)
