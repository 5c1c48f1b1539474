"""The primal reduction of the interior-point method's Newton system, for inequality rows that couple few columns.

Problem.  The Newton system of :mod:`~sstcvx.generic.interior_point` on ``v = [x; w]`` with rows
C = [A; G] (equality rows A, m_eq of them; inequality rows G) is usually reduced to the normal
matrix over all m rows (:mod:`~sstcvx.generic.normal_matrix`).  It can be reduced the other way:
write D = y / s on G's rows; the rows' equations ``G dv - (s / y) dy = rows_in`` give
``dy = D (G dv - rows_in)``, which leaves

    H dv + A^T dlambda = r1 + G^T D rows_in,   A dv = rows_eq,     H = Phi + G^T D G   (N x N).

Algorithm.  H is factored by levels (:mod:`~sstcvx.generic.sparse_cholesky`, after equilibration,
as M), then the equality Schur complement ``S = A H^-1 A^T = W^T D_L^-1 W`` with ``W = L^-1 P^T
A^T``: W by a forward substitution run on W's own fixed pattern (one gather-multiply-scatter per
level of H's elimination tree), S's lower triangle from products of W's entries within a row (m_eq
x m_eq, dense batched Cholesky).  A direction then costs one forward and one backward substitution
and a small dense solve.  H's pattern is fixed by G: for the capacity rows of a flow formulation
(each couples one flow with one x) it is block diagonal per x with its flows, an elimination tree
of 2 levels, where M (m x m) is dense.

Choice (:func:`choose`, once per problem): where M would be factored densely, H's
tree has at most ``sparse_cholesky.LEVEL_FRACTION`` N levels (N >= 12), H is sparse enough (``PRIMAL_DENSITY``,
``PRIMAL_MAX_UPDATES``), the estimated multiply-adds per element (H's factorization and assembly,
``nnz(L) m_eq`` for W, the pairs of W's entries for S, ``m_eq^3 / 6``) are below the normal
matrix's (``m^2 N / 2 + m^3 / 6``), and the problem is not one the Euclidean polish serves (its
states hold slacks at exactly 0: y / s infinite).  Not on a path (M is already factored by levels)
nor on dense packing rows (H fills in).

Precision: H carries y / s of order 1 / mu on the active rows and loses about log10(1 / mu) digits
of the other terms of those rows to cancellation; the iteration's residuals absorb that (the
interior point switches to M after ``PRIMAL_ITERATIONS`` iterations for the few elements still
running, see there), and the backward (:func:`backward`) refines its solve on the unreduced
system, with M for an element whose refinement does not contract.

Cost per factorization: O(B (H's multiply-adds + nnz(L) m_eq + pairs of W + m_eq^3)) and O(levels)
batched operations; per solve O(B (nnz(L) + nnz(W) + m_eq^2)).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from . import normal_matrix, sparse_cholesky
from .normal_matrix import TINY, diagonal_positions, equilibrated_cholesky, equilibrated_levels

if TYPE_CHECKING:
    from .interior_point import InteriorPointProblem


@dataclass
class PrimalReduction:
    """The primal reduction's fixed tensors (see :func:`structure`):

    * ``chol`` the symbolic factorization of H's pattern; ``Kt (nnz, mi)`` with H's entries batch
      last as ``Kt @ (y / s)^T`` (plus Phi on the diagonal); ``diag (N,)`` where the diagonal lies
      among them; ``r, c`` their rows and columns; ``keep, where`` which of them land where in L;
    * ``G (mi, N)`` the inequality rows;
    * the pattern of ``W = L^-1 P^T A^T``, its entries ``(w_n, w_k)``, and W's forward substitution
      on that pattern: ``w_start (nnz(W), 1)`` the entries of P^T A^T there (the equality rows
      transposed, in the elimination order), ``w_row`` the row of q that divides each, and per level
      of the elimination tree ``w_steps``, the W entries updated, the L entries and the W entries
      that update them;
    * ``pair_a, pair_b``: the pairs of W entries (n, k), (n, l) of one row with k >= l, whose
      products add to S's flat entry ``pair_target`` in its lower triangle;
    * the estimated work of one factorization with both reductions (``cost``, ``normal_cost``,
      multiply-adds per element)."""

    chol: Any
    Kt: torch.Tensor
    diag: torch.Tensor
    r: torch.Tensor
    c: torch.Tensor
    keep: torch.Tensor
    where: torch.Tensor
    G: torch.Tensor
    w_n: torch.Tensor
    w_k: torch.Tensor
    pair_a: torch.Tensor
    pair_b: torch.Tensor
    pair_target: torch.Tensor
    w_start: torch.Tensor
    w_row: torch.Tensor
    w_steps: list
    cost: float
    normal_cost: float


#: The primal reduction is considered where the pattern of H has at most this fraction of N^2 entries,
#: N is at most PRIMAL_MAX_COLUMNS and one factorization of H takes at most PRIMAL_MAX_UPDATES
#: multiply-adds (the symbolic factorization and its schedule are built on the host, in Python, with
#: work proportional to those).
PRIMAL_DENSITY = 0.25
PRIMAL_MAX_COLUMNS = 2000
PRIMAL_MAX_UPDATES = 200_000


def structure(C: torch.Tensor, m_eq: int) -> PrimalReduction | None:
    """The primal reduction's tensors for the rows ``C (m, N)`` (equality rows first), or None where there
    is no inequality row or H = Phi + G^T diag(y / s) G is too dense to be worth a sparse factorization
    (see PRIMAL_DENSITY, PRIMAL_MAX_COLUMNS)."""
    m, N = C.shape
    mi = m - m_eq
    if mi == 0 or N < sparse_cholesky.MIN_ROWS or N > PRIMAL_MAX_COLUMNS:
        return None
    G = C[m_eq:]
    touch = (G != 0).to(C.dtype)
    nz = ((touch.T @ touch) > 0) | torch.eye(N, dtype=torch.bool, device=C.device)
    r, c = nz.nonzero(as_tuple=True)
    if r.numel() > PRIMAL_DENSITY * N * N:
        return None
    _, _, updates = sparse_cholesky.symbolic_cost(nz)
    if updates > PRIMAL_MAX_UPDATES:
        return None
    chol = sparse_cholesky.SparseCholesky(nz)
    diag = diagonal_positions(r, c, N)
    keep, where = chol.lower_positions(r, c)
    # W's pattern: A^T's, filled by the forward substitution (row i of W gets row j's pattern where L_ij != 0)
    At = C[:m_eq].T.index_select(0, chol.perm.to(C.device))
    pattern = (At != 0).cpu().numpy().copy()
    for step in chol.schedule:
        for i, j in zip(step["entry_rows"].tolist(), step["entry_cols"].tolist()):
            pattern[i] |= pattern[j]
    w_n, w_k = np.nonzero(pattern)
    w_steps = _pattern_substitution(chol, w_n, w_k, C.device)
    rows = [np.nonzero(w_n == n)[0] for n in range(N)]
    # the pairs of entries (n, k), (n, l) of one row with k >= l: S's lower triangle, all its Cholesky reads
    lower = [np.tril_indices(e.size) for e in rows]
    pair_a = np.concatenate([e[i] for e, (i, _) in zip(rows, lower)]).astype(np.int64)
    pair_b = np.concatenate([e[j] for e, (_, j) in zip(rows, lower)]).astype(np.int64)
    # work per element: the factorization (sum over columns of |struct|^2 / 2), H's assembly, the
    # forward substitution of the m_eq columns of A^T, S = W^T D^-1 W on W's pattern and its Cholesky;
    # against the normal matrix's assembly (m^2 N / 2) and dense Cholesky (m^3 / 6)
    cost = updates + r.numel() * mi / N + chol.nnz * m_eq + pair_a.size + m_eq**3 / 6
    normal_cost = m * m * N / 2 + m**3 / 6
    index = [
        torch.as_tensor(v, dtype=torch.long, device=C.device)
        for v in (w_n, w_k, pair_a, pair_b, w_k[pair_a] * m_eq + w_k[pair_b])
    ]
    return PrimalReduction(
        chol.on(C.device),
        (G[:, r] * G[:, c]).T.contiguous(),
        diag,
        r,
        c,
        keep.to(C.device),
        where.to(C.device),
        G.contiguous(),
        index[0],
        index[1],
        index[2],
        index[3],
        index[4],
        At[index[0], index[1]].unsqueeze(1).contiguous(),
        chol.perm.to(C.device)[index[0]],
        w_steps,
        float(cost),
        float(normal_cost),
    )


def _pattern_substitution(chol, w_n: np.ndarray, w_k: np.ndarray, device) -> list:
    """The forward substitution ``W <- L^-1 W`` restricted to W's entries ``(w_n, w_k)`` (a pattern closed
    under the substitution's fill): per level of ``chol``'s schedule, ``(target, l, source)`` such that
    ``W[target] -= L[l] * W[source]`` entry by entry, with L entry (i, j) of the level and the W entries
    (i, k) and (j, k).  Columns of one level do not depend on each other (an L entry (i, j) has i above
    j in the elimination tree), so one gather-multiply-scatter per level suffices."""
    entry = {(int(n), int(k)): e for e, (n, k) in enumerate(zip(w_n, w_k))}
    by_row: dict = {}
    for n, k in zip(w_n.tolist(), w_k.tolist()):
        by_row.setdefault(n, []).append(k)
    steps = []
    for step in chol.schedule:
        target, lpos, source = [], [], []
        for l, i, j in zip(step["entries"].tolist(), step["entry_rows"].tolist(), step["entry_cols"].tolist()):
            for k in by_row.get(j, ()):
                target.append(entry[(i, k)])
                lpos.append(l)
                source.append(entry[(j, k)])
        if target:
            steps.append(tuple(torch.as_tensor(v, dtype=torch.long, device=device) for v in (target, lpos, source)))
    return steps


def choose(C: torch.Tensor, m_eq: int, nx: int, kind, normal_sparse: bool) -> PrimalReduction | None:
    """The primal reduction where it is expected to win (the rule of the module's "Factorization"
    paragraph), else None."""
    N = C.shape[1]
    if normal_sparse or (N == nx and kind == "euclidean"):
        # M already factored by levels; or the polish, whose states hold slacks at exactly 0 (y / s infinite)
        return None
    primal = structure(C, m_eq)
    if primal is None or not sparse_cholesky.worth_it(primal.chol) or primal.cost >= primal.normal_cost:
        return None
    return primal


def factor(ip: InteriorPointProblem, ratio_in, phi_inv):
    """The primal reduction's factors: H = Phi + G^T diag(y / s) G (``ratio_in = s / y``) factored by
    levels after symmetric diagonal equilibration, ``H ~ diag(q) P L D L^T P^T diag(q)``, then ``W =
    L^-1 P^T diag(q)^-1 A^T`` and the equality Schur complement ``S = A H^-1 A^T = W^T D^-1 W``, also
    equilibrated (``S ~ Ls Ls^T``, see :func:`~sstcvx.generic.normal_matrix.equilibrated_cholesky`).
    Returns ``(F, q (N, B), W (nnz(W), B), Ls)``, the tensors batch last where the level-scheduled
    factorization reads them, W on its pattern."""
    pr = ip.primal
    assert pr is not None
    B, m_eq = phi_inv.shape[0], ip.m_eq
    chol = pr.chol
    V = pr.Kt @ ratio_in.clamp_min(TINY).reciprocal().T
    V[pr.diag] += phi_inv.reciprocal().T
    F, q = equilibrated_levels(V, pr.diag, pr.r, pr.c, chol, pr.keep, pr.where)
    if not m_eq:
        return F, q, None, None
    # W = L^-1 P^T diag(q)^-1 A^T on its pattern (entries batch last): a dense forward substitution of the
    # m_eq columns would gather (N, B, m_eq) blocks
    L = F[: chol.nnz]
    W = pr.w_start / q.index_select(0, pr.w_row)
    for target, lpos, source in pr.w_steps:
        W.index_add_(0, target, L.index_select(0, lpos) * W.index_select(0, source), alpha=-1.0)
    # S's lower triangle on W's pattern, products of entries of one row scaled by D^-1/2 (far fewer products
    # than a dense W's); the Cholesky factorization reads the lower triangle only
    Wd = W * chol.inverse_pivot(F, q).sqrt().index_select(0, pr.w_n)
    products = Wd.index_select(0, pr.pair_a) * Wd.index_select(0, pr.pair_b)
    S = W.new_zeros(m_eq * m_eq, B).index_add_(0, pr.pair_target, products).T.reshape(B, m_eq, m_eq)
    return F, q, W, equilibrated_cholesky(S)[0]


def solve(ip: InteriorPointProblem, factors, r, rows_eq=None):
    """``(dv, dlambda)`` solving ``H dv + A^T dlambda = r (B, N)``, ``A dv = rows_eq (B, m_eq)`` (0 where
    None) with :func:`factor`'s factors: one forward and one backward substitution."""
    F, q, W, Ls = factors
    pr = ip.primal
    assert pr is not None
    chol = pr.chol
    perm = chol.perm
    y = chol.forward(F, (r.T / q).index_select(0, perm))
    d = chol.inverse_pivot(F, y)
    dlam = None
    if W is not None:
        rhs = W.new_zeros(ip.m_eq, y.shape[1]).index_add_(0, pr.w_k, W * (y * d).index_select(0, pr.w_n)).T
        if rows_eq is not None:
            rhs = rhs - rows_eq
        dlam = torch.cholesky_solve(rhs.unsqueeze(-1), Ls).squeeze(-1)
        y.index_add_(0, pr.w_n, W * dlam.T.index_select(0, pr.w_k), alpha=-1.0)
    y = chol.backward(F, y * d)
    x = torch.empty_like(y)
    x[perm] = y
    return (x / q).T, dlam


