"""The interior-point solver's two reductions of the Newton system, interleaved in one process.

    python benchmarks/interior_point_reduction.py [--quick] [--threads T] [--wall]

For each case: forward + backward time per instance of :class:`InteriorPointRelaxation` with the
normal matrix M = C Phi^-1 C^T + diag(0, s / y) (m x m) and with the primal reduction H = Phi +
G^T diag(y / s) G (N x N, by levels) and the equality Schur complement, both forced whatever the
build-time rule chooses; which one the rule chooses; the mean and largest iteration counts and the
largest difference of X between the two.  Timings are process CPU time on a shared machine: read the
ratios, not the absolute figures.
"""

from __future__ import annotations

import dataclasses
import sys
import warnings
from pathlib import Path

import cvxpy as cp
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _timing import benchmark_arguments, fmt, interleaved

import sstcvx
from polytopes.spanning_tree import spanning_trees_by_flows
from sstcvx.generic import interior_point as ipm
from sstcvx.generic import primal_reduction, sparse_cholesky
from sstcvx.regularizers import get_regularizer


def path_independent_sets(n):
    x = cp.Variable(n)
    return sstcvx.Polytope.from_cvxpy(
        x, [x >= 0, x <= 1, x[:-1] + x[1:] <= 1], name=f"independent-sets(path {n})", recognize=False
    )


def packing(n=1000, m=100):
    torch.manual_seed(1)
    G = torch.zeros(m, n)
    for i in range(m):
        G[i, torch.randperm(n)[:30]] = 1.0
    x = cp.Variable(n)
    return sstcvx.Polytope.from_cvxpy(
        x, [x >= 0, x <= 1, G.numpy() @ x <= 5], name=f"packing({n} vars, {m} rows)", recognize=False
    )


def cases(quick):
    yield spanning_trees_by_flows(4, name="spanning-trees(K4, flows)"), "binary_entropy", 256, 1.0
    yield spanning_trees_by_flows(4, name="spanning-trees(K4, flows)"), "euclidean", 256, 1.0
    yield spanning_trees_by_flows(5, name="spanning-trees(K5, flows)"), "binary_entropy", 256, 1.0
    P = path_independent_sets(30)
    yield P, "binary_entropy", 256, 1.0
    yield P, "euclidean", 256, 1.0
    if not quick:
        P = packing()
        yield P, "binary_entropy", 64, 2.0
        yield P, "euclidean", 64, 2.0


def relaxations(P, reg):
    """(chosen, normal, primal): the relaxation as built, and two with the reduction forced."""
    chosen = ipm.InteriorPointRelaxation(P, get_regularizer(reg))
    ip = chosen.problem_on("cpu")
    forced = {}
    for name, primal in (("normal", None), ("primal", primal_reduction.structure(ip.C, ip.m_eq))):
        R = ipm.InteriorPointRelaxation(P, get_regularizer(reg))
        R._ip_on_device["cpu"] = dataclasses.replace(ip, primal=primal)
        forced[name] = R
    return chosen, forced


def forward_backward(R, U, W):
    U = U.detach().requires_grad_(True)
    X = R(U)
    (g,) = torch.autograd.grad((X * W).sum(), U)
    return X.detach(), g


def main(argv=None):
    args = benchmark_arguments(__doc__, "no packing case, fewer rounds", argv)
    rounds = 3 if args.quick else 7
    warnings.simplefilter("ignore", RuntimeWarning)
    print(
        f"{'case':<45} {'rule':>6} | {'normal':>11} | {'primal':>11} | {'n/p':>5} | {'iter n':>9} | {'iter p':>9} | {'|dX|':>7} | {'|dVJP|':>7}"
    )
    for P, reg, B, scale in cases(args.quick):
        torch.manual_seed(0)
        U = scale * torch.randn(B, *P.event_shape, dtype=torch.float64)
        W = torch.randn(B, *P.event_shape, dtype=torch.float64)
        chosen, forced = relaxations(P, reg)
        ip = chosen.problem_on("cpu")
        if forced["primal"].problem_on("cpu").primal is None:
            G = ip.C[ip.m_eq :]
            touch = (G != 0).to(G.dtype)
            nz = ((touch.T @ touch) > 0) | torch.eye(G.shape[1], dtype=torch.bool)
            levels, _, updates = sparse_cholesky.symbolic_cost(nz)
            m, N = ip.C.shape
            print(
                f"{P.name + ' ' + reg:<45} normal | no primal reduction: H's factorization {updates:.2e} multiply-adds "
                f"per element ({levels} levels), M's {m * m * N / 2 + m**3 / 6:.2e}",
                flush=True,
            )
            continue
        times = interleaved(
            {k: (lambda R=R: forward_backward(R, U, W)) for k, R in forced.items()}, rounds=rounds, warmup=1
        )
        sols = {k: R.solve(U) for k, R in forced.items()}
        (Xn, gn), (Xp, gp) = forward_backward(forced["normal"], U, W), forward_backward(forced["primal"], U, W)
        rule = "primal" if chosen.problem_on("cpu").primal is not None else "normal"
        it = {k: f"{float(s.iterations.float().mean()):4.1f}/{int(s.iterations.max()):3d}" for k, s in sols.items()}
        print(
            f"{P.name + ' ' + reg:<45} {rule:>6} | {fmt(times['normal'] / B)} | {fmt(times['primal'] / B)} | "
            f"{times['normal'] / times['primal']:5.2f} | {it['normal']:>9} | {it['primal']:>9} | "
            f"{float((Xn - Xp).abs().max()):7.1e} | {float((gn - gp).abs().max()):7.1e}",
            flush=True,
        )


if __name__ == "__main__":
    main()
