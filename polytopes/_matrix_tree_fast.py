"""The inverse path of the Matrix-Tree solvers: marginals from one batched inverse of the
reduced Laplacian, its acceptance test, and an analytic backward that autograd can
differentiate again.

Problem.  Arc marginals μ(h→d) = ∂ log det L̂ / ∂Zd[h, d] of the reduced directed Laplacian
L̂ (B, m, m), m = n − 1, of in-weights w = exp(Zd) (B, n, n) on a ``Digraph`` (root 0 or
n − 1 in the core's order); for spanning trees the edge marginals μ_e (B, E) of an
``EdgeGraph``, where L̂ is symmetric positive definite.

Algorithm.  w = exp(Z − max Z) (the marginals do not depend on the shift), X = L̂⁻¹ by one
batched ``torch.linalg.inv_ex`` (LU), or for spanning trees Cholesky, one triangular solve
and one matmul (``spd_inverse``); then
  μ(h→d) = w_hd (X̃[d, d] − X̃[d, h])   (X̃ = X with a zero row and column at the root),
  μ_e = w_e b_eᵀ X b_e = w_e (X̃_ii + X̃_jj − 2 X̃_ij)   (undirected, fused over the edge list).
Backward, for an upstream G: with a = G ∘ w and M = X L̂(a) X (two batched matmuls),
  ∂⟨G, μ⟩/∂Z = G ∘ μ − F(w, M),
F the same linear form as μ (∂/∂L̂ of ⟨G, μ⟩ through X is −(X L̂(a) X)ᵀ, and L̂ is linear in
w with the same incidence as μ).  The backward is written with torch operations: when
autograd records it (``create_graph=True``) it rebuilds w, X and μ from the saved input as
differentiable functions (one more inverse, only then), so the solvers are differentiable
to any order; otherwise it reuses the forward's tensors.

Cost.  O(n³) per element in LAPACK calls plus O(n²) elementwise work, gathers or (small
graphs) one matmul with a dense incidence table (``polytopes._matrix_tree_graphs``).

Precision.  Governed by κ = max_d L̂[d, d]·L̂⁻¹[d, d] ≥ 1: L̂ is a column diagonally
dominant M-matrix, so Gaussian elimination needs no pivoting and only ever cancels on the
diagonal, and κ bounds that cancellation ratio for every pivot in every elimination order
(a pivot is the Schur complement of its vertex, which only shrinks as vertices are
eliminated, down to 1 / L̂⁻¹[d, d]).  ``screen`` accepts an element when the inverse
succeeded and the computed κ lies in [1, ``KAPPA_MAX``]; the error against the log-space
path is then of order eps·κ ≤ ~2e-11.  Rejected elements get μ = 0 and zero gradients,
for the caller to overwrite by the log-space path.
"""

from __future__ import annotations

import torch

__all__ = [
    "KAPPA_MAX",
    "FastArborescenceMarginals",
    "FastSpanningTreeMarginals",
    "fast_arborescence_marginals",
    "fast_spanning_tree_marginals",
    "lu_log_det",
]

# Accept the inverse-based marginals when the cancellation ratio κ is at most this.  The
# a-priori bound on the error is of order n·eps·κ² (backward error n·eps·κ on the pivots,
# amplified by at most κ); measured on clustered weights (the worst case for κ) the error
# against the log-space path is ~2e-16·κ, so κ ≤ 1e5 keeps it near 1e-11.
KAPPA_MAX = 1e5


def accept(dX, info):
    """Per-element acceptance of an inverse: dX = L̂[d, d]·X[d, d] (B, m), info from LAPACK.

    Exactly, 1 ≤ dX[d] ≤ κ for every d.  Accept when LAPACK succeeded and the computed
    values satisfy 1 − 1e-9 ≤ min dX and max dX = κ ≤ KAPPA_MAX.  If the elimination
    were ruined by cancellation, some computed pivot would be rounding noise: tiny (so
    some X[d, d] huge, κ large) or negative (so dX < 1); nan compares False.  Otherwise
    the factorization is backward stable and the computed κ is accurate, so the test
    decides on the true κ.
    """
    lo, hi = dX.aminmax(dim=-1)
    return (lo >= 1 - 1e-9) & (hi <= KAPPA_MAX) & (info == 0)


