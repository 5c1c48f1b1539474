"""The README's main job: a short tour of declaring a polytope and sampling it three ways."""

from __future__ import annotations

import time

import cvxpy as cp
import torch

import sstcvx


def run_tour(out=print, seed: int = 0) -> None:
    """Declare conv of the 3-subsets of 8 items with CVXPY; draw relaxed, hard and straight-through samples."""
    torch.manual_seed(seed)
    x = cp.Variable(8)
    P = sstcvx.Polytope.from_cvxpy(x, [x >= 0, x <= 1, cp.sum(x) == 3], name="3-subsets of 8")
    out(f"declared {P!r} with {len(P.cvxpy_declaration()[1])} CVXPY constraints")
    theta = torch.randn(32, 8, requires_grad=True)
    generator = torch.Generator().manual_seed(seed)

    start = time.perf_counter()
    soft = sstcvx.sample(P, theta, tau=0.5, regularizer="binary_entropy", generator=generator)
    out(
        f"relaxed  X_tau: shape {tuple(soft.shape)}, row sums in [{soft.sum(-1).min():.6f}, {soft.sum(-1).max():.6f}], "
        f"first row {[round(v, 3) for v in soft[0].tolist()]}  ({time.perf_counter() - start:.2f} s, generic path)"
    )
    hard = sstcvx.sample(P, theta, mode="hard", generator=generator)
    out(f"hard     X    : first row {hard[0].int().tolist()}, every row has exactly three ones: {bool((hard.sum(-1) == 3).all())}")
    st = sstcvx.sample(P, theta, tau=0.5, regularizer="binary_entropy", mode="straight_through", generator=generator)
    weights = torch.randn(8)
    (st * weights).sum().backward()
    out(
        f"straight-through: forward values are 0/1: {bool(((st == 0) | (st == 1)).all())}; "
        f"gradient wrt theta has shape {tuple(theta.grad.shape)} and norm {theta.grad.norm():.4f}"
    )
