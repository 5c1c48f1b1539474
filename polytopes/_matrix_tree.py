"""Log-partition functions and marginals of Gibbs distributions over trees (Matrix-Tree theorem).

Problem.  Given log-weights ``Z`` on the edges of a graph (``Z = U / tau``), the Gibbs
distribution over its spanning trees T is p(T) ∝ exp(Σ_{e∈T} Z_e); over the arborescences
A of a digraph rooted at ``root`` (every other vertex has exactly one incoming arc) it is
p(A) ∝ exp(Σ_{(h→d)∈A} Z_hd).  This module computes, batched over the leading dimensions,

* the log-partition  log Σ_T exp⟨Z, T⟩  (Kirchhoff / Tutte: a log-determinant of the
  Laplacian with the root's row and column removed), and
* the marginals  μ = ∇_Z log-partition, which are the exponential-family-entropy
  relaxation X_tau of the tree polytopes; they are differentiable to any order.

One directed core serves both families.  With in-weights w(h→d) = exp(Z_hd), the directed
Laplacian is L[d, d] = Σ_h w(h→d), L[h, d] = −w(h→d); deleting the root's row and column
gives L̂ (m × m, m = n − 1) with det L̂ = Σ_A Π w (Tutte).  An undirected graph is the
digraph with both arcs of every edge carrying the edge's weight; its spanning trees are in
bijection with the arborescences rooted at any vertex, so Kirchhoff's theorem is the
symmetric case and the edge marginal is μ_e = μ(i→j) + μ(j→i).

Two paths, chosen per batch element (``method="auto"``; "fast" and "stable" force one):

1. **fast** (``polytopes._matrix_tree_fast``): one batched inverse of L̂ (Cholesky for
   spanning trees), the marginals as linear forms in L̂⁻¹ and an analytic backward.  An
   element is accepted when its cancellation ratio κ = max_d L̂[d, d]·L̂⁻¹[d, d] is at most
   1e5 (error ≲ 2e-11); deciding this costs one host synchronization per call.
2. **stable** (``polytopes._matrix_tree_stable``): log-space Gaussian elimination, exact
   for any spread of Z (so it reaches the hard argmax as tau → 0), several times slower;
   run only on the elements the fast path rejects (typically small tau).

The graph's index tables are built once per graph and shared between calls and threads
(``polytopes._matrix_tree_graphs``).

Cost.  O(B n³).  Precision: both paths compute in float64 whatever the input dtype and
cast the result back: the marginals are differences of entries of L̂⁻¹ (effective
resistances), whose cancellation costs digits that float32 does not have; float64 keeps
the polytope's equalities (Σμ = n − 1, unit in-degree) to ~1e-12.

Masks.  ``mask`` (an (n, n) bool tensor, shared by the batch) marks the arcs that exist;
the graph must contain at least one spanning tree / arborescence (callers validate this
once, on the structure).  Marginals are exactly 0 off the graph.
"""

from __future__ import annotations

import torch

from ._matrix_tree_fast import (
    FastArborescenceMarginals,
    FastSpanningTreeMarginals,
    fast_arborescence_marginals,
    fast_spanning_tree_marginals,
    lu_log_det,
    reduced_laplacian,
)
from ._matrix_tree_graphs import digraph, edge_graph
from ._matrix_tree_stable import stable_log_det, stable_marginals

__all__ = [
    "arborescence_log_partition",
    "arborescence_marginals",
    "spanning_tree_log_partition",
    "spanning_tree_marginals",
]

_METHODS = ("auto", "fast", "stable")


def _check_method(method):
    if method not in _METHODS:
        raise ValueError(f"method: expected one of {_METHODS}, got {method!r}")


# --------------------------------------------------------------------------------------------
# the directed core: Zd (B, n, n) float64 on a Digraph D (root 0 or n − 1)
# --------------------------------------------------------------------------------------------
def _dir_marginals(Zd, D, method):
    """∂ log det L̂ / ∂ Zd for Zd (B, n, n) float64; exactly 0 off the arcs."""
    if method == "stable":
        return stable_marginals(Zd, D)
    if torch.is_grad_enabled() and Zd.requires_grad:
        mu, ok = FastArborescenceMarginals.apply(Zd, D, method == "auto")
    else:  # no graph wanted: skip the autograd.Function's bookkeeping
        mu, ok = fast_arborescence_marginals(Zd, D, method == "auto")[2:]
    if ok is None:
        return mu
    bad = (~ok).nonzero().squeeze(-1)
    return mu.index_copy(0, bad, stable_marginals(Zd.index_select(0, bad), D))


def _dir_log_partition(Zd, D, method):
    """log det L̂ (B,), by an LU factorization when κ allows and log-space elimination otherwise."""
    if method == "stable":
        return stable_log_det(Zd, D)
    m = Zd.shape[-1] - 1
    Zm = Zd.masked_fill(D.absent, float("-inf"))
    hi = Zm.amax(dim=(-2, -1), keepdim=True).detach()
    L, _ = reduced_laplacian(torch.exp(Zm - hi), D, dense=False)
    logdet, ok = lu_log_det(L, method == "auto")
    logdet = logdet + m * hi.reshape(-1)
    if ok is None or bool(ok.all()):
        return logdet
    bad = (~ok).nonzero().squeeze(-1)
    return logdet.index_copy(0, bad, stable_log_det(Zd.index_select(0, bad), D))


