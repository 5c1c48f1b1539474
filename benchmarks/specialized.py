"""One table of the specialized solvers' per-call time against their peer or floor.

    python benchmarks/specialized.py [--quick] [--threads T] [--wall] [--only vector|permutation]

For every specialized relaxation of Simplex, Hypercube, KSubset and Permutation, the time of
one call of ``sstcvx.relax(P, U, 1.0, regularizer, solver="specialized")``, forward and
backward (the loss <G, X>), at batch 1, 8 and 128, float64, U standard normal (plus Gumbel
noise for permutations); and, where one exists, the same for the comparable peer or floor,
with the ratio ours / peer (below 1: ours is faster):

* softmax / sigmoid / clamp relaxations: the bare torch op and its backward (the floor);
* sparsemax and the capped simplex: ``entmax.sparsemax`` and ``entmax.budget_bisect``
  (optional: skipped when entmax is not installed);
* the k-subset Gibbs marginals: a vectorised numpy log-space DP (forward/backward messages
  over (item, count), the marginals in the forward) whose backward is a central difference
  of the marginals along G (two more marginal evaluations, one call on 2B rows);
* the hard permutation sample: the batched auction on the CPU against the SciPy loop
  (forward only; the registered argmax uses SciPy on the CPU, the auction on CUDA);
* Sinkhorn and the Birkhoff projection: no peer; the row softmax of the same (B, n, n)
  utilities with its backward is printed as a floor, to read the per-call times on a shared
  machine as ratios.

Also printed: the Sinkhorn / Birkhoff Newton step counts at each size (the batch's, i.e. its slowest element's).  Ratios are measured
in one process with the candidates interleaved round by round (benchmarks/_timing.py; a row
of cheap calls gets more rounds, so that each row is timed for at least 0.01 s per round asked), by
process CPU time on one thread unless ``--wall``/``--threads`` say otherwise: on a shared
machine the absolute times are noisy, the ratios much less.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from _timing import benchmark_arguments, fmt, interleaved

import sstcvx
from polytopes import Hypercube, KSubset, Permutation, Simplex
from polytopes import birkhoff as birkhoff_module
from polytopes import sinkhorn as sinkhorn_module
from polytopes.permutation import auction_assignment, hungarian

try:
    import entmax
except ImportError:  # an optional peer
    entmax = None

BATCHES = (1, 8, 128)


def numpy_marginals(z: np.ndarray, k: int) -> np.ndarray:
    """Gibbs marginals of the k-subsets for z (R, n): log-space forward/backward messages, vectorised over rows."""
    R, n = z.shape
    forward = np.full((n + 1, R, k + 1), -np.inf)
    forward[0, :, 0] = 0.0
    backward = np.full((n + 1, R, k + 1), -np.inf)
    backward[n, :, 0] = 0.0
    for j in range(n):
        forward[j + 1] = forward[j]
        forward[j + 1, :, 1:] = np.logaddexp(forward[j, :, 1:], forward[j, :, :-1] + z[:, j : j + 1])
        i = n - 1 - j
        backward[i] = backward[i + 1]
        backward[i, :, 1:] = np.logaddexp(backward[i + 1, :, 1:], backward[i + 1, :, :-1] + z[:, i : i + 1])
    # item i is in the subset with weight exp(z_i) e_{k-1}(others), e_{k-1}(others) = sum_c e_c(before) e_{k-1-c}(after)
    pair = forward[:n, :, :k] + backward[1:, :, k - 1 :: -1]
    top = pair.max(-1, keepdims=True)
    others = top[..., 0] + np.log(np.exp(pair - top).sum(-1))
    return np.exp(z + others.T - forward[n, :, k][:, None])


def numpy_dp_forward_backward(z: np.ndarray, g: np.ndarray, k: int, h: float = 1e-5):
    """The peer's training step: the marginals, then their VJP by a central difference along g."""
    x = numpy_marginals(z, k)
    both = numpy_marginals(np.concatenate([z + h * g, z - h * g]), k)
    return x, (both[: len(z)] - both[len(z) :]) / (2 * h)


