"""Benchmark of the permutation (Birkhoff polytope) solvers against the obvious alternatives.

    python benchmarks/permutation.py [--quick] [--threads T] [--wall]

Prints, in one run:

1. Sinkhorn (``entropy``: log-domain Newton-Sinkhorn, implicit backward) and the Birkhoff
   projection (``euclidean``: semi-smooth Newton on the dual, exact piecewise linear backward)
   against the generic path (cvxpylayers) at n = 3, 5, 8 and batch 1, 32, 256, tau = 1,
   through ``sstcvx.compare`` (``sstcvx.harness.bench.speedup_report``): per-instance
   speedups and agreement; the generic batch is capped (8 with ``--quick``, 32 otherwise).
   A last block times the specialized path alone at the hard end of the range (tau = 1e-3,
   |theta| up to 1e3: spreads of Z = U / tau up to 2e6, solved by epsilon-scaling), where
   the generic conic solver is not a meaningful reference.
2. Hard samples at batch 128, n = 10, 30, 50: ``polytopes.permutation.hungarian``
   (SciPy's linear_sum_assignment per element, on the CPU) against networkx on the same
   inputs: ``bipartite.minimum_weight_full_matching`` (sparse, SciPy underneath) and
   ``max_weight_matching`` (pure-Python blossom; timed on a subset of the batch and
   scaled, said in the output).  The graphs are built before timing, so networkx is timed
   on the matching alone; the assignments are checked to be the same.

Timing: the process's CPU time (``time.process_time``) by default, because on a shared
machine wall-clock time mostly measures the other processes; ``--wall`` uses
``time.perf_counter``.  ``--threads`` sets torch's intra-op threads (default 1).  The
median over rounds is reported, after a warm-up call (5x more rounds for the specialized
path, whose milliseconds are more exposed to the load of a shared machine).
"""

from __future__ import annotations

import os
import sys

import networkx as nx
import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from _timing import benchmark_arguments, clock, fmt, median_time

import sstcvx
from polytopes import Permutation
from polytopes.permutation import hungarian
from sstcvx.harness.bench import speedup_report


def gumbel_utilities(batch, n, scale, generator):
    theta = scale * torch.randn(batch, n, n, dtype=torch.float64, generator=generator)
    uniform = torch.rand(batch, n, n, dtype=torch.float64, generator=generator).clamp_min(1e-300)
    return theta - torch.log(-torch.log(uniform))


def forward_backward(P, U, G, tau, solver, regularizer="entropy"):
    def run():
        Ug = U.clone().requires_grad_(True)
        (sstcvx.relax(P, Ug, tau, regularizer, solver=solver) * G).sum().backward()

    return run


# ------------------------------------------------------------------------------------------------
# 1. specialized vs generic
# ------------------------------------------------------------------------------------------------


def relaxation_section(quick: bool, rounds: int, generator):
    cap = 8 if quick else 32
    print("1. Sinkhorn (entropy) and the Birkhoff projection (euclidean), specialized vs generic (cvxpylayers),")
    print("   through sstcvx.compare, tau = 1, float64")
    cases = [(Permutation(n), regularizer) for regularizer in ("entropy", "euclidean") for n in (3, 5, 8)]
    print(speedup_report(cases, tau=1.0, max_generic_batch=cap, repeats=rounds).table())
    print()
    print("   specialized only, hard end: tau = 1e-3, theta uniform in [-s, s] + Gumbel, spread of Z = U / tau ~ 2e3 s")
    print("   (s = 1: near-ties, X_tau genuinely fractional; s = 1e3: nearly a vertex)")
    print(f"   {'n':>3} {'s':>5} {'batch':>5} | {'fwd+bwd/inst':>12} | {'max marginal violation':>22}")
    for n in (3, 8) if quick else (3, 8, 30):
        P = Permutation(n)
        for scale in (1.0, 1e3):
            for batch in (32, 256):
                theta = scale * (2 * torch.rand(batch, n, n, dtype=torch.float64, generator=generator) - 1)
                U = theta + gumbel_utilities(batch, n, 0.0, generator)
                G = torch.randn(batch, n, n, dtype=torch.float64, generator=generator)
                t = median_time(forward_backward(P, U, G, 1e-3, "specialized"), rounds) / batch
                X = sstcvx.relax(P, U, 1e-3, "entropy")
                violation = max((X.sum(-1) - 1).abs().max().item(), (X.sum(-2) - 1).abs().max().item())
                print(f"   {n:>3} {scale:>5g} {batch:>5} | {fmt(t)}   | {violation:22.1e}")
    print()


