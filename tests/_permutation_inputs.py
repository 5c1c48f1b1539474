"""Inputs and checks shared by the tests of the permutation solvers (Sinkhorn, the Birkhoff projection)
and of their compiled kernels."""

import torch

from polytopes import _compiled


def gumbel_utilities(batch, n, scale=1.0, seed=0):
    """Gumbel-perturbed utilities scale * N(0, 1) + Gumbel, float64 (batch, n, n)."""
    generator = torch.Generator().manual_seed(seed)
    uniform = torch.rand(batch, n, n, dtype=torch.float64, generator=generator).clamp_min(1e-300)
    return scale * torch.randn(batch, n, n, dtype=torch.float64, generator=generator) - torch.log(-torch.log(uniform))


def forward_backward(solver, Z, G, create_graph=False):
    """(X, dL/dZ) of ``solver`` at Z for the loss L = <X, G>."""
    Z = Z.clone().requires_grad_(True)
    X = solver(Z)
    (grad,) = torch.autograd.grad((X * G).sum(), Z, create_graph=create_graph)
    return X, grad


def both_paths(solver, Z, G):
    """(X, dL/dZ) by the compiled path and by the torch path."""
    compiled = forward_backward(solver, Z, G)
    with _compiled.disabled():
        reference = forward_backward(solver, Z, G)
    return compiled, reference


def violation(X):
    """The largest |row or column sum - 1| of X (..., n, n)."""
    X = X.detach().double()
    return max(float((X.sum(-1) - 1).abs().max()), float((X.sum(-2) - 1).abs().max()))


def descent_directions(batch, n, seed):
    """(Y, du, dv): Y (batch, n, n), du (batch, n, 1), dv (batch, 1, n) with du + dv a descent direction
    at t = 0 of phi(t) = 1/2 |max(Y - t (du + dv), 0)|^2 + t sum(du + dv) (the projection's line search)."""
    generator = torch.Generator().manual_seed(seed)
    Y = torch.randn(batch, n, n, dtype=torch.float64, generator=generator)
    du = torch.randn(batch, n, 1, dtype=torch.float64, generator=generator)
    dv = torch.randn(batch, 1, n, dtype=torch.float64, generator=generator)
    slope0 = du.sum((-2, -1)) + dv.sum((-2, -1)) - ((du + dv) * Y.clamp_min(0.0)).sum((-2, -1))
    sign = torch.where(slope0 < 0, 1.0, -1.0).view(-1, 1, 1).to(torch.float64)
    return Y, du * sign, dv * sign