# --------------------------------------------------------------------------------------------
# public: arborescences
# --------------------------------------------------------------------------------------------
def _arb_prepare(scores, root, mask):
    if not isinstance(scores, torch.Tensor) or scores.dim() < 2 or scores.shape[-1] != scores.shape[-2]:
        raise ValueError(
            f"scores: expected a tensor of shape (..., n, n), got "
            f"{tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__}"
        )
    n = scores.shape[-1]
    if n < 2:
        raise ValueError(f"scores: expected n >= 2 vertices, got shape {tuple(scores.shape)}")
    if not -n <= root < n:
        raise ValueError(f"root: expected a vertex in [0, {n}), got {root}")
    D = digraph(n, root % n, mask, scores.device)
    Zd = (scores if scores.dim() == 3 else scores.reshape(-1, n, n)).to(torch.float64)  # no view node for (B, n, n)
    if D.perm is not None:
        Zd = Zd[:, D.perm][:, :, D.perm]
    return Zd, D


def arborescence_marginals(scores, root: int = 0, mask=None, method: str = "auto"):
    """Arc marginals of the Gibbs distribution over arborescences rooted at ``root``.

    ``scores``: (..., n, n), ``scores[..., h, d]`` the log-weight of arc h→d (U / tau).
    Entries on the diagonal, in the root's column and off ``mask`` are ignored.
    Returns μ (..., n, n) with μ[h, d] = P(h→d ∈ A) = ∂/∂scores log Σ_A exp⟨scores, A⟩,
    exactly 0 on ignored entries, every non-root column summing to 1; same dtype and device.
    Computed by the directed (Tutte) Matrix-Tree theorem, float64 inside; see the module
    docstring for the fast/stable paths (``method`` = "auto" | "fast" | "stable").
    Cost: O(B n³).  Differentiable to any order (gradcheck and gradgradcheck in float64).
    """
    _check_method(method)
    Zd, D = _arb_prepare(scores, root, mask)
    mu = _dir_marginals(Zd, D, method)
    if D.perm is not None:
        mu = mu[:, D.inverse_perm][:, :, D.inverse_perm]
    return (mu if scores.dim() == 3 else mu.reshape(scores.shape)).to(scores.dtype)


def arborescence_log_partition(scores, root: int = 0, mask=None, method: str = "auto"):
    """log Σ_A exp⟨scores, A⟩ over arborescences rooted at ``root``: shape ``scores.shape[:-2]``.

    Tutte's theorem, log det of the reduced directed Laplacian, float64 inside; LU when
    well conditioned, log-space elimination otherwise.  Cost O(B n³).
    """
    _check_method(method)
    Zd, D = _arb_prepare(scores, root, mask)
    return _dir_log_partition(Zd, D, method).reshape(scores.shape[:-2]).to(scores.dtype)


# --------------------------------------------------------------------------------------------
# public: spanning trees
# --------------------------------------------------------------------------------------------
def _st_prepare(scores, edges, n):
    if not isinstance(scores, torch.Tensor) or scores.dim() < 1:
        raise ValueError(f"scores: expected a tensor of shape (..., E), got {type(scores).__name__}")
    edges = torch.as_tensor(edges)
    if edges.dim() != 2 or edges.shape[1] != 2 or edges.shape[0] != scores.shape[-1]:
        raise ValueError(
            f"edges: expected shape (E, 2) with E = scores.shape[-1] = {scores.shape[-1]}, got {tuple(edges.shape)}"
        )
    S = edge_graph(edges, n, scores.device)
    x = scores if scores.dim() == 2 else scores.reshape(-1, scores.shape[-1])  # no view node when already (B, E)
    return x.to(torch.float64), S


def _st_directed(x, S):
    """The directed core's log-weights (B, n, n) of edge scores x (B, E): both arcs of each edge."""
    return torch.nn.functional.pad(x, (0, 1))[:, S.gather].reshape(-1, S.n, S.n)


def spanning_tree_marginals(scores, edges, n: int, method: str = "auto"):
    """Edge marginals of the Gibbs distribution over the spanning trees of a graph.

    ``scores``: (..., E) log-weights (U / tau) of the undirected edges ``edges`` (E, 2) of a
    connected graph on ``n`` vertices (no duplicates, no loops).  Returns μ (..., E),
    μ_e = P(e ∈ T) = ∂/∂scores log Σ_T exp⟨scores, T⟩ (Kirchhoff's Matrix-Tree theorem),
    Σ_e μ_e = n − 1; same dtype and device.  Float64 inside, fast inverse path with a
    log-space fallback per element (``method``); see the module docstring.
    Cost: O(B n³).  Differentiable to any order (gradcheck and gradgradcheck in float64).
    """
    _check_method(method)
    x, S = _st_prepare(scores, edges, n)
    E = x.shape[-1]

    def stable(xs):  # μ_e = μ(i→j) + μ(j→i) for the arborescences rooted at n − 1
        mu_dir = stable_marginals(_st_directed(xs, S), S.digraph)
        return mu_dir.flatten(1)[:, S.arcs].reshape(-1, 2, E).sum(1)

    if method == "stable":
        mu = stable(x)
    else:
        if torch.is_grad_enabled() and x.requires_grad:
            mu, ok = FastSpanningTreeMarginals.apply(x, S, method == "auto")
        else:  # no graph wanted: skip the autograd.Function's bookkeeping
            mu, ok = fast_spanning_tree_marginals(x, S, method == "auto")[2:]
        if ok is not None:
            bad = (~ok).nonzero().squeeze(-1)
            mu = mu.index_copy(0, bad, stable(x.index_select(0, bad)))
    return (mu if scores.dim() == 2 else mu.reshape(scores.shape)).to(scores.dtype)


def spanning_tree_log_partition(scores, edges, n: int, method: str = "auto"):
    """log Σ_T exp⟨scores, T⟩ over spanning trees: shape ``scores.shape[:-1]``.  Float64 inside."""
    _check_method(method)
    x, S = _st_prepare(scores, edges, n)
    return _dir_log_partition(_st_directed(x, S), S.digraph, method).reshape(scores.shape[:-1]).to(scores.dtype)
