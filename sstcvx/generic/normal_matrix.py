"""The normal matrix of the interior-point method's Newton systems: assembly, equilibration, factorization.

Problem.  Each Newton system of :mod:`~sstcvx.generic.interior_point` reduces to the m x m normal
matrix ``M = C Phi^{-1} C^T + diag(0, extra)`` (C the rows, equality rows first; Phi the diagonal
curvature of the primal block; ``extra = s / y`` on the inequality rows), one per batch element, all
with the sparsity pattern that C fixes.  This module assembles M, factors it and solves with it.

Algorithm.  :func:`sparsity` inspects C once per problem: M is assembled on its pattern (a product
of Phi^{-1} with a fixed table of C's column products) where that table is small, densely
otherwise.  M is equilibrated symmetrically to a unit diagonal before it is factored, with a
relative jitter of ``JITTER``: near the solution its entries range over many decades (1 / mu against
mu), and a jitter relative to the largest diagonal entry would swamp the small rows.  Where a
nested-dissection order gives a shallow elimination tree (a path's or a chain's rows), M is factored
by the level-scheduled sparse Cholesky of :mod:`~sstcvx.generic.sparse_cholesky` (a fixed number of
batched operations per level, about log2 m levels for a path), unless the batch is so small (``B m^3
<= DENSE_WORK``) that a few LAPACK calls cost less than the level loop; otherwise by one batched
dense Cholesky, with a growing jitter where it fails (a rank-deficient set of active rows).

Cost: assembly O(B nnz(M) N) on the pattern (O(B m^2 N) densely); factorization O(levels) batched
operations by levels, O(B m^3) densely; a solve O(levels) operations or O(B m^2).  Precision: the
factor is that of the equilibrated matrix, so the solve is accurate to the conditioning of the
equilibrated M (a relative jitter of 1e-15 on its diagonal).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from . import sparse_cholesky
from .dual_newton import _cholesky

if TYPE_CHECKING:
    from .interior_point import InteriorPointProblem

#: Relative jitter on the diagonal of the equilibrated normal matrix (and of the primal reduction's).
JITTER = 1e-15
#: The smallest positive value a slack-to-multiplier ratio or a vanishing multiplier takes in the Newton
#: systems (a polished solution's multipliers that vanish are set to it), and the diagonal weight that
#: removes a row from a system (HUGE: its equilibrated entries vanish).
TINY = 1e-200
HUGE = 1e200

#: The normal matrix is assembled from its sparsity pattern when the table of products has at most
#: this many entries (columns times non-zeros of M); densely otherwise.
PATTERN_LIMIT = 2**22
#: Where M is assembled densely, it is one product ``Phi^{-1} @ K`` with the full table K (N, m^2) of C's
#: column products when that table has at most this many entries (one small matrix product instead of a
#: broadcast product and a batched one).
DENSE_TABLE_LIMIT = 2**16
#: Below this many elements times m^3 the dense factorization is used although the level-scheduled one
#: exists: its fixed cost (about 10 batched operations per level) exceeds a few small LAPACK calls.
DENSE_WORK = 1_000_000


def diagonal_positions(r: torch.Tensor, c: torch.Tensor, m: int) -> torch.Tensor:
    """Where the diagonal entries of an m x m pattern lie among its entries ``(r, c)`` (every diagonal
    entry must be among them)."""
    position = torch.full((m * m,), -1, dtype=torch.long, device=r.device)
    position[r * m + c] = torch.arange(r.numel(), device=r.device)
    return position[torch.arange(m, device=r.device) * (m + 1)]


def equilibrated_levels(V, diag, r, c, chol, keep, where):
    """Equilibrate the entries ``V (nnz, B)`` (batch last) of a symmetric pattern to a unit diagonal
    (plus JITTER) in place and factor them by levels: ``(F, q (n, B))``, F from
    :meth:`SparseCholesky.factor`, ``matrix ~ diag(q) L D L^T diag(q)`` in the elimination order."""
    q = V.index_select(0, diag).clamp_min_(1e-300).sqrt_()
    V /= q.index_select(0, r) * q.index_select(0, c)
    V[diag] += JITTER
    F = V.new_zeros(chol.nnz + chol.m, V.shape[1])
    F[where] = V.index_select(0, keep)
    return chol.factor(F), q


def equilibrated_cholesky(M: torch.Tensor):
    """The Cholesky factor of the symmetric positive definite ``M (B, m, m)`` (only its lower triangle is
    read), computed after symmetric equilibration to a unit diagonal with a relative jitter of JITTER (more
    where the factorization fails: a rank-deficient set of active rows): ``(diag(q) L, q (B, m))`` with L
    the equilibrated matrix's factor and q = sqrt(diag M).  diag(q) L is a Cholesky factor of M itself,
    so that ``torch.cholesky_solve`` with it solves M x = r without any scaling (why equilibrate: see the
    module)."""
    q = M.diagonal(dim1=-2, dim2=-1).clamp_min(1e-300).sqrt()
    qc = q[:, :, None]
    Ms = M / (qc * q[:, None, :])
    Ms.diagonal(dim1=-2, dim2=-1).add_(JITTER)
    return _cholesky(Ms).mul_(qc), q


def sparsity(C: torch.Tensor):
    """``(pattern, sparse)`` for the normal matrix M = C diag(p) C^T.  ``pattern = (K, flat, diag, r, c)``
    assembles M's non-zero entries batch last as ``K @ p^T``: ``K (nnz, N)`` (contiguous) holds C[r, j] C[c, j]
    for the entries (r, c) of M that some column touches (and the diagonal), ``flat`` their positions in the
    flattened m x m matrix, ``diag (m,)`` where the diagonal entries are among them; None where the
    table would exceed PATTERN_LIMIT entries or M is more than half full.  ``sparse = (chol, keep,
    where)`` where the level-scheduled factorization of :mod:`~sstcvx.generic.sparse_cholesky` is worth
    it: the symbolic factorization, and which entries of the pattern land where in L; else None."""
    m, N = C.shape
    if m == 0:
        return None, None
    touch = (C != 0).to(C.dtype)
    nz = ((touch @ touch.T) > 0) | torch.eye(m, dtype=torch.bool, device=C.device)
    r, c = nz.nonzero(as_tuple=True)
    if N * r.numel() > PATTERN_LIMIT or r.numel() > 0.5 * m * m:
        return None, None
    K = C[r] * C[c]
    flat = r * m + c
    diag = diagonal_positions(r, c, m)
    sparse = None
    if m >= sparse_cholesky.MIN_ROWS:
        chol = sparse_cholesky.SparseCholesky(nz)
        if sparse_cholesky.worth_it(chol):
            keep, where = chol.lower_positions(r, c)
            sparse = (chol.on(C.device), keep.to(C.device), where.to(C.device))
    return (K, flat, diag, r, c), sparse


def dense_table(C: torch.Tensor) -> torch.Tensor | None:
    """``K (N, m^2)`` with ``K[j, r m + c] = C[r, j] C[c, j]``, so that ``p @ K`` is C diag(p) C^T flattened,
    where it has at most DENSE_TABLE_LIMIT entries; else None."""
    m, N = C.shape
    if m == 0 or N * m * m > DENSE_TABLE_LIMIT:
        return None
    return (C[:, None, :] * C[None, :, :]).reshape(m * m, N).T.contiguous()


def factor(ip, extra, phi_inv):
    """The Cholesky factor of M = C Phi^{-1} C^T + diag(0, extra) (extra = s / y) after symmetric diagonal
    equilibration, ``(L, q)`` with ``q = sqrt(diag M)``: densely ``M ~ L L^T`` (see
    :func:`equilibrated_cholesky`), by levels ``M ~ diag(q) L D L^T diag(q)`` (L batch last, see
    :func:`equilibrated_levels`).  M is assembled on its sparsity pattern (a path's rows touch their
    neighbors only) where :func:`sparsity` found one, densely otherwise."""
    B, m, m_eq = phi_inv.shape[0], ip.m, ip.m_eq
    if ip.pattern is not None:
        # M's entries batch last, V (nnz, B): every step of the factorization by levels gathers whole
        # entries (along dim 0, several times cheaper than along dim 1 for these sizes)
        K, flat, diag, r, c = ip.pattern
        V = K @ phi_inv.T
        V[diag[m_eq:]] += extra.T
        if ip.sparse is not None and B * m**3 > DENSE_WORK:
            F, q = equilibrated_levels(V, diag, r, c, *ip.sparse)
            return F, q.T
        M = V.new_zeros(m * m, B)
        M[flat] = V
        return equilibrated_cholesky(M.T.reshape(B, m, m))
    if ip.dense_table is not None:
        M = (phi_inv @ ip.dense_table).view(B, m, m)
    else:
        M = (ip.C * phi_inv[:, None, :]) @ ip.C.T
    diagonal = M.diagonal(dim1=-2, dim2=-1)
    (diagonal[:, m_eq:] if m_eq else diagonal).add_(extra)
    return equilibrated_cholesky(M)


def solve(ip: InteriorPointProblem, F, r):
    """``M^{-1} r`` for ``r (B, m)`` with ``F = (L, q)`` from :func:`factor`."""
    L, q = F
    if L.dim() == 2:  # the level-scheduled factor, batch last
        assert ip.sparse is not None
        return ip.sparse[0].solve(L, (r / q).T).T / q
    return torch.cholesky_solve(r.unsqueeze(-1), L).squeeze(-1)
