"""Benchmark of family recognition: time per call before and after, and the cost at declaration time.

    python benchmarks/recognition.py [--quick] [--threads T] [--wall]

Prints, in one run:

1. Time per call (forward + backward of a loss <G, X>, batch 32, float64) of two declarations,
   each declared twice: with ``recognize=False`` (the declared generic path, cvxpylayers) and
   with recognition (the family's solver through the coordinate map), timed interleaved in one
   process, with the ratio:
   * the README's first example, ``x = cp.Variable(8); [x >= 0, x <= 1, cp.sum(x) == 3]``
     with ``binary_entropy`` (recognized as ``KSubset(8, 3)``);
   * ``examples/custom_polytope.py``'s declaration, ``X = cp.Variable((3, 4)); [X >= 0,
     cp.sum(X, axis=1) == 1]`` with ``entropy`` (recognized as ``ProductSimplex(3, 4)``).
   The hard sample (argmax) at batch 32 is timed the same way.
2. The cost of recognition at declaration time for n = 10, 100 and 1,000 coordinates: the
   declaration without recognition (``from_cvxpy(..., recognize=False)``: validation LPs), the
   canonical linear form (one CVXPY canonicalization, cached and shared with the fast generic
   path), and the recognizers plus the certificate (``sstcvx.recognition.recognize`` with the
   form cached), for a simplex, a k-subset (k = n / 5), a hypercube, a product of simplices
   (groups of 5), a Birkhoff polytope declared flattened (s x s with s^2 close to n: 9, 100,
   1,024) and a near miss (the k-subset with one extra row: no family matches).

Timing: the process's CPU time by default (``--wall`` for wall-clock), medians over rounds,
``--threads`` torch threads (default 1).  On a shared machine the absolute figures are noisy;
the ratios of part 1, measured interleaved, are the figures to quote.
"""

from __future__ import annotations

import math
import os
import sys
import warnings

# One BLAS thread, like torch's (--threads): on a shared, loaded machine OpenBLAS's default
# threads spin against the other processes and multiply numpy's linear-algebra times.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import cvxpy as cp
import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from _timing import benchmark_arguments, clock, fmt, interleaved

import sstcvx
from sstcvx.families import families as registered_families
from sstcvx.recognition import recognize


def readme_example(recognize_it: bool):
    x = cp.Variable(8)
    return sstcvx.Polytope.from_cvxpy(x, [x >= 0, x <= 1, cp.sum(x) == 3], recognize=recognize_it)


def custom_polytope_example(recognize_it: bool):
    X = cp.Variable((3, 4))
    return sstcvx.Polytope.from_cvxpy(X, [X >= 0, cp.sum(X, axis=1) == 1], recognize=recognize_it)


def per_call(make, regularizer: str, batch: int, rounds: int):
    before, after = make(False), make(True)
    assert before.recognized is None and after.recognized is not None
    shape = (batch,) + tuple(after.event_shape)
    U = torch.randn(shape, dtype=torch.float64)
    G = torch.randn(shape, dtype=torch.float64)

    def train_step(P):
        def run():
            u = U.clone().requires_grad_(True)
            X = sstcvx.relax(P, u, 1.0, regularizer)
            (X * G).sum().backward()
            return X

        return run

    difference = float((train_step(before)() - train_step(after)()).abs().max())
    relaxed = interleaved({"before": train_step(before), "after": train_step(after)}, rounds)
    hard = interleaved({"before": lambda: sstcvx.argmax(before, U), "after": lambda: sstcvx.argmax(after, U)}, rounds)
    agree = bool(torch.equal(sstcvx.argmax(before, U), sstcvx.argmax(after, U)))
    return after.recognized.polytope.name, relaxed, hard, difference, agree


