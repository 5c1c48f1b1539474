"""Benchmark of the k-subset solvers (and the simplex and hypercube ones) against the obvious alternatives.

    python benchmarks/ksubset.py [--quick] [--threads T] [--wall]

Prints, in one run:

1. The k-subset exponential-family-entropy dynamic program at batch 128, n = 45, k = 9 and
   n = 435, k = 29, float64:
   * ``ours``: the marginals X = grad log e_k(exp Z) by ``polytopes.ksubset.k_subset_marginals``
     (prefix sums over the items per degree, tangent backward);
   * ``numpy-fd``: a numpy log-space DP over the items (vectorised over the batch and
     over the perturbed copies), differentiated by central finite differences
     (2n + 1 DP evaluations);
   with the ratio numpy-fd / ours (target >= 10) and the largest absolute difference of
   the marginals (the finite differences' own error is about 1e-9).  Also shown:
   ``ours train``, the full training step of the relaxation (marginals forward, then the
   backward of a loss <G, X> through them, i.e. a Hessian-vector product of log e_k).
   With ``--quick`` the finite differences at n = 435 are taken for 24 coordinates only
   and their time is scaled to all n (said in the output).
2. Specialized vs generic (the cvxpylayers backend) at a few sizes and batch 1, 32 and 256,
   for every specialized relaxation of ``KSubset``, ``Simplex`` and ``Hypercube``, through
   ``sstcvx.compare`` (``sstcvx.harness.bench.speedup_report``): its table gives the
   per-instance speedups and the agreement.  The generic batch is capped (8 with
   ``--quick``, 32 otherwise); the table marks it.  Then the k-subset dynamic program against
   plain enumeration of the vertex list (one softmax).

Timing: the process's CPU time (``time.process_time``) by default, because on a shared
machine wall-clock time mostly measures the other processes; ``--wall`` uses
``time.perf_counter``.  ``--threads`` sets torch's intra-op threads (default 1).  The
median over rounds is reported, after a warm-up call (the specialized path, which takes
microseconds and is the noisier, gets five times as many rounds as the generic one).
"""

from __future__ import annotations

import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from _timing import benchmark_arguments, clock, fmt, median_time

import sstcvx
from polytopes import Hypercube, KSubset, Simplex
from polytopes.ksubset import k_subset_marginals
from sstcvx.enumeration import vertex_marginals as enumerated_marginals
from sstcvx.harness.bench import speedup_report

# ------------------------------------------------------------------------------------------------
# 1. the dynamic program against numpy with finite differences
# ------------------------------------------------------------------------------------------------


def numpy_log_esp(z: np.ndarray, k: int) -> np.ndarray:
    """log e_k(exp z) for z (R, n): the sequential log-space DP, L[c] <- logaddexp(L[c], L[c-1] + z_j)."""
    L = np.full((z.shape[0], k + 1), -np.inf)
    L[:, 0] = 0.0
    for j in range(z.shape[1]):
        L[:, 1:] = np.logaddexp(L[:, 1:], L[:, :-1] + z[:, j : j + 1])
    return L[:, k]


def numpy_fd_marginals(z: np.ndarray, k: int, coordinates, h: float = 1e-5, chunk: int = 16) -> np.ndarray:
    """Central differences (log e_k(z + h e_i) - log e_k(z - h e_i)) / 2h for the given coordinates i."""
    B, n = z.shape
    out = np.empty((B, len(coordinates)))
    coordinates = np.asarray(coordinates)
    for start in range(0, len(coordinates), chunk):
        idx = coordinates[start : start + chunk]
        m = len(idx)
        shifted = np.repeat(z[None], 2 * m, axis=0)  # (2m, B, n): +h copies, then -h copies
        shifted[np.arange(m), :, idx] += h
        shifted[m + np.arange(m), :, idx] -= h
        values = numpy_log_esp(shifted.reshape(-1, n), k).reshape(2 * m, B)
        out[:, start : start + m] = ((values[:m] - values[m:]) / (2 * h)).T
    numpy_log_esp(z, k)  # the forward value itself, as a training step would need it
    return out