def screen(X, info, diag_L, fallback):
    """Screen an inverse X = L̂⁻¹ (B, m, m) element by element (see ``accept``).

    Returns (X, ok).  Without ``fallback`` nothing is checked and ok is None.  With it,
    ok is None when every element is accepted (the common case: decided from the batch's
    extreme dX and worst info in one host transfer), else the (B,) bool flag, and the
    rejected elements' X is replaced by 0.
    """
    if not fallback:
        return X, None
    dX = diag_L * torch.diagonal(X, dim1=-2, dim2=-1)
    lo, hi = dX.aminmax()  # nan propagates, and fails the test below
    lo, hi, failed = torch.stack((lo, hi, info.amax().to(lo.dtype))).tolist()
    if failed == 0 and lo >= 1 - 1e-9 and hi <= KAPPA_MAX:
        return X, None
    ok = accept(dX, info)
    return torch.where(ok[:, None, None], X, torch.zeros((), dtype=X.dtype, device=X.device)), ok


def _screened_inverse(L, ok):
    """L⁻¹ (B, m, m) as a differentiable function of L, 0 where ``ok`` is False (those
    elements' L, possibly singular, is replaced by the identity first so that no inf or
    nan enters the graph)."""
    if ok is None:
        return torch.linalg.inv(L)
    keep = ok[:, None, None]
    eye = torch.eye(L.shape[-1], dtype=L.dtype, device=L.device)
    return torch.where(
        keep, torch.linalg.inv(torch.where(keep, L, eye)), torch.zeros((), dtype=L.dtype, device=L.device)
    )


# --------------------------------------------------------------------------------------------
# arborescences: Zd (B, n, n) float64 on a Digraph D
# --------------------------------------------------------------------------------------------
def reduced_laplacian(w, D, dense=True):
    """L̂ = diag(in-weights) − w on the non-root vertices: (B, n-1, n-1), and the in-weights (B, n-1).

    With D's dense tables (and ``dense``) one matmul (w is 0 on the diagonal, so the
    diagonal of L̂ is the in-weights), else four ops on slices.
    """
    if dense and D.incidence is not None:
        B, n, _ = w.shape
        L = (w.reshape(B, n * n) @ D.incidence[0]).view(B, n - 1, n - 1)
        return L, torch.diagonal(L, dim1=-2, dim2=-1)
    sl = D.block
    din = w[:, :, sl].sum(dim=-2)
    L = w[:, sl, sl].neg()
    L.diagonal(dim1=-2, dim2=-1).add_(din)
    return L, din


def resistance_form(w, X, D):
    """F[h, d] = w[h, d] (X̃[d, d] − X̃[d, h]), X̃ = X padded with a zero row/column at the root.

    With X = L̂⁻¹ this is the arc marginal; with X = L̂⁻¹ A L̂⁻¹ it is the adjoint used in the
    backward pass.  w (B, n, n), X (B, n-1, n-1) -> (B, n, n), 0 in the root's column.
    With D's dense tables one matmul, else a few ops on slices (into one buffer, or out of
    place with the same values where autograd records them).
    """
    B, n, _ = w.shape
    if D.incidence is not None:
        return w * (X.mT.reshape(B, -1) @ D.incidence[1]).view(B, n, n)
    if torch.is_grad_enabled() and (w.requires_grad or X.requires_grad):  # recorded: out of place
        Xt = torch.nn.functional.pad(X, (1, 0, 1, 0) if D.root == 0 else (0, 1, 0, 1))
        return w * (torch.diagonal(Xt, dim1=-2, dim2=-1).unsqueeze(-2) - Xt.mT)
    r, sl = D.root, D.block
    out = torch.empty_like(w)
    out[:, :, r] = 0
    d = torch.diagonal(X, dim1=-2, dim2=-1).unsqueeze(-2)
    torch.sub(d, X.mT, out=out[:, sl, sl])  # [h, d] = X[d, d] − X[d, h] between non-root vertices
    out[:, r : r + 1, sl] = d  # from the root: X[d, d]
    return out.mul_(w)


def _arc_weights(Zd, D, record=False):
    """w = exp(Zd − max over the arcs), exactly 0 off the arcs; the shift is a constant.
    In place on a fresh buffer unless autograd is to ``record`` the computation."""
    Zm = Zd.masked_fill(D.absent, float("-inf"))
    if record:
        return torch.exp(Zm - Zm.amax(dim=(-2, -1), keepdim=True).detach())
    return Zm.sub_(Zm.amax(dim=(-2, -1), keepdim=True)).exp_()