def declarations(n: int):
    """(name, builder) pairs of declarations of about n coordinates."""
    s = max(3, round(math.sqrt(n)))

    def simplex():
        x = cp.Variable(n)
        return x, [x >= 0, cp.sum(x) == 1]

    def ksubset():
        x = cp.Variable(n)
        return x, [x >= 0, x <= 1, cp.sum(x) == n // 5]

    def hypercube():
        x = cp.Variable(n)
        return x, [x >= 0, x <= 1]

    def product_simplex():
        X = cp.Variable((n // 5, 5))
        return X, [X >= 0, cp.sum(X, axis=1) == 1]

    def birkhoff_flattened():
        y = cp.Variable(s * s)
        X = cp.reshape(y, (s, s), order="C")
        return y, [y >= 0, cp.sum(X, axis=0) == 1, cp.sum(X, axis=1) == 1]

    def near_miss():
        x = cp.Variable(n)
        return x, [x >= 0, x <= 1, cp.sum(x) == n // 5, x[0] + x[1] <= 1]

    return [
        ("simplex", simplex),
        ("ksubset", ksubset),
        ("hypercube", hypercube),
        ("product_simplex", product_simplex),
        (f"birkhoff {s}x{s} flat", birkhoff_flattened),
        ("near miss (ksubset+row)", near_miss),
    ]


def declaration_cost(build, rounds: int):
    """Median seconds of: declaring without recognition, the linear form, recognition (form cached)."""
    samples = []
    for _ in range(rounds):
        x, constraints = build()
        start = clock()
        P = sstcvx.Polytope.from_cvxpy(x, constraints, recognize=False)
        declared = clock()
        P.linear_form()
        formed = clock()
        match = recognize(P)
        done = clock()
        samples.append((declared - start, formed - declared, done - formed))
    return [float(np.median([s[i] for s in samples])) for i in range(3)], match


def main():
    args = benchmark_arguments(__doc__, "fewer rounds (about a minute)")
    warnings.simplefilter("ignore", UserWarning)
    rounds = 3 if args.quick else 7
    torch.manual_seed(0)
    families = registered_families()  # load the families once, outside the timings
    print(
        f"families: {', '.join(families)}; torch threads {torch.get_num_threads()}; "
        f"{'wall-clock' if args.wall else 'process CPU'} time, medians of {rounds} interleaved rounds\n"
    )

    print("1. time per call, batch 32, float64: declared generic path (recognize=False) vs recognized")
    header = f"{'declaration':44s} {'recognized as':34s} {'regularizer':15s} {'before':>11s} {'after':>11s} {'ratio':>9s}  max|dX|"
    print(header)
    print("-" * len(header))
    for label, make, reg in (
        ("README: x(8), 0<=x<=1, sum x == 3", readme_example, "binary_entropy"),
        ("custom_polytope: X(3,4) >= 0, row sums 1", custom_polytope_example, "entropy"),
    ):
        name, relaxed, hard, difference, agree = per_call(make, reg, 32, rounds)
        print(
            f"{label:44s} {name:34s} {reg + ' f+b':15s} {fmt(relaxed['before'])} {fmt(relaxed['after'])} "
            f"{relaxed['before'] / relaxed['after']:8.0f}x  {difference:.1e}"
        )
        print(
            f"{'':44s} {'':34s} {'argmax':15s} {fmt(hard['before'])} {fmt(hard['after'])} "
            f"{hard['before'] / hard['after']:8.0f}x  {'same' if agree else 'DIFFERENT'}"
        )

    print("\n2. declaration-time cost (median of rounds): declare without recognition, linear form, recognition")
    header = f"{'declaration':26s} {'n':>6s} {'declare':>11s} {'form':>11s} {'recognize':>11s}  result"
    print(header)
    print("-" * len(header))
    for n in (10, 100, 1000):
        for label, build in declarations(n):
            (declare, form, rec), match = declaration_cost(build, max(1, rounds // 2))
            size = int(np.prod(build()[0].shape))
            print(
                f"{label:26s} {size:6d} {fmt(declare)} {fmt(form)} {fmt(rec)}  "
                f"{match.polytope.name if match else 'no match'}"
            )


if __name__ == "__main__":
    main()
