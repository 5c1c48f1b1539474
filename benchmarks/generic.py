"""The generic (CVXPY/cvxpylayers) path: build time and per-instance forward and forward+backward time.

    python benchmarks/generic.py [--quick] [--repeats R]

Prints, for a few user-declared polytopes and batch sizes 1, 32 and 256, the
one-off build time of the layer and the median per-instance time over R
repetitions (after one warm-up call).
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import cvxpy as cp
import torch

import sstcvx
from sstcvx.generic import generic_relaxation


def declarations():
    x = cp.Variable(10)
    yield sstcvx.Polytope.from_cvxpy(x, [x >= 0, cp.sum(x) == 1], name="simplex(10)"), "entropy"
    x = cp.Variable(10)
    yield sstcvx.Polytope.from_cvxpy(x, [x >= 0, cp.sum(x) == 1], name="simplex(10)"), "euclidean"
    x = cp.Variable(20)
    yield sstcvx.Polytope.from_cvxpy(x, [x >= 0, x <= 1, cp.sum(x) == 5], name="5-subsets(20)"), "binary_entropy"
    M = cp.Variable((5, 5))
    birkhoff = [M >= 0, cp.sum(M, axis=0) == 1, cp.sum(M, axis=1) == 1]
    yield sstcvx.Polytope.from_cvxpy(M, birkhoff, name="birkhoff(5)"), "entropy"


def timed(fn, repeats):
    fn()  # warm-up
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="batch sizes 1 and 32 only, one repetition")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions per configuration (default 3)")
    args = parser.parse_args(argv)
    batches = (1, 32) if args.quick else (1, 32, 256)
    repeats = 1 if args.quick else args.repeats
    warnings.simplefilter("ignore", DeprecationWarning)
    torch.manual_seed(0)
    print(f"generic path, {torch.get_num_threads()} torch threads; times are per instance (median of {repeats})")
    print(f"{'polytope':<16}{'regularizer':<16}{'build ms':>10}{'batch':>7}{'forward ms':>12}{'fwd+bwd ms':>12}")
    for P, reg in declarations():
        start = time.perf_counter()
        generic_relaxation(P, sstcvx.regularizers.get_regularizer(reg))
        build = time.perf_counter() - start
        for batch in batches:
            U = torch.randn((batch,) + tuple(P.event_shape), dtype=torch.float64)

            def forward():
                with torch.no_grad():
                    sstcvx.relax(P, U, 1.0, reg, solver="generic")

            def forward_backward():
                u = U.clone().requires_grad_()
                (sstcvx.relax(P, u, 1.0, reg, solver="generic") * U).sum().backward()

            f = timed(forward, repeats) / batch * 1e3
            fb = timed(forward_backward, repeats) / batch * 1e3
            print(f"{P.name:<16}{reg:<16}{build * 1e3:>10.1f}{batch:>7}{f:>12.2f}{fb:>12.2f}")


if __name__ == "__main__":
    main()