#: Steps of iterative refinement of the backward's solve by the primal reduction, and the relative size of
#: the last correction above which an element's solve is redone with the normal matrix.
REFINE_STEPS = 4
REFINE_TOLERANCE = 1e-9
#: An element whose correction is below this (relative) is done: it leaves the refinement, which continues on
#: the others only (most elements are done after the first step).
REFINE_DONE = 1e-12


def _take(factors, index):
    """:func:`factor`'s tuple on the elements ``index`` (its tensors are batch last, S's factor batch first)."""
    F, q, W, Ls = factors
    return F[:, index], q[:, index], None if W is None else W[:, index], None if Ls is None else Ls[index]


def backward(ip: InteriorPointProblem, factors, phi_inv, g):
    """The backward's ``(H^-1 - H^-1 A^T S^-1 A H^-1) [g; 0]`` on x (``g (B, nx)``), by the primal reduction
    with iterative refinement on the unreduced system

        Phi u + A^T lambda + G^T y = [g; 0],   A u = 0,   G u - (s / y) y = 0

    (residuals in (u, lambda, y), corrections by :func:`solve`).  Without it, H's entries y / s of
    order 1 / mu on the active rows lose about log10(1 / mu) digits of the other terms to cancellation
    (figures in docs/generic.md).  Up to REFINE_STEPS steps; an element whose correction falls below
    REFINE_DONE (relative) leaves the refinement.  An element whose last correction stays above
    REFINE_TOLERANCE (relative) is solved again with the normal matrix M.  ``factors``: :func:`factor`'s
    tuple and s / y on the rows."""
    *F, ratio = factors
    pr = ip.primal
    assert pr is not None
    N, nx = phi_inv.shape[1], ip.nx
    A = ip.C[: ip.m_eq]
    D = ratio.clamp_min(TINY).reciprocal()
    rhs = torch.nn.functional.pad(g, (0, N - nx))
    u_all, lam = solve(ip, F, rhs)
    u = u_all
    y = D * (u @ pr.G.T)
    index = None  # the elements still refined (None: all)
    Fa, ratio_a, Da, rhs_a, phi_a = F, ratio, D, rhs, phi_inv
    bad = torch.zeros(u.shape[0], dtype=torch.bool, device=u.device)
    for k in range(REFINE_STEPS):
        r1 = rhs_a - u / phi_a - y @ pr.G
        if lam is not None:
            r1 -= lam @ A
        r3 = ratio_a * y - u @ pr.G.T
        du, dlam = solve(ip, Fa, r1 + (Da * r3) @ pr.G, -(u @ A.T) if lam is not None else None)
        u = u + du
        y = y + Da * (du @ pr.G.T - r3)
        if lam is not None:
            lam = lam + dlam
        size = du.abs().amax(-1) / u.abs().amax(-1).clamp_min(1e-300)
        if k == REFINE_STEPS - 1:
            last = ~(size <= REFINE_TOLERANCE)
            if index is None:
                u_all, bad = u, last
            else:
                u_all[index], bad[index] = u, last
            break
        going = ~(size <= REFINE_DONE)
        if index is None:
            if bool(going.all()):
                continue
            u_all = u
        else:
            u_all[index] = u
            if bool(going.all()):
                continue
        # the elements done leave; the refinement continues on the others
        sub = going.nonzero().squeeze(1)
        index = sub if index is None else index[sub]
        if not index.numel():
            break
        u, y = u[sub], y[sub]
        lam = None if lam is None else lam[sub]
        Fa, ratio_a, Da, rhs_a, phi_a = _take(Fa, sub), ratio_a[sub], Da[sub], rhs_a[sub], phi_a[sub]
    if bool(bad.any()):
        # y / s so large that the refinement does not contract (none at |z| about 1 on the flows, many at
        # large |z| and with the Euclidean regularizer)
        b = bad.nonzero().squeeze(1)
        L, q = normal_matrix.factor(ip, ratio[b], phi_inv[b])
        ub = phi_inv[b] * rhs[b]
        t = normal_matrix.solve(ip, (L, q), ub @ ip.C.T)
        u_all[b] = ub - phi_inv[b] * (t @ ip.C)
    return u_all[:, :nx]
