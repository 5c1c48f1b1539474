"""Benchmark: batched tree hard samplers (polytopes/_mst.py) against networkx.

    python benchmarks/hard_trees.py [--quick] [--batch 128] [--sizes 10 30 50]
                                    [--device cpu|cuda] [--threads 1]

For each n, one batch of random scores (float64, standard normal; symmetrised
for spanning trees) goes through

* ``maximum_spanning_tree`` vs ``networkx.maximum_spanning_tree``, and
* ``maximum_arborescence`` (root 0) vs
  ``networkx.algorithms.tree.branchings.maximum_spanning_arborescence``,

networkx looping over the batch elements.  The networkx time excludes building
the graphs (reported separately), so the ratio is the conservative one.  Our time
is the median of several calls after a warm-up (the minimum is printed too).  The
total weights of the trees must agree with networkx's on every element compared;
the script exits with status 1 if they do not.

``--quick`` runs networkx on the first 16 elements only and scales its time to the
full batch (marked ``~``); our solvers still run on the full batch.
Target: at least 10x faster than networkx at batch 128 for n = 10, 30, 50.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import networkx as nx
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from polytopes._mst import maximum_arborescence, maximum_spanning_tree


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_ours(fn, x, reps):
    fn(x)  # warm-up
    _sync(x.device)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        y = fn(x)
        _sync(x.device)
        ts.append(time.perf_counter() - t0)
    return y, statistics.median(ts), min(ts)


def nx_graphs(A, directed):
    n = A.shape[-1]
    graphs = []
    for a in A.tolist():
        G = nx.DiGraph() if directed else nx.Graph()
        G.add_nodes_from(range(n))
        if directed:
            G.add_weighted_edges_from((h, d, a[h][d]) for h in range(n) for d in range(1, n) if h != d)
        else:
            G.add_weighted_edges_from((i, j, a[i][j]) for i in range(n) for j in range(i + 1, n))
        graphs.append(G)
    return graphs


def nx_weights(trees):
    return [sum(w for _, _, w in T.edges(data="weight")) for T in trees]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="networkx on 16 elements, scaled")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10, 30, 50])
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch.set_num_threads (default 1: networkx is single-threaded, and on a "
        "small shared machine intra-op threads mostly contend on these small ops)",
    )
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    B = args.batch
    n_nx = min(B, 16) if args.quick else B
    reps = 5 if args.quick else 15

    print(
        f"hard tree samplers vs networkx {nx.__version__}: batch {B}, float64, "
        f"device {device}, torch {torch.__version__} with {torch.get_num_threads()} threads"
    )
    if hasattr(os, "getloadavg"):
        print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (timings scale with it)")
    print(f"networkx on {n_nx} of {B} elements" + (" (time scaled to the batch, marked ~)" if n_nx < B else ""))
    hdr = (
        f"{'sampler':<14}{'n':>4}  {'ours median (min) ms':>22}  {'networkx ms':>13}"
        f"  {'+build ms':>10}  {'speedup':>8}  weights agree"
    )
    print(hdr)
    print("-" * len(hdr))

    g = torch.Generator().manual_seed(args.seed)
    ok = True
    for n in args.sizes:
        S = torch.randn(B, n, n, generator=g, dtype=torch.float64)
        W = S + S.transpose(1, 2)
        for name, fn, A, directed, nx_fn in (
            ("spanning tree", maximum_spanning_tree, W, False, nx.maximum_spanning_tree),
            (
                "arborescence",
                maximum_arborescence,
                S,
                True,
                nx.algorithms.tree.branchings.maximum_spanning_arborescence,
            ),
        ):
            X, t_med, t_min = time_ours(fn, A.to(device), reps)
            X = X.cpu()

            t0 = time.perf_counter()
            graphs = nx_graphs(A[:n_nx], directed)
            t_build = time.perf_counter() - t0
            t0 = time.perf_counter()
            trees = [nx_fn(G) for G in graphs]
            t_nx = time.perf_counter() - t0
            scale = B / n_nx
            t_nx, t_build = t_nx * scale, t_build * scale

            ours = (X[:n_nx] * A[:n_nx]).sum((1, 2))
            if not directed:
                ours = ours / 2
            theirs = torch.tensor(nx_weights(trees), dtype=torch.float64)
            err = float((ours - theirs).abs().max())
            agree = err <= 1e-9 * max(1.0, float(theirs.abs().max()))
            ok &= agree
            mark = "~" if n_nx < B else " "
            print(
                f"{name:<14}{n:>4}  {t_med * 1e3:>12.2f} ({t_min * 1e3:7.2f})  "
                f"{mark}{t_nx * 1e3:>12.1f}  {mark}{t_build * 1e3:>9.1f}  "
                f"{t_nx / t_med:>7.0f}x  {'yes' if agree else 'NO'} (max diff {err:.1e})"
            )
    print("target: >= 10x; speedup = networkx time (without building graphs) / our median")
    if not ok:
        print("ERROR: total weights differ from networkx", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
