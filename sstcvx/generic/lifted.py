"""The generic ``exp_family_entropy``: the entropy relaxation over the vertex weights.

``exp_family_entropy`` (f = A*, the conjugate of the log-partition over the vertices V)
has no CVXPY form in x, but A*(x) = min {sum_v l_v log l_v : l in the simplex, V^T l = x},
so the relaxation is the entropy relaxation over the vertex weights l with utilities V z,
mapped back by x = V^T l: one conic problem with |V| exponential cones per element, with the
same solver checks as every generic layer, exact up to the solver's tolerance.  Its
backward is the lifted problem's exact Jacobian at the solver's weights, not diffcp's.
It needs ``P.vertices``.
"""

from __future__ import annotations

import time

import cvxpy as cp
import torch

from ..polytope import Polytope
from ..regularizers import get_regularizer
from .layer import GenericRelaxation, refuse_double_backward
from .settings import check_solver_args, default_solver_args


class VertexWeightsRelaxation:
    """X_tau = V^T l(V Z) for a batch Z, l the entropy relaxation on the simplex of vertex weights."""

    def __init__(self, P, regularizer):
        if P.vertices is None:
            raise ValueError(
                f"regularizer {regularizer.name!r} on {P.name}: it has no CVXPY form, and the "
                "generic path can only solve it over the vertex weights, which needs the vertices "
                "that this polytope does not list; register a specialized solver (see polytopes) "
                "or declare the polytope with Polytope.from_vertices"
            )
        start = time.perf_counter()
        self.polytope = P
        self.regularizer = regularizer
        V = P.vertices
        self.vertices = V.reshape(V.shape[0], -1).to(device="cpu", dtype=torch.float64)
        weights = cp.Variable(V.shape[0])
        simplex = Polytope.from_cvxpy(
            weights, [weights >= 0, cp.sum(weights) == 1], name=f"vertex weights of {P.name}", recognize=False
        )  # solved as declared: this is the generic path
        self.lifted = GenericRelaxation(simplex, get_regularizer("entropy"))
        self.build_time = time.perf_counter() - start

    def __call__(self, Z: torch.Tensor, solver_args: dict | None = None) -> torch.Tensor:
        """Z: (B, *event_shape) -> X_tau of the same shape, dtype and device; differentiable."""
        Z64 = Z.reshape(Z.shape[0], -1).to(device="cpu", dtype=torch.float64)
        if solver_args is not None:
            check_solver_args(solver_args)
        args = dict(default_solver_args(self.lifted.regularizer) if solver_args is None else solver_args)
        with torch.no_grad():
            weights = self.lifted.solve(Z64 @ self.vertices.T, args)
        X = _VertexWeightsMean.apply(Z64, weights, self.vertices, self.polytope.name)
        return X.reshape(Z.shape).to(dtype=Z.dtype, device=Z.device)


class _VertexWeightsMean(torch.autograd.Function):
    """X = V^T l for the conic solver's vertex weights l (B, m), with the lifted problem's exact Jacobian.

    The weights solve max <V z, l> + H(l) over the simplex, whose Jacobian in V z is
    diag(l) - l l^T; so dX/dz = V^T (diag(l) - l l^T) V, the covariance of the vertices
    under l (the E.F. Jacobian is a covariance), applied at the solver's l.
    diffcp's own derivative of this problem, with one exponential cone per vertex, is not
    accurate enough to serve (docs/generic.md).
    Forward Z64 (B, d) is only the node to differentiate; V (m, d).  Cost O(B m d).
    """

    @staticmethod
    def forward(ctx, Z64, weights, V, name):
        ctx.save_for_backward(weights, V)
        ctx.name = name
        return weights @ V

    @staticmethod
    def backward(ctx, G):
        # The weights are the solver's, constants here: a second derivative would need their
        # derivative in Z, which this backward does not build; refuse rather than drop it.
        refuse_double_backward(f"the generic exp_family_entropy (vertex weights) on {ctx.name}")
        weights, V = ctx.saved_tensors
        g = G @ V.T
        return ((g - (weights * g).sum(-1, keepdim=True)) * weights) @ V, None, None, None
