"""A batched sparse Cholesky factorization for a fixed sparsity pattern, scheduled by levels.

Problem.  Factor ``M = L L^T`` for a batch of symmetric positive definite ``m x m`` matrices that
share one sparsity pattern (the normal matrices of the interior-point method on a declaration whose
rows touch few common columns: a path's or a chain's rows couple their neighbors only), and solve
``M x = r`` with the factor.  A dense batched Cholesky costs O(m^3) per matrix and, for the small
matrices of the generic path, runs one LAPACK call per matrix; this one costs a fixed number of
batched torch operations per *level* of the elimination tree, whatever the batch size.

Algorithm (the symbolic part once per pattern, on the host; see :class:`SparseCholesky`):

1. Ordering by nested dissection: a connected set of rows is split by the middle level of a
   breadth-first search from a pseudo-peripheral row (the separator, eliminated last), and each
   remaining component is ordered the same way, recursively.  For a path of m rows this gives an
   elimination tree of height about log2(m), against m for the natural order.
2. Symbolic factorization: the pattern of L (the fill of the ordered pattern) and the elimination
   tree; the *level* of a column is its height in that tree (0 for a leaf).  Columns of one level
   do not depend on each other: each is finished by updates from lower levels only.
3. Numeric factorization, right-looking, one level at a time: the pivots (square roots of the
   diagonal entries), the scaling of the columns' sub-diagonal entries, and the rank-one updates
   of every entry those columns touch, accumulated by one ``index_add`` -- about ten batched
   operations per level.
4. Solves: forward substitution level by level upwards, backward substitution downwards, about
   six batched operations per level each.

Precision: a pivot below ``PIVOT_FLOOR`` (the matrices are equilibrated to a unit diagonal by the
caller, so this is relative) is raised to it, so that a rank-deficient matrix (dependent active
rows) gives a finite factor, as the dense path's jitter does.

Cost: O(levels) batched operations for the factorization and for each solve, O(B nnz(L)) work
for the solves and O(B sum_j |struct(j)|^2) for the factorization; :func:`worth_it` says when
that beats the dense factorization.
"""

from __future__ import annotations

from collections import deque

import numpy as np
import torch

#: Smallest pivot (squared) of the equilibrated matrix.
PIVOT_FLOOR = 1e-12
#: The sparse factorization is used when the elimination tree has at most this fraction of m levels
#: and m is at least MIN_ROWS (below that a dense LAPACK call is cheaper than the level loop).
LEVEL_FRACTION = 0.34
MIN_ROWS = 12


def _components(vertices: set, adjacency: list[set]) -> list[set]:
    seen: set = set()
    parts = []
    for start in sorted(vertices):
        if start in seen:
            continue
        part = {start}
        queue = deque([start])
        while queue:
            u = queue.popleft()
            for w in adjacency[u]:
                if w in vertices and w not in part:
                    part.add(w)
                    queue.append(w)
        seen |= part
        parts.append(part)
    return parts


def _bfs_levels(start: int, vertices: set, adjacency: list[set]) -> list[list[int]]:
    levels, seen, frontier = [], {start}, [start]
    while frontier:
        levels.append(frontier)
        nxt = sorted({w for u in frontier for w in adjacency[u] if w in vertices and w not in seen})
        seen.update(nxt)
        frontier = nxt
    return levels


