"""Index tables of the graphs the Matrix-Tree solvers run on, built once per graph and shared.

Both tree families reduce to one directed core (``polytopes._matrix_tree``): log-weights
``Zd`` (B, n, n) on the arcs of a digraph, arborescences rooted at vertex 0 or n − 1.
This module holds what depends only on the graph, not on the weights:

* ``Digraph``: the arcs in the core's vertex order (bool (n, n) and its complement), the
  vertex permutation that moves another root to the front, and, for small digraphs, the
  dense incidence tables that turn the reduced Laplacian and the marginals' linear form in
  L̂⁻¹ into one matmul each;
* ``EdgeGraph``: the gather tables of an undirected edge list (each edge's two arcs in the
  core, the reduced Laplacian, the quadratic forms b_eᵀ X b_e), with its ``Digraph``.

Sharing.  Both are immutable once built (every tensor is written in ``__init__`` and never
again) and published through ``TableCache``, a bounded dictionary guarded by a lock, so
threads may build, look up and use them concurrently.  The caches are module state, never
attributes of a polytope, so polytopes pickle and deep-copy without them.  Tables are
built with ``torch.inference_mode(False)`` so that a first call under inference mode does
not leave tensors that autograd later refuses.
"""

from __future__ import annotations

import threading

import torch

__all__ = ["Digraph", "EdgeGraph", "TableCache", "digraph", "edge_graph"]

# One dense matmul against an incidence table replaces the gathers / slices that build the
# reduced Laplacian and read the marginals out of L̂⁻¹ when the table has at most this many
# entries: m²·E for spanning trees (K_n up to n = 17), n²·m² for arborescences (n ≤ 7).  The
# crossovers were measured with benchmarks/trees.py at batch 128 (see docs/benchmarks.md).
DENSE_INCIDENCE_MAX = 40_000
DIRECTED_DENSE_INCIDENCE_MAX = 2_000


class TableCache:
    """A bounded key → immutable-object map, safe to share between threads.

    ``get(key, build)`` returns the cached object or builds it (under the lock, so that
    concurrent first calls build once; a hit is one dictionary read, which is atomic).  When full, the map is emptied before the next
    insertion: the cached objects are cheap to rebuild, and a caller that makes a fresh
    graph per call must not grow the map without bound.
    """

    def __init__(self, max_size: int = 64):
        self.max_size = max_size
        self._lock = threading.Lock()
        self._data: dict = {}

    def get(self, key, build):
        hit = self._data.get(key)  # one dict read is atomic; only building and inserting take the lock
        if hit is not None:
            return hit
        with self._lock:
            hit = self._data.get(key)
            if hit is None:
                if len(self._data) >= self.max_size:
                    self._data.clear()
                with torch.inference_mode(False):
                    hit = self._data[key] = build()
            return hit

    def lookup(self, key):
        """The cached object, or None (one atomic dictionary read)."""
        return self._data.get(key)

    def put(self, key, value):
        with self._lock:
            if len(self._data) >= self.max_size:
                self._data.clear()
            self._data[key] = value

    def clear(self):
        with self._lock:
            self._data.clear()


_INCIDENCE = TableCache()


def _directed_incidence(n, root, device):
    """(K_lap (n², m²), K_res (m², n²)) for root 0 or n − 1.

    vec L̂ = vec(w) @ K_lap (row-major vec of both), and R = vec_c(X) @ K_res with
    R[h, d] = X̃[d, d] − X̃[d, h] and vec_c the column-major vec of X (B, m, m), so that
    LAPACK's column-major inverse is read without a copy.  The same tables serve every
    mask: weights off the mask are exactly 0.
    """
    m = n - 1
    off = 1 if root == 0 else 0  # the non-root vertices are off .. off + m - 1
    lap = torch.zeros(n, n, m, m, dtype=torch.float64)  # [h, d, a, b] = ∂L̂[a, b] / ∂w[h, d]
    res = torch.zeros(m, m, n, n, dtype=torch.float64)  # [a, b, h, d] = ∂R[h, d] / ∂X[a, b]
    for d in range(off, off + m):
        for h in range(n):
            if h == d:
                continue
            lap[h, d, d - off, d - off] += 1.0
            res[d - off, d - off, h, d] += 1.0
            if off <= h < off + m:
                lap[h, d, h - off, d - off] -= 1.0
                res[d - off, h - off, h, d] -= 1.0
    return lap.reshape(n * n, m * m).to(device), res.permute(1, 0, 2, 3).reshape(m * m, n * n).to(device)