def fast_arborescence_marginals(Zd, D, fallback):
    """(w, X, μ, ok) of ``FastArborescenceMarginals`` computed outside autograd."""
    w = _arc_weights(Zd, D)
    L, din = reduced_laplacian(w, D)
    X, ok = screen(*torch.linalg.inv_ex(L), din, fallback)
    return w, X, resistance_form(w, X, D), ok


class FastArborescenceMarginals(torch.autograd.Function):
    """Arc marginals μ = w ∘ (diag(L̂⁻¹) − L̂⁻ᵀ) of Zd (B, n, n) on a ``Digraph`` by one batched
    inverse, with the analytic backward of the module docstring.

    ``apply(Zd, D, fallback)`` -> (μ (B, n, n), ok): with ``fallback`` the per-element
    acceptance flag, None when all are accepted (``screen``); rejected elements get μ = 0
    and zero gradients.  Differentiable to any order.
    """

    @staticmethod
    def forward(ctx, Zd, D, fallback):
        w, X, mu, ok = fast_arborescence_marginals(Zd, D, fallback)
        ctx.D, ctx.ok = D, ok
        ctx.save_for_backward(Zd, w, X, mu)
        if ok is not None:
            ctx.mark_non_differentiable(ok)
        return mu, ok

    @staticmethod
    def backward(ctx, G, _):
        Zd, w, X, mu = ctx.saved_tensors
        D = ctx.D
        if torch.is_grad_enabled():  # create_graph: rebuild w, X, μ as functions of Zd
            w = _arc_weights(Zd, D, record=True)
            X = _screened_inverse(reduced_laplacian(w, D)[0], ctx.ok)
            mu = resistance_form(w, X, D)
        La, _ = reduced_laplacian(G * w, D)
        M = torch.matmul(torch.matmul(X, La), X)
        return G * mu - resistance_form(w, M, D), None, None


def lu_log_det(L, fallback):
    """log det L̂ (B,) of a reduced Laplacian (B, m, m) by LU, and the per-element acceptance
    flag (B,) when ``fallback`` (else None): no row exchange happens on a column diagonally
    dominant matrix, and each pivot's cancellation ratio d_v / U_vv is at most κ."""
    m = L.shape[-1]
    LU, piv, info = torch.linalg.lu_factor_ex(L)
    U = torch.diagonal(LU, dim1=-2, dim2=-1)
    logdet = torch.log(U.abs()).sum(-1)
    if not fallback:
        return logdet, None
    with torch.no_grad():
        ident = torch.arange(1, m + 1, device=piv.device, dtype=piv.dtype)
        ok = (info == 0) & (piv == ident).all(-1) & (U > 0).all(-1)
        ok &= (torch.diagonal(L, dim1=-2, dim2=-1) / U.clamp_min(1e-300)).amax(-1) <= KAPPA_MAX
    return logdet, ok


# --------------------------------------------------------------------------------------------
# spanning trees: x (B, E) float64 on an EdgeGraph S (root n − 1)
# --------------------------------------------------------------------------------------------
def edge_laplacian(w, S):
    """Reduced Laplacian (B, m, m) of edge weights w (B, E), root n − 1 removed.

    Small graphs: one matmul with the incidence table.  Otherwise a view with row stride
    n (LAPACK copies it anyway): one gather of the non-root rows of −W, whose diagonal
    (the pad, 0) then receives the in-weights.
    """
    B, n = w.shape[0], S.n
    if S.incidence is not None:
        return (w @ S.incidence).view(B, n - 1, n - 1)
    W = torch.gather(torch.nn.functional.pad(w.neg(), (0, 1)), 1, S.lap.expand(B, -1)).view(B, n - 1, n)
    L = W[:, :, : n - 1]
    L.diagonal(dim1=-2, dim2=-1).sub_(W.sum(dim=-1))
    return L


