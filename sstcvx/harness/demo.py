"""The README's main job: a short tour of declaring a polytope and sampling it three ways."""

from __future__ import annotations

import time

import cvxpy as cp
import torch

import sstcvx
from sstcvx.families import families as registered_families
from sstcvx.families import load_errors

from .report import ComparisonReport


def run_tour(out=print, seed: int = 0) -> None:
    """Declare conv of the 3-subsets of 8 items with CVXPY; draw relaxed, hard and straight-through samples."""
    torch.manual_seed(seed)
    x = cp.Variable(8)
    P = sstcvx.Polytope.from_cvxpy(x, [x >= 0, x <= 1, cp.sum(x) == 3], name="3-subsets of 8")
    out(f"declared {P!r} with {len(P.cvxpy_declaration()[1])} CVXPY constraints")
    path = sstcvx.relaxation_solver(P, "binary_entropy")[1]
    theta = torch.randn(32, 8, requires_grad=True)
    generator = torch.Generator().manual_seed(seed)

    start = time.perf_counter()
    soft = sstcvx.sample(P, theta, tau=0.5, regularizer="binary_entropy", generator=generator)
    out(
        f"relaxed  X_tau: shape {tuple(soft.shape)}, row sums in [{soft.sum(-1).min():.6f}, {soft.sum(-1).max():.6f}], "
        f"first row {[round(v, 3) for v in soft[0].tolist()]}  ({time.perf_counter() - start:.2f} s, {path} path)"
    )
    hard = sstcvx.sample(P, theta, mode="hard", generator=generator)
    out(
        f"hard     X    : first row {hard[0].int().tolist()}, every row has exactly three ones: {bool((hard.sum(-1) == 3).all())}"
    )
    st = sstcvx.sample(P, theta, tau=0.5, regularizer="binary_entropy", mode="straight_through", generator=generator)
    weights = torch.randn(8)
    (st * weights).sum().backward()
    grad = theta.grad
    assert grad is not None  # theta requires grad and st depends on it
    out(
        f"straight-through: forward values are 0/1: {bool(((st == 0) | (st == 1)).all())}; "
        f"gradient wrt theta has shape {tuple(grad.shape)} and norm {grad.norm():.4f}"
    )


def _path_independent_sets(n: int = 6):
    """A polytope no family covers: the independent sets of a path on n nodes (no two neighbours chosen).

    Declared with CVXPY (x_i + x_{i+1} <= 1 is totally unimodular on a path, so the
    LP vertices are exactly the independent sets) and listed by brute force.
    """
    import itertools

    x = cp.Variable(n)
    constraints = [x >= 0, x <= 1] + [x[i] + x[i + 1] <= 1 for i in range(n - 1)]
    P = sstcvx.Polytope.from_cvxpy(x, constraints, name=f"path-indep-sets({n})")
    V = [
        bits
        for bits in itertools.product((0.0, 1.0), repeat=n)
        if all(bits[i] * bits[i + 1] == 0 for i in range(n - 1))
    ]
    return P, torch.tensor(V, dtype=torch.float64)


def run_demo(out=print, seed: int = 0, batch: int = 8, repeats: int = 3, families=None) -> None:
    """The README's main job (about a minute): the tour, a user polytope checked by brute force, every family compared.

    ``families``: names of registered families (:mod:`sstcvx.families`) to compare (default all);
    ``batch`` and ``repeats`` are passed to :func:`sstcvx.compare`.
    """
    start = time.perf_counter()
    out("== 1. declare a polytope with CVXPY and sample it three ways")
    run_tour(out, seed)

    out("")
    out("== 2. your own polytope: the CVXPY declaration against brute force over its listed vertices")
    P, V = _path_independent_sets(6)
    report = sstcvx.compare(P, ["euclidean", "binary_entropy"], batch=batch, repeats=repeats, seed=seed, vertices=V)
    out(f"{P!r}, {V.shape[0]} vertices")
    out(report.table())

    out("")
    out("== 3. every registered family: generic CVXPY path vs specialized solver on the same utilities")
    registered = registered_families()
    for package, error in load_errors().items():
        out(f"  family package {package} skipped: {error}")
    combined = ComparisonReport()
    for name in registered if families is None else families:
        family = registered[name]
        t0 = time.perf_counter()
        Q = family()
        combined = combined + sstcvx.compare(Q, list(family.regularizers), batch=batch, repeats=repeats, seed=seed)
        out(f"  {name:<14} {Q!r}: {', '.join(family.regularizers)} ({time.perf_counter() - t0:.1f} s)")
    out(combined.table())
    out(f"demo done in {time.perf_counter() - start:.0f} s")