class Digraph:
    """The directed core's view of a digraph: arcs (n, n) bool in core order, root 0 or n − 1.

    ``arcs``: arc h→d usable (never the diagonal nor the root's column); ``absent`` its
    complement; ``root`` the root in core order; ``perm`` (n,) the core order of the
    caller's vertices (None when the caller's root is already 0 or n − 1) and
    ``inverse_perm``; ``block`` the slice of non-root vertices; ``incidence`` the dense
    tables of ``_directed_incidence`` for small digraphs (``DIRECTED_DENSE_INCIDENCE_MAX``),
    else None.
    """

    def __init__(self, arcs, root, perm=None, dense_max=None):
        n = arcs.shape[-1]
        self.n, self.root, self.arcs, self.absent = n, root, arcs, ~arcs
        self.perm = perm
        self.inverse_perm = None if perm is None else torch.argsort(perm)
        self.block = slice(1, n) if root == 0 else slice(0, n - 1)
        dense_max = DIRECTED_DENSE_INCIDENCE_MAX if dense_max is None else dense_max
        self.incidence = None
        if n * n * (n - 1) ** 2 <= dense_max:
            key = (n, root, arcs.device)
            self.incidence = _INCIDENCE.get(key, lambda: _directed_incidence(n, root, arcs.device))


def _check_mask(mask, n, device):
    mask = torch.as_tensor(mask, device=device)
    if mask.shape != (n, n) or mask.dtype != torch.bool:
        raise ValueError(f"mask: expected a bool tensor of shape ({n}, {n}), got {mask.dtype} {tuple(mask.shape)}")
    return mask


def _build_digraph(n, root, mask, device):
    arcs = ~torch.eye(n, dtype=torch.bool, device=device)
    arcs[:, root] = False
    if mask is not None:
        arcs = arcs & mask
    perm = None
    if root not in (0, n - 1):  # move the root first
        perm = torch.cat([torch.tensor([root]), torch.arange(root), torch.arange(root + 1, n)]).to(device)
        arcs = arcs[perm][:, perm]
    return Digraph(arcs, 0 if perm is not None else root, perm)


_DIGRAPHS = TableCache()


def digraph(n: int, root: int, mask, device) -> Digraph:
    """The ``Digraph`` of arborescences of the complete digraph on n vertices rooted at ``root``
    (0 ≤ root < n), restricted to ``mask`` ((n, n) bool, or None).  Cached when ``mask`` is
    None; a mask's tables are built per call (reading a mask's content for a key would cost
    a device-to-host copy)."""
    if mask is None:
        return _DIGRAPHS.get(
            (n, root, device, DIRECTED_DENSE_INCIDENCE_MAX), lambda: _build_digraph(n, root, None, device)
        )
    mask = _check_mask(mask, n, device)
    with torch.inference_mode(False):
        return _build_digraph(n, root, mask, device)


