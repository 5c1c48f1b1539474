"""Spanning trees: P = conv of the edge-indicator vectors of the spanning trees of a graph.

``SpanningTree(n)`` is the complete graph K_n, event shape ``(n(n−1)/2,)``: entry e is
the edge ``P.edges[e] = (i, j)``, i < j, in the row-major order of
``torch.triu_indices(n, n, 1)``.  ``SpanningTree(n, edges=...)`` takes any connected
simple graph given by its edge list (E, 2).

Specialized solvers (Z = U / tau, shape (B, E)):

* hard argmax: a maximum-weight spanning tree (batched Prim, ``polytopes._mst``);
* ``exp_family_entropy``: the edge marginals of p(T) ∝ exp⟨Z, T⟩ by Kirchhoff's
  Matrix-Tree theorem (``polytopes._matrix_tree``), float64 inside, exact for any tau.

The CVXPY declaration (the generic path's ground truth) is the subtour-elimination
description of the spanning-tree polytope (Edmonds 1971), one row per vertex subset,
so it is built only for n ≤ ``MAX_DECLARED_N``.
"""

from __future__ import annotations

import itertools

import cvxpy as cp
import numpy as np
import torch

from sstcvx.families import Family, register_family
from sstcvx.polytope import Polytope
from sstcvx.registry import register_argmax, register_relaxation

from ._matrix_tree import spanning_tree_log_partition, spanning_tree_marginals
from ._mst import maximum_spanning_tree
from ._validation import check_int

__all__ = ["SpanningTree", "MAX_DECLARED_N", "MAX_ENUMERATED_N"]

#: Largest n whose CVXPY declaration is built (2^n subset rows).
MAX_DECLARED_N = 8
#: Largest n whose trees are listed by ``_enumerate_vertices`` (n^(n−2) trees of K_n).
MAX_ENUMERATED_N = 7


def _check_edges(edges, n):
    """Validate a simple undirected edge list; return it as a (E, 2) LongTensor with i < j."""
    try:
        e = torch.as_tensor(edges)
    except (TypeError, ValueError):
        raise TypeError(f"edges: expected an (E, 2) integer tensor, got {type(edges).__name__}") from None
    if e.dim() != 2 or e.shape[1] != 2 or e.shape[0] < 1:
        raise ValueError(f"edges: expected shape (E, 2) with E >= 1, got {tuple(e.shape)}")
    if e.is_floating_point() or e.is_complex() or e.dtype == torch.bool:
        raise TypeError(f"edges: expected an integer tensor, got dtype {e.dtype}")
    e = e.long().cpu()
    if (e < 0).any() or (e >= n).any():
        raise ValueError(f"edges: vertices must lie in [0, {n}), got values in [{int(e.min())}, {int(e.max())}]")
    if (e[:, 0] == e[:, 1]).any():
        k = int((e[:, 0] == e[:, 1]).nonzero()[0])
        raise ValueError(f"edges: row {k} is a loop ({int(e[k, 0])}, {int(e[k, 1])}); a tree has no loops")
    e = torch.stack([e.min(dim=1).values, e.max(dim=1).values], dim=1)
    if torch.unique(e, dim=0).shape[0] != e.shape[0]:
        raise ValueError("edges: contains a repeated edge; give each undirected edge once")
    # connectivity, by union-find
    parent = list(range(n))

    def find(a):
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for i, j in e.tolist():
        parent[find(i)] = find(j)
    if len({find(v) for v in range(n)}) != 1:
        raise ValueError(f"edges: the graph on {n} vertices is disconnected, so it has no spanning tree")
    return e


def rooted_parent_arrays(n: int, root: int, allowed: np.ndarray) -> np.ndarray:
    """All arborescences of a digraph rooted at ``root``, as parent arrays (K, n), parent[root] = root.

    ``allowed`` (n, n) bool: arc h→d usable.  Enumerates the (n−1)^(n−1) choices of one
    parent per non-root vertex and keeps those where following parents reaches the root
    (pointer doubling, vectorised in numpy).  Used by both tree families for n ≤ 7.
    """
    others = [v for v in range(n) if v != root]
    choices = [[h for h in range(n) if h != d and allowed[h, d]] for d in others]
    if any(len(c) == 0 for c in choices):
        return np.zeros((0, n), dtype=np.int64)
    grid = np.array(list(itertools.product(*choices)), dtype=np.int64).reshape(-1, n - 1)
    parent = np.empty((grid.shape[0], n), dtype=np.int64)
    parent[:, others] = grid
    parent[:, root] = root
    jump = parent.copy()
    for _ in range(max(1, int(np.ceil(np.log2(n))))):
        jump = np.take_along_axis(jump, jump, axis=1)
    return parent[(jump == root).all(axis=1)]


