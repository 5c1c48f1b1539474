"""Exact solvers over an explicit vertex list V of shape (m, *event_shape).

With the finite set listed, the exponential-family entropy relaxation is
X_tau = softmax(V Z)^T V (the Gibbs marginals, Z = U / tau) and the LP argmax is
the best listed vertex.  This is the brute-force oracle of every specialized
solver, and what ``solver="auto"`` uses for ``exp_family_entropy`` on a polytope
that lists its vertices but has no specialized solver (the generic path solves
the same problem by CVXPY over the vertex weights).
Cost: O(B m d) for d = prod(event_shape).
"""

from __future__ import annotations

import torch


def _flat_vertices(P, like: torch.Tensor) -> torch.Tensor:
    V = P.vertices
    if V is None:
        raise ValueError(
            f"{P.name}: its vertices are unknown or too many to list, so the exponential-family "
            "entropy cannot be computed by enumeration; use a polytope with a specialized "
            "'exp_family_entropy' solver (see polytopes) or declare it with Polytope.from_vertices"
        )
    return V.reshape(V.shape[0], -1).to(dtype=like.dtype, device=like.device)


def vertex_marginals(P, Z: torch.Tensor) -> torch.Tensor:
    """Marginals E[y] of p(y) ∝ exp<Z, y> over the vertices y of P; Z: (B, *event_shape)."""
    V = _flat_vertices(P, Z)
    weights = torch.softmax(Z.reshape(Z.shape[0], -1) @ V.T, dim=-1)
    return (weights @ V).reshape(Z.shape)


def best_vertex(P, U: torch.Tensor) -> torch.Tensor:
    """argmax_{y in vertices} <U, y>; U: (B, *event_shape)."""
    V = _flat_vertices(P, U)
    index = (U.reshape(U.shape[0], -1) @ V.T).argmax(dim=-1)
    return V[index].reshape(U.shape)