def edge_quadratic(X, S):
    """b_eᵀ X b_e = X̃_ii + X̃_jj − 2 X̃_ij for every edge (B, E); X (B, m, m) symmetric, X̃ zero at the root.

    Small graphs: one matmul with the incidence table.  Otherwise dense
    R[i, j] = X_ii + X_jj − 2 X_ij (B, m, m), whose diagonal (0 by this formula) then
    holds X_ii = b_eᵀ X b_e for the edge (i, root), and one gather of the edges' entries.
    """
    B, m = X.shape[0], S.n - 1
    if not X.is_contiguous() and X.mT.is_contiguous():
        X = X.mT  # X is symmetric: a column-major inverse is its own row-major transpose
    if S.incidence is not None:
        return X.reshape(B, m * m) @ S.incidence.mT
    d = torch.diagonal(X, dim1=-2, dim2=-1).contiguous()  # broadcasts far faster than the strided view
    R = torch.add(d.unsqueeze(-1), d.unsqueeze(-2)).add_(X, alpha=-2.0)
    R.diagonal(dim1=-2, dim2=-1).copy_(d)
    return torch.gather(R.view(B, -1), 1, S.quad.expand(B, -1))


def spd_inverse(L, eye):
    """L⁻¹ (B, m, m) of symmetric positive definite L by Cholesky, and LAPACK's info (B,).

    L = C Cᵀ, Y = C⁻¹ by one triangular solve, L⁻¹ = Yᵀ Y (cheaper than
    ``torch.linalg.inv``, which is LU and a solve against the identity).  For the reduced
    Laplacian (an M-matrix) the computed C keeps the signs of an M-matrix factor (positive
    diagonal, off-diagonal ≤ 0: each update subtracts a product of two non-positive
    entries from a non-positive one), so substitution against the identity only ever adds
    non-negative terms, and so does Yᵀ Y (Y ≥ 0): no cancellation after the
    factorization, whose pivots C_vv² are those of Gaussian elimination, so ``accept``'s κ
    test applies unchanged.  A failed factorization (info > 0) leaves non-finite or wrong
    entries that ``accept`` rejects.
    """
    C, info = torch.linalg.cholesky_ex(L)
    Y = torch.linalg.solve_triangular(C, eye.expand_as(L), upper=False)
    return torch.bmm(Y.mT, Y), info


def _edge_weights(x, record=False):
    """w = exp(x − max x) (B, E); the shift is a constant (torch.softmax measured slower in
    float64).  In place on a fresh buffer unless autograd is to ``record`` the computation."""
    if record:
        return torch.exp(x - x.amax(dim=-1, keepdim=True).detach())
    return (x - x.amax(dim=-1, keepdim=True)).exp_()


def fast_spanning_tree_marginals(x, S, fallback):
    """(w, X, μ, ok) of ``FastSpanningTreeMarginals`` computed outside autograd."""
    w = _edge_weights(x)
    L = edge_laplacian(w, S)
    X, ok = screen(*spd_inverse(L, S.eye), torch.diagonal(L, dim1=-2, dim2=-1), fallback)
    return w, X, w * edge_quadratic(X, S), ok


class FastSpanningTreeMarginals(torch.autograd.Function):
    """Edge marginals μ_e = w_e b_eᵀ L̂⁻¹ b_e of x (B, E) on an ``EdgeGraph`` by one batched
    inverse (Cholesky, ``spd_inverse``), with the analytic backward of the module docstring
    fused over the edge list: ∂⟨G, μ⟩/∂x_e = G_e μ_e − w_e b_eᵀ M b_e, M = X L̂(G ∘ w) X.

    ``apply(x, S, fallback)`` -> (μ (B, E), ok) as for ``FastArborescenceMarginals``.
    Differentiable to any order.
    """

    @staticmethod
    def forward(ctx, x, S, fallback):
        w, X, mu, ok = fast_spanning_tree_marginals(x, S, fallback)
        ctx.S, ctx.ok = S, ok
        ctx.save_for_backward(x, w, X, mu)
        if ok is not None:
            ctx.mark_non_differentiable(ok)
        return mu, ok

    @staticmethod
    def backward(ctx, G, _):
        x, w, X, mu = ctx.saved_tensors
        S = ctx.S
        if torch.is_grad_enabled():  # create_graph: rebuild w, X, μ as functions of x
            w = _edge_weights(x, record=True)
            X = _screened_inverse(edge_laplacian(w, S), ctx.ok)
            mu = w * edge_quadratic(X, S)
        M = torch.matmul(torch.matmul(X, edge_laplacian(G * w, S)), X)
        return torch.addcmul(G * mu, w, edge_quadratic(M, S), value=-1.0), None, None