class SpanningTree(Polytope):
    """The spanning-tree polytope of a connected graph on n vertices.

    ``SpanningTree(n)``: the complete graph K_n; ``SpanningTree(n, edges=E)``: the graph
    with edge list E (E, 2).  Event shape ``(E,)``; ``P.edges`` (E, 2) LongTensor, i < j,
    for K_n in ``torch.triu_indices(n, n, 1)`` order.  Vertices: the indicator vectors of
    spanning trees (n^(n−2) of them for K_n, Cayley), listed for n ≤ ``MAX_ENUMERATED_N``.
    """

    def __init__(self, n: int, edges=None):
        n = check_int(n, "n", 2, "a spanning tree needs an edge")
        if edges is None:
            self.edges = torch.triu_indices(n, n, 1).T.contiguous()
            name = f"SpanningTree(n={n})"
        else:
            self.edges = _check_edges(edges, n)
            name = f"SpanningTree(n={n}, E={self.edges.shape[0]})"
        self.n = n
        self.complete = edges is None
        E = self.edges.shape[0]
        super().__init__((E,), name=name)
        self._adjacency_mask = None
        if not self.complete:
            mask = torch.zeros(n, n, dtype=torch.bool)
            mask[self.edges[:, 0], self.edges[:, 1]] = True
            mask[self.edges[:, 1], self.edges[:, 0]] = True
            self._adjacency_mask = mask

    def _declare(self):
        """x ∈ [0, 1]^E, Σ x = n − 1, Σ_{e ⊆ S} x_e ≤ |S| − 1 for every S ⊂ V with |S| ≥ 2.

        The subtour-elimination (Edmonds) description: exactly the spanning-tree polytope.
        """
        n, E = self.n, self.edges.shape[0]
        if n > MAX_DECLARED_N:
            raise ValueError(
                f"{self.name}: the CVXPY declaration of the spanning-tree polytope needs one row per "
                f"vertex subset (2^{n}); it is built only for n <= {MAX_DECLARED_N}. Use the specialized "
                "solvers instead: sstcvx.relax(P, U, tau, 'exp_family_entropy', solver='specialized') "
                "(Matrix-Tree marginals) and sstcvx.argmax(P, U, solver='specialized') (maximum spanning tree)"
            )
        ends = self.edges.numpy()
        rows, rhs = [], []
        for size in range(2, n):
            for S in itertools.combinations(range(n), size):
                inside = np.isin(ends, S).all(axis=1)
                if inside.any():
                    rows.append(inside.astype(np.float64))
                    rhs.append(size - 1)
        x = cp.Variable(E)
        constraints = [x >= 0, x <= 1, cp.sum(x) == n - 1]
        if rows:
            constraints.append(np.array(rows) @ x <= np.array(rhs, dtype=np.float64))
        return x, constraints

    def _enumerate_vertices(self):
        if self.n > MAX_ENUMERATED_N:
            return None
        n = self.n
        allowed = np.ones((n, n), dtype=bool) if self.complete else self._adjacency_mask.numpy()
        # an undirected spanning tree is an arborescence rooted at 0 of the symmetric digraph
        parent = rooted_parent_arrays(n, 0, allowed)
        index = -np.ones((n, n), dtype=np.int64)
        ends = self.edges.numpy()
        index[ends[:, 0], ends[:, 1]] = np.arange(len(ends))
        index[ends[:, 1], ends[:, 0]] = np.arange(len(ends))
        V = np.zeros((parent.shape[0], len(ends)))
        child = np.arange(1, n)
        V[np.arange(parent.shape[0])[:, None], index[parent[:, 1:], child]] = 1.0
        return torch.from_numpy(V)

    def adjacency(self, x: torch.Tensor) -> torch.Tensor:
        """The symmetric (…, n, n) matrix of edge values x (…, E); 0 off the graph and on the diagonal."""
        W = x.new_zeros(x.shape[:-1] + (self.n, self.n))
        i, j = self.edges[:, 0].to(x.device), self.edges[:, 1].to(x.device)
        W[..., i, j] = x
        W[..., j, i] = x
        return W

    def log_partition(self, Z: torch.Tensor) -> torch.Tensor:
        """log Σ_T exp⟨Z, T⟩ (…,) for log-weights Z (…, E); Matrix-Tree, float64 inside."""
        return spanning_tree_log_partition(Z, self.edges, self.n)