# ------------------------------------------------------------------------------------------------
# 2. Hungarian vs networkx
# ------------------------------------------------------------------------------------------------


def bipartite_graph(weights: np.ndarray) -> nx.Graph:
    """Complete bipartite graph, rows ('r', i), columns ('c', j), positive edge weights."""
    n = weights.shape[0]
    graph = nx.Graph()
    graph.add_nodes_from((("r", i) for i in range(n)), bipartite=0)
    graph.add_nodes_from((("c", j) for j in range(n)), bipartite=1)
    graph.add_weighted_edges_from((("r", i), ("c", j), float(weights[i, j])) for i in range(n) for j in range(n))
    return graph


def matching_to_matrix(matching, n: int) -> np.ndarray:
    X = np.zeros((n, n))
    for a, b in matching.items() if isinstance(matching, dict) else matching:
        (_, i), (_, j) = (a, b) if a[0] == "r" else (b, a)
        X[i, j] = 1.0
    return X


def hungarian_section(quick: bool, rounds: int, generator):
    batch = 128
    blossom_subset = 4 if quick else 16
    print(f"2. hard samples (maximum-weight assignment), batch {batch}, U = N(0, 1) + Gumbel, float64")
    print("   ours = polytopes.permutation.hungarian (SciPy linear_sum_assignment per element, CPU)")
    print("   nx-full = networkx bipartite.minimum_weight_full_matching (weights max(U) - U + 1)")
    print(
        f"   nx-blossom = networkx max_weight_matching(maxcardinality=True), timed on {blossom_subset} elements, scaled"
    )
    print("   graphs built before timing; 'same' = all assignments equal to ours")
    print(f"   {'n':>3} | {'ours':>11} | {'nx-full':>11} | {'ratio':>7} | {'nx-blossom':>11} | {'ratio':>7} | same")
    for n in (10, 30, 50):
        U = gumbel_utilities(batch, n, 1.0, generator)
        ours = median_time(lambda: hungarian(U), rounds)
        X = hungarian(U).numpy()
        u = U.numpy()
        full_graphs = [bipartite_graph(u[b].max() - u[b] + 1.0) for b in range(batch)]
        rows = [[("r", i) for i in range(n)]] * batch

        def nx_full():
            return [
                nx.algorithms.bipartite.minimum_weight_full_matching(g, top_nodes=r) for g, r in zip(full_graphs, rows)
            ]

        full_time = median_time(nx_full, 1 if quick else min(rounds, 3))
        same = all(np.array_equal(matching_to_matrix(m, n), X[b]) for b, m in enumerate(nx_full()))
        blossom_graphs = [bipartite_graph(u[b] - u[b].min() + 1.0) for b in range(blossom_subset)]

        def nx_blossom():
            return [nx.max_weight_matching(g, maxcardinality=True) for g in blossom_graphs]

        start = clock()
        blossom = nx_blossom()
        blossom_time = (clock() - start) * batch / blossom_subset
        same = same and all(np.array_equal(matching_to_matrix(m, n), X[b]) for b, m in enumerate(blossom))
        print(
            f"   {n:>3} | {fmt(ours)} | {fmt(full_time)} | {full_time / ours:6.0f}x | {fmt(blossom_time)} | "
            f"{blossom_time / ours:6.0f}x | {'yes' if same else 'NO'}"
        )


def main(argv=None):
    args = benchmark_arguments(__doc__, "smaller generic batches, fewer rounds", argv)
    generator = torch.Generator().manual_seed(0)
    rounds = 3 if args.quick else 5
    print(f"torch {torch.__version__}, {args.threads} thread(s), clock: {'wall' if args.wall else 'process CPU'}")
    relaxation_section(args.quick, rounds, generator)
    hungarian_section(args.quick, rounds, generator)


if __name__ == "__main__":
    main()