class EdgeGraph:
    """Index tables of an undirected graph for the reduced Laplacian (root n − 1).

    ``gather`` (n*n,) maps each arc of the directed core to its edge (E = the pad);
    ``digraph`` the core's ``Digraph`` (both arcs of every edge, root n − 1); ``arcs``
    (2E,) the flat arcs i→j then j→i; ``eye`` the (m, m) identity, m = n − 1 non-root
    vertices.  For the fused fast path, either ``incidence`` (E, m²), the rows
    vec(b_e b_eᵀ) with b_e = e_i − e_j (the root's coordinate dropped), so that
    vec L̂ = w @ incidence and b_eᵀ X b_e = (vec X @ incidenceᵀ)_e (small graphs, see
    ``DENSE_INCIDENCE_MAX``), or None and gather tables: ``lap`` (m·n,) the first m rows
    of ``gather``, which build the reduced Laplacian from the edge weights padded with a
    0; ``quad`` (E,) the flat position of edge (i, j) in an m × m matrix R with
    R[i, j] = X_ii + X_jj − 2 X_ij and diagonal R[i, i] = X_ii, the value for the edge
    (i, root).  All gathers run along dim 1 with an expanded index, which measured
    several times faster than scatters or advanced indexing.
    """

    def __init__(self, edges, n, device, dense_max=None):
        E = edges.shape[0]
        m = n - 1
        i, j = edges[:, 0].long().to(device), edges[:, 1].long().to(device)
        self.n, self.E = n, E
        self.arcs = torch.cat([i * n + j, j * n + i])
        self.gather = torch.full((n * n,), E, dtype=torch.long, device=device)
        self.gather[self.arcs] = torch.arange(E, device=device).repeat(2)
        mask = torch.zeros(n * n, dtype=torch.bool, device=device)
        mask[self.arcs] = True
        mask = mask.reshape(n, n)
        mask[:, n - 1] = False  # root = n - 1: no arc enters it
        self.digraph = Digraph(mask, n - 1, dense_max=0)  # the stable path and log-det need no tables
        self.eye = torch.eye(m, dtype=torch.float64, device=device)
        self.incidence = None
        if m * m * E <= (DENSE_INCIDENCE_MAX if dense_max is None else dense_max):
            K = torch.zeros(E, m, m, dtype=torch.float64, device=device)
            e = torch.arange(E, device=device)
            for p, q, sign in ((i, i, 1.0), (j, j, 1.0), (i, j, -1.0), (j, i, -1.0)):
                keep = (p < m) & (q < m)
                K[e[keep], p[keep], q[keep]] = sign
            self.incidence = K.reshape(E, m * m)
        self.lap = self.gather[: m * n]  # the non-root rows only
        # position of edge (i, j) in an m × m matrix, the edge (i, root) on the diagonal at (i, i)
        self.quad = torch.where(j == m, i * (m + 1), torch.where(i == m, j * (m + 1), i * m + j))


_EDGE_GRAPHS = TableCache()
# id(edges) -> (edges, stamp, EdgeGraph).  The entry keeps ``edges`` alive, so no other
# tensor can take its id meanwhile; the stamp holds the tensor's version counter, so an
# in-place edit of the edge list is noticed.
_EDGE_GRAPHS_BY_ID = TableCache()


def edge_graph(edges, n: int, device) -> EdgeGraph:
    """The ``EdgeGraph`` of an edge list (E, 2) on n vertices.

    Looked up by the tensor's identity first (the polytope passes the same ``P.edges`` on
    every call, and reading 2E integers back for a content key costs a host copy), then by
    content.
    """
    stamp = (edges._version, n, device, DENSE_INCIDENCE_MAX)
    known = _EDGE_GRAPHS_BY_ID.lookup(id(edges))
    if known is not None and known[0] is edges and known[1] == stamp:
        return known[2]
    key = (stamp[1:], edges.shape[0], tuple(edges.reshape(-1).tolist()))
    graph = _EDGE_GRAPHS.get(key, lambda: EdgeGraph(edges, n, device))
    _EDGE_GRAPHS_BY_ID.put(id(edges), (edges, stamp, graph))
    return graph


def clear_caches() -> None:
    """Empty every table cache (tests use it after changing the dense-incidence thresholds)."""
    for cache in (_INCIDENCE, _DIGRAPHS, _EDGE_GRAPHS, _EDGE_GRAPHS_BY_ID):
        cache.clear()