def nested_dissection(adjacency: list[set]) -> list[int]:
    """An elimination order of the graph ``adjacency`` (a list of neighbor sets) by recursive
    breadth-first separators; see the module."""
    order: list[int] = []

    def dissect(vertices: set):
        if len(vertices) <= 2:
            order.extend(sorted(vertices))
            return
        parts = _components(vertices, adjacency)
        if len(parts) > 1:
            for part in parts:
                dissect(part)
            return
        # a pseudo-peripheral start: the far end of a search from the far end of a search
        start = _bfs_levels(min(vertices), vertices, adjacency)[-1][0]
        levels = _bfs_levels(start, vertices, adjacency)
        levels = _bfs_levels(levels[-1][0], vertices, adjacency)
        if len(levels) < 3:
            order.extend(sorted(vertices))
            return
        separator = levels[len(levels) // 2]
        dissect(vertices - set(separator))
        order.extend(separator)

    dissect(set(range(len(adjacency))))
    return order


def _symbolic(nz: torch.Tensor):
    """``(perm, filled, height)``: the nested-dissection order, the pattern of L in that order (lower
    triangle with the diagonal, a boolean array) and each column's height in the elimination tree."""
    pattern = nz.cpu().numpy().astype(bool)
    m = pattern.shape[0]
    adjacency = [set(np.nonzero(pattern[i])[0].tolist()) - {i} for i in range(m)]
    perm = np.asarray(nested_dissection(adjacency), dtype=np.int64)
    A = pattern[np.ix_(perm, perm)]
    filled = np.tril(A)
    parent = np.full(m, -1)
    for j in range(m):
        below = np.nonzero(filled[j + 1 :, j])[0] + j + 1
        if below.size:
            filled[np.ix_(below, below)] = True
            parent[j] = below[0]
    filled = np.tril(filled)
    height = np.zeros(m, dtype=np.int64)
    for j in range(m):
        if parent[j] >= 0:
            height[parent[j]] = max(height[parent[j]], height[j] + 1)
    return perm, filled, height


def symbolic_cost(nz: torch.Tensor) -> tuple[int, int, int]:
    """``(levels, nnz, updates)`` of :class:`SparseCholesky` on the pattern ``nz`` without building its
    schedule (which costs Python work proportional to ``updates``): the levels of the elimination tree,
    the entries of L and the multiply-adds of one factorization."""
    _, filled, height = _symbolic(nz)
    below = filled.sum(0) - 1
    return int(height.max()) + 1 if height.size else 0, int(filled.sum()), int((below * (below + 1) // 2).sum())


class SparseCholesky:
    """The symbolic factorization of one pattern ``nz (m, m)`` (a symmetric boolean tensor with a
    true diagonal), with :meth:`factor` and :meth:`solve` for batches of matrices of that pattern.

    Attributes: ``perm (m,)`` the elimination order, ``levels`` the number of levels of the
    elimination tree, ``nnz`` the entries of L (lower triangle with the diagonal)."""

    def __init__(self, nz: torch.Tensor):
        perm, filled, height = _symbolic(nz)
        m = filled.shape[0]
        rows, cols = np.nonzero(filled.T)  # column-major: the entries of column j together
        rows, cols = cols, rows
        position = -np.ones((m, m), dtype=np.int64)
        position[rows, cols] = np.arange(rows.size)
        self.m, self.nnz, self.levels = m, int(rows.size), int(height.max()) + 1 if m else 0
        self.perm = torch.as_tensor(perm)
        self.position = position
        schedule = []
        for level in range(self.levels):
            J = np.nonzero(height == level)[0]
            entries: list[int] = []
            owner: list[int] = []
            update_a: list[int] = []
            update_b: list[int] = []
            target: list[int] = []
            for t, j in enumerate(J.tolist()):
                below = np.nonzero(filled[j + 1 :, j])[0] + j + 1
                offset = len(entries)
                entries.extend(position[below, j].tolist())
                owner.extend([t] * below.size)
                for a, i in enumerate(below):
                    for b, k in enumerate(below[: a + 1]):
                        update_a.append(position[i, j])
                        update_b.append(offset + b)  # where (k, j) lies among this level's entries
                        target.append(position[i, k])
            entry_rows = rows[entries] if entries else np.zeros(0, dtype=np.int64)
            schedule.append(
                {
                    "cols": torch.as_tensor(J, dtype=torch.long),
                    "diag": torch.as_tensor(position[J, J], dtype=torch.long),
                    "entries": torch.as_tensor(entries, dtype=torch.long),
                    "owner": torch.as_tensor(owner, dtype=torch.long),
                    "entry_rows": torch.as_tensor(entry_rows, dtype=torch.long),
                    "entry_cols": torch.as_tensor(J[owner] if owner else np.zeros(0, np.int64), dtype=torch.long),
                    "update_a": torch.as_tensor(update_a, dtype=torch.long),
                    "update_b": torch.as_tensor(update_b, dtype=torch.long),
                    "target": torch.as_tensor(target, dtype=torch.long),
                }
            )
        self.schedule = schedule
        self._on_device: dict = {}

    def on(self, device) -> SparseCholesky:
        """This factorization with its index tensors on ``device`` (cached)."""
        if torch.device(device) == self.perm.device:
            return self
        key = str(device)
        moved = self._on_device.get(key)
        if moved is None:
            moved = object.__new__(SparseCholesky)
            moved.__dict__.update(self.__dict__)
            moved._on_device = {}
            moved.perm = self.perm.to(device)
            moved.schedule = [{k: v.to(device) for k, v in step.items()} for step in self.schedule]
            self._on_device[key] = moved
        return moved

    def lower_positions(self, r: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For entries ``(r, c)`` of the original pattern: ``(keep, where)``, the indices of the entries in
        the ordered lower triangle and their positions in L's values."""
        inverse = np.empty(self.m, dtype=np.int64)
        inverse[self.perm.cpu().numpy()] = np.arange(self.m)
        ri, ci = inverse[r.cpu().numpy()], inverse[c.cpu().numpy()]
        keep = np.nonzero(ri >= ci)[0]
        return torch.as_tensor(keep), torch.as_tensor(self.position[ri[keep], ci[keep]])

    def factor(self, F: torch.Tensor) -> torch.Tensor:
        """Factor ``M = L D L^T`` (L unit lower triangular) in place.  ``F (nnz + m, B)``, batch last:
        on entry, rows ``[0, nnz)`` hold M's values on L's pattern (zeros at the fill-in); on return,
        they hold L (the diagonal positions unused) and rows ``[nnz, nnz + m)`` hold ``1 / D`` in the
        elimination order.  Batch last, because every step gathers and scatters whole entries."""
        L, inverse_pivot = F[: self.nnz], F[self.nnz :]
        for step in self.schedule:
            pivot = L.index_select(0, step["diag"]).clamp_min_(PIVOT_FLOOR)
            inverse_pivot[step["cols"]] = pivot.reciprocal()
            if step["entries"].numel():
                column = L.index_select(0, step["entries"])
                L[step["entries"]] = column / pivot.index_select(0, step["owner"])
                if step["target"].numel():
                    # A_ik -= L_ij A_kj, the second factor still unscaled (taken from `column`)
                    update = L.index_select(0, step["update_a"]) * column.index_select(0, step["update_b"])
                    L.index_add_(0, step["target"], update, alpha=-1.0)
        return F

    def solve(self, F: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """``M^{-1} r`` for right-hand sides ``r (m, B)`` or ``(m, B, k)`` (batch last) with the factor ``F``
        of :meth:`factor`; the shape of r."""
        y = self.forward(F, r.index_select(0, self.perm))
        y *= self.inverse_pivot(F, y)
        y = self.backward(F, y)
        x = torch.empty_like(y)
        x[self.perm] = y
        return x

    def inverse_pivot(self, F: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``1 / D`` of :meth:`factor`'s ``F``, shaped to multiply ``y (m, B)`` or ``(m, B, k)``."""
        d = F[self.nnz :]
        return d.unsqueeze(-1) if y.dim() > d.dim() else d

    def forward(self, F: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``L^{-1} y`` in place, for ``y (m, B)`` or ``(m, B, k)`` already in the elimination order
        (``r.index_select(0, perm)``)."""
        L, wide = F[: self.nnz], y.dim() > F.dim()
        for step in self.schedule:
            if step["entries"].numel():
                Le = L.index_select(0, step["entries"])
                down = (Le.unsqueeze(-1) if wide else Le) * y.index_select(0, step["entry_cols"])
                y.index_add_(0, step["entry_rows"], down, alpha=-1.0)
        return y

    def backward(self, F: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``L^{-T} y`` in place, for ``y`` as in :meth:`forward` (the result in the elimination order)."""
        L, wide = F[: self.nnz], y.dim() > F.dim()
        for step in reversed(self.schedule):
            if step["entries"].numel():
                Le = L.index_select(0, step["entries"])
                up = (Le.unsqueeze(-1) if wide else Le) * y.index_select(0, step["entry_rows"])
                y.index_add_(0, step["entry_cols"], up, alpha=-1.0)
        return y


def worth_it(chol: SparseCholesky) -> bool:
    """Whether the level-scheduled factorization is expected to beat the dense one (see the constants)."""
    return chol.m >= MIN_ROWS and chol.levels <= LEVEL_FRACTION * chol.m
