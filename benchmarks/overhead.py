"""The fixed cost of the public calls around a solver: ``relax`` and ``sample`` against their floor.

    python benchmarks/overhead.py [--quick] [--threads T] [--wall]

For ``Simplex(10)`` with the entropy (the solver is one ``torch.softmax``) and ``KSubset(20, 5)``
with the binary entropy, forward + backward per call at batch 1, 8, 32 and 128:

* ``floor``: the solver alone (``torch.softmax``; for the k-subset, the registered solver
  called directly), with the same ``.sum().backward()``;
* ``relax`` and ``sample(mode="straight_through")`` with validation on (the default) and off
  (``validate_args=False``).

Ratios to the floor are measured in one process with the candidates interleaved, so they hold
on a busy machine although the absolute times do not.
"""

from __future__ import annotations

import torch
from _timing import benchmark_arguments, fmt, interleaved

import sstcvx
from sstcvx import registry
from sstcvx.families import families


def cases():
    """(name, polytope, regularizer, floor) for the two polytopes measured."""
    known = families()
    simplex = known["simplex"](10)
    ksubset = known["ksubset"](20, 5)
    solver = registry.find_relaxation(ksubset, "binary_entropy")
    yield "simplex(10) entropy", simplex, "entropy", lambda u: torch.softmax(u, -1)
    yield "ksubset(20,5) binary_entropy", ksubset, "binary_entropy", lambda u: solver(ksubset, u)


def main(argv=None) -> None:
    args = benchmark_arguments(__doc__, "fewer rounds", argv)
    rounds = 300 if args.quick else 2000
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); forward + backward per call")
    for name, P, regularizer, floor in cases():
        for batch in (1, 8, 32, 128):
            U = torch.randn(batch, *P.event_shape, requires_grad=True)

            def run(fn):
                return lambda: fn().sum().backward()

            candidates = {
                "floor": run(lambda: floor(U)),
                "relax": run(lambda: sstcvx.relax(P, U, 1.0, regularizer)),
                "relax, no validation": run(lambda: sstcvx.relax(P, U, 1.0, regularizer, validate_args=False)),
                "straight-through": run(lambda: sstcvx.sample(P, U, 1.0, regularizer, mode="straight_through")),
                "straight-through, no validation": run(
                    lambda: sstcvx.sample(P, U, 1.0, regularizer, mode="straight_through", validate_args=False)
                ),
            }
            times = interleaved(candidates, rounds)
            floor_time = times["floor"]
            cells = "  ".join(f"{key} {fmt(t)} ({t / floor_time:.2f}x)" for key, t in times.items() if key != "floor")
            print(f"{name:<30} batch {batch:>3}: floor {fmt(floor_time)}  {cells}")


if __name__ == "__main__":
    main()