def forward_backward(fn, U, G):
    def run():
        Ug = U.clone().requires_grad_(True)
        (fn(Ug) * G).sum().backward()

    return run


def relax_fn(P, regularizer):
    return lambda U: sstcvx.relax(P, U, 1.0, regularizer, solver="specialized")


def gumbel(batch, n, generator):
    uniform = torch.rand(batch, n, n, dtype=torch.float64, generator=generator).clamp_min(1e-300)
    return torch.randn(batch, n, n, dtype=torch.float64, generator=generator) - torch.log(-torch.log(uniform))


def row(name, batch, ours, peer_name=None, peer=None, note=""):
    ratio = f"{ours / peer:7.2f}x" if peer is not None else "      —"
    peer_text = fmt(peer) if peer is not None else "          —"
    print(f"{name:<44} {batch:>5} | {fmt(ours)} | {peer_name or '—':<22} {peer_text} | {ratio} {note}")


def vector_section(rounds, generator):
    cases = [
        (Simplex(10), "entropy", "torch.softmax", lambda U: torch.softmax(U, -1)),
        (Simplex(10), "exp_family_entropy", "torch.softmax", lambda U: torch.softmax(U, -1)),
        (Simplex(10), "euclidean", "entmax.sparsemax", entmax and (lambda U: entmax.sparsemax(U, -1))),
        (Simplex(100), "euclidean", "entmax.sparsemax", entmax and (lambda U: entmax.sparsemax(U, -1))),
        (Simplex(1000), "euclidean", "entmax.sparsemax", entmax and (lambda U: entmax.sparsemax(U, -1))),
        (Hypercube(10), "binary_entropy", "torch.sigmoid", torch.sigmoid),
        (Hypercube(10), "exp_family_entropy", "torch.sigmoid", torch.sigmoid),
        (Hypercube(10), "euclidean", "torch.clamp", lambda U: U.clamp(0.0, 1.0)),
        (KSubset(10, 3), "binary_entropy", None, None),
        (KSubset(10, 3), "euclidean", "entmax.budget_bisect", entmax and (lambda U: entmax.budget_bisect(U, 3))),
        (KSubset(100, 10), "euclidean", "entmax.budget_bisect", entmax and (lambda U: entmax.budget_bisect(U, 10))),
        (KSubset(1000, 100), "euclidean", "entmax.budget_bisect", entmax and (lambda U: entmax.budget_bisect(U, 100))),
        (KSubset(10, 3), "exp_family_entropy", "numpy DP + central diff.", "numpy"),
        (KSubset(45, 9), "exp_family_entropy", "numpy DP + central diff.", "numpy"),
        (KSubset(100, 10), "exp_family_entropy", "numpy DP + central diff.", "numpy"),
        (KSubset(435, 29), "exp_family_entropy", "numpy DP + central diff.", "numpy"),
    ]
    for P, regularizer, peer_name, peer in cases:
        for batch in BATCHES:
            if P.n >= 100 and batch < 128:
                continue  # the large sizes are compared at batch 128 only
            U = torch.randn(batch, P.n, dtype=torch.float64, generator=generator)
            G = torch.randn(batch, P.n, dtype=torch.float64, generator=generator)
            fns = {"ours": forward_backward(relax_fn(P, regularizer), U, G)}
            if peer == "numpy":
                u, g = U.numpy(), G.numpy()
                fns["peer"] = lambda u=u, g=g, k=P.k: numpy_dp_forward_backward(u, g, k)
            elif peer is not None:
                fns["peer"] = forward_backward(peer, U, G)
            times = interleaved(fns, rounds if P.n < 400 else max(3, rounds // 4), min_seconds=rounds * 0.01)
            label = f"{P.name} {regularizer}"
            if peer is None and peer_name is not None:
                peer_name = f"{peer_name} (not installed)"
            row(label, batch, times["ours"], peer_name, times.get("peer"))


def permutation_section(rounds, generator):
    for n in (4, 10, 50):
        P = Permutation(n)
        for regularizer, module, forward in (
            ("entropy", sinkhorn_module, sinkhorn_module._sinkhorn_forward),
            ("euclidean", birkhoff_module, birkhoff_module._birkhoff_forward),
        ):
            for batch in BATCHES:
                U = gumbel(batch, n, generator)
                G = torch.randn(batch, n, n, dtype=torch.float64, generator=generator)
                fns = {
                    "ours": forward_backward(relax_fn(P, regularizer), U, G),
                    "peer": forward_backward(lambda U: torch.softmax(U, -1), U, G),
                }
                times = interleaved(fns, rounds if n < 50 else 3, min_seconds=rounds * 0.01 if n < 50 else 0.0)
                steps = _newton_steps(module, forward, U)
                row(
                    f"{P.name} {regularizer}",
                    batch,
                    times["ours"],
                    "torch.softmax (rows)",
                    times["peer"],
                    note=f"Newton steps: {steps}",
                )
    print()
    print("hard permutation sample (forward only), batch 128: the batched auction (CPU) against the SciPy loop")
    for n in (10, 50):
        U = gumbel(128, n, generator)
        assert torch.equal(auction_assignment(U), hungarian(U))
        times = interleaved({"ours": lambda: auction_assignment(U), "peer": lambda: hungarian(U)}, 3)
        row(f"Permutation(n={n}) auction_assignment", 128, times["ours"], "SciPy loop (hungarian)", times["peer"])


def _newton_steps(module, forward, U):
    """Newton steps the forward takes on U, counted by wrapping the module's stage solvers (each maps its
    result to the steps it took: the batch's slowest element's)."""
    if module is sinkhorn_module:
        steps_of = {
            "_narrow_newton": lambda result: result[1] if result[0] is not None else 0,
            "_newton": lambda result: result[1],
            "_compiled_solve": lambda result: result[3],  # the CPU kernel
        }
    else:
        steps_of = {
            "_birkhoff_stage": lambda result: result[3],
            "_birkhoff_newton": lambda result: result[2],
            "_compiled_solve": lambda result: result[4],  # the CPU kernel
        }
    originals = {name: getattr(module, name) for name in steps_of}
    counted = []

    def counting(name):
        def solver(*args, **kwargs):
            result = originals[name](*args, **kwargs)
            counted.append(steps_of[name](result))
            return result

        return solver

    for name in steps_of:
        setattr(module, name, counting(name))
    try:
        forward(U, 1e-12, 500)
    finally:
        for name, fn in originals.items():
            setattr(module, name, fn)
    return sum(counted)


def main(argv=None):
    def options(parser):
        parser.add_argument(
            "--only",
            choices=("vector", "permutation"),
            help="one section: vector (simplex, hypercube, k-subset) or permutation",
        )

    args = benchmark_arguments(__doc__, "fewer rounds", argv, options)
    only = args.only
    generator = torch.Generator().manual_seed(0)
    rounds = 5 if args.quick else 15
    print(
        f"torch {torch.__version__}, {args.threads} thread(s), clock: {'wall' if args.wall else 'process CPU'}, "
        f"entmax {'installed' if entmax is not None else 'not installed (its columns skipped)'}"
    )
    print("per call, forward + backward, float64, tau = 1; ratio = ours / peer (below 1: ours is faster)")
    print(
        f"{'polytope and regularizer':<44} {'batch':>5} | {'ours':>11} | {'peer or floor':<22} {'':>11} | {'ratio':>8}"
    )
    if only in (None, "vector"):
        vector_section(rounds, generator)
    if only in (None, "permutation"):
        permutation_section(rounds, generator)


if __name__ == "__main__":
    main()