def dp_section(quick: bool, rounds: int):
    print("1. k-subset exp_family_entropy: prefix-sum DP marginals vs numpy DP + central finite differences")
    print("   batch 128, float64; ours = the marginals by prefix sums over the items")
    header = f"   {'n':>4} {'k':>3} | {'ours':>11} | {'numpy-fd':>11} | {'ratio':>7} | {'max |diff|':>10} | {'ours train':>11}"
    print(header)
    generator = np.random.default_rng(0)
    for n, k in ((45, 9), (435, 29)):
        P = KSubset(n, k)
        z = generator.standard_normal((128, n))
        Z = torch.from_numpy(z)
        ours = median_time(lambda: k_subset_marginals(Z, P.k), rounds)
        G = torch.randn(128, n, dtype=torch.float64)

        def train():
            Zg = Z.clone().requires_grad_(True)
            (k_subset_marginals(Zg, P.k) * G).sum().backward()

        ours_train = median_time(train, rounds)
        coordinates = range(n) if not (quick and n > 100) else range(0, n, n // 24)[:24]
        coordinates = list(coordinates)
        start = clock()
        reference = numpy_fd_marginals(z, k, coordinates)
        numpy_time = (clock() - start) * n / len(coordinates)
        diff = np.abs(k_subset_marginals(Z, P.k).numpy()[:, coordinates] - reference).max()
        note = "" if len(coordinates) == n else f"  (numpy-fd timed on {len(coordinates)} of {n} coordinates, scaled)"
        print(
            f"   {n:>4} {k:>3} | {fmt(ours)} | {fmt(numpy_time)} | {numpy_time / ours:6.0f}x | {diff:10.2e} | {fmt(ours_train)}{note}"
        )


# ------------------------------------------------------------------------------------------------
# 2. specialized vs generic
# ------------------------------------------------------------------------------------------------


def forward_backward(P, U, G, regularizer, solver):
    def run():
        Ug = U.clone().requires_grad_(True)
        (sstcvx.relax(P, Ug, 0.5, regularizer, solver=solver) * G).sum().backward()

    return run


def enumeration_forward_backward(P, U, G):
    """Gibbs marginals by enumeration of P.vertices (one softmax), forward + backward, tau = 0.5."""

    def run():
        Ug = U.clone().requires_grad_(True)
        (enumerated_marginals(P, Ug / 0.5) * G).sum().backward()

    return run


def generic_section(quick: bool, rounds: int):
    cap = 8 if quick else 32
    sizes = (10, 30) if quick else (10, 30, 100)
    print()
    print("2. specialized vs generic (cvxpylayers), through sstcvx.compare, tau = 0.5, float64")
    cases = []
    for n in sizes:
        cases += [(KSubset(n, n // 3), r) for r in ("binary_entropy", "euclidean")]
        if KSubset(n, n // 3).vertices is not None:  # the generic exp_family_entropy needs the vertices
            cases.append((KSubset(n, n // 3), "exp_family_entropy"))
        cases += [(Simplex(n), r) for r in ("entropy", "euclidean")]
        cases += [(Hypercube(n), r) for r in ("binary_entropy", "euclidean")]
    print(speedup_report(cases, max_generic_batch=cap, repeats=rounds).table())
    print()
    print("   exp_family_entropy: the dynamic program against enumeration of the vertex list, per instance")
    for n in sizes:
        P = KSubset(n, n // 3)
        if P.vertices is None:
            continue
        for batch in (1, 32, 256):
            U = torch.randn(batch, P.n, dtype=torch.float64)
            G = torch.randn(batch, P.n, dtype=torch.float64)
            fast = median_time(forward_backward(P, U, G, "exp_family_entropy", "specialized"), 5 * rounds) / batch
            enum = median_time(enumeration_forward_backward(P, U, G), 5 * rounds) / batch
            print(f"   {P.name:<22} batch {batch:>4}: DP {fmt(fast)}  enumeration {fmt(enum)} ({enum / fast:.2g}x)")


def main(argv=None):
    args = benchmark_arguments(__doc__, "smaller sizes, fewer rounds, sampled finite differences", argv)
    torch.manual_seed(0)
    rounds = 3 if args.quick else 5
    print(f"torch {torch.__version__}, {args.threads} thread(s), clock: {'wall' if args.wall else 'process CPU'}")
    dp_section(args.quick, rounds)
    generic_section(args.quick, rounds)


if __name__ == "__main__":
    main()