def spanning_trees_by_flows(n: int, name: str | None = None) -> Polytope:
    """The spanning trees of the complete graph K_n as a declared extended formulation.

    x (E,) over the edges ``itertools.combinations(range(n), 2)`` (the order of ``SpanningTree(n)``):
    0 <= x <= 1, sum x = n - 1, and for each node k != 0 one unit of flow from node 0 to k on the
    arcs of both directions, each arc's flow at most its edge's x (a multicommodity flow: auxiliary
    variables, (n - 1) 2E of them).  Its projection on x is the spanning-tree polytope for every n,
    with O(n^3) rows, so the generic path can run where the family's own declaration (exponential
    in n) stops.  Declared with ``recognize=False``: a polytope for the generic path with
    auxiliary variables, for comparisons against :class:`SpanningTree`'s solvers.
    """
    n = check_int(n, "n", minimum=2)
    edges = list(itertools.combinations(range(n), 2))
    x = cp.Variable(len(edges))
    arcs = edges + [(j, i) for i, j in edges]
    constraints = [x >= 0, x <= 1, cp.sum(x) == n - 1]
    for k in range(1, n):
        f = cp.Variable(len(arcs), nonneg=True)
        constraints += [f[a] <= x[a % len(edges)] for a in range(len(arcs))]
        for v in range(n):
            out = [a for a, (i, _) in enumerate(arcs) if i == v]
            into = [a for a, (_, j) in enumerate(arcs) if j == v]
            supply = 1.0 if v == 0 else (-1.0 if v == k else 0.0)
            constraints.append(cp.sum(f[out]) - cp.sum(f[into]) == supply)
    return Polytope.from_cvxpy(x, constraints, name=name or f"SpanningTreesByFlows(K{n})", recognize=False)


@register_argmax(SpanningTree)
def maximum_spanning_tree_argmax(P: SpanningTree, U: torch.Tensor) -> torch.Tensor:
    """argmax_{x ∈ P} ⟨U, x⟩: the indicator of a maximum-weight spanning tree.

    U: (B, E) -> (B, E) 0/1, same dtype and device.  Batched Prim's algorithm on the
    dense (B, n, n) weights (``polytopes._mst.maximum_spanning_tree``), O(B n²);
    comparisons only, so exact in any dtype.  Unique with probability 1 under
    continuous noise.
    """
    A = maximum_spanning_tree(P.adjacency(U), mask=P._adjacency_mask)
    i, j = P.edges[:, 0].to(U.device), P.edges[:, 1].to(U.device)
    return A[..., i, j].to(U.dtype)


@register_relaxation(SpanningTree, "exp_family_entropy")
def matrix_tree_marginals(P: SpanningTree, Z: torch.Tensor) -> torch.Tensor:
    """X_tau = ∇ log Σ_T exp⟨Z, T⟩: the edge marginals P(e ∈ T) of the Gibbs distribution.

    argmax_{x ∈ P} ⟨Z, x⟩ − A*(x) with A the log-partition over spanning trees.
    Z: (B, E) -> (B, E), same dtype and device, Σ_e x_e = n − 1.  Kirchhoff's
    Matrix-Tree theorem: x_e = w_e · R_eff(e) by one batched inverse of the reduced
    Laplacian where that is accurate, and log-space Gaussian elimination (exact for any
    spread of Z, i.e. any tau) elsewhere, per element; float64 inside because the
    marginals are differences of inverse entries.  Cost O(B n³); exact backward,
    differentiable to any order.
    See ``polytopes._matrix_tree``.
    """
    return spanning_tree_marginals(Z, P.edges, P.n)


register_family(
    Family(
        name="spanning_tree",
        make=lambda n, k: SpanningTree(n),
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
