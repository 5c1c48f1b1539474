"""Timing, shared by the harness (compare, bench) and the scripts in ``benchmarks/``.

The benchmark scripts time by process CPU time by default: on a shared machine wall-clock
time mostly measures other processes.  ``use_wall_clock()`` switches to wall time.  The
garbage collector is paused while timing, as ``timeit`` does.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
import warnings

_clock = time.process_time


def use_wall_clock(wall: bool = True) -> None:
    """Time with ``time.perf_counter`` (wall) instead of process CPU time."""
    global _clock
    _clock = time.perf_counter if wall else time.process_time


def clock() -> float:
    """The current reading of the chosen clock, in seconds."""
    return _clock()


def median_time(fn, rounds: int, warmup: int = 1) -> float:
    """Median seconds per call of ``fn`` over ``rounds`` calls, after ``warmup`` calls.

    The garbage collector is run first and paused while timing (as ``timeit`` does): the
    generic path leaves many CVXPY objects behind, whose collection would otherwise land
    in whichever call happens to trigger it.
    """
    for _ in range(warmup):
        fn()
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        samples = []
        for _ in range(rounds):
            start = _clock()
            fn()
            samples.append(_clock() - start)
    finally:
        if was_enabled:
            gc.enable()
    return statistics.median(samples)


def interleaved(fns: dict, rounds: int, warmup: int = 2, min_seconds: float = 0.0) -> dict:
    """Median seconds per call of each function in ``fns``, timed in interleaved rounds.

    One call of each per round, the order rotating, so that a slow spell of the shared
    machine hits every candidate alike; the garbage collector is paused as in
    ``median_time``.  ``min_seconds``: run more than ``rounds`` rounds where fewer would
    take less time than this (as estimated from the last warmup round, at most 100 times
    as many), so that the median of cheap calls is not a handful of cold ones.
    """
    names = list(fns)
    for _ in range(warmup):
        start = _clock()
        for name in names:
            fns[name]()
        elapsed = _clock() - start
    if min_seconds > 0.0 and warmup:
        rounds = max(rounds, min(100 * rounds, int(min_seconds / max(elapsed, 1e-9))))
    times: dict[str, list[float]] = {name: [] for name in names}
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                start = _clock()
                fns[name]()
                times[name].append(_clock() - start)
    finally:
        if was_enabled:
            gc.enable()
    return {name: statistics.median(t) for name, t in times.items()}


def benchmark_arguments(doc: str, quick_help: str, argv=None, add_options=None) -> argparse.Namespace:
    """Parse ``--quick``, ``--threads T`` (>= 1, default 1) and ``--wall``, and apply the last two.

    ``doc``: the script's docstring (its first paragraph is the description).  Sets
    torch's intra-op threads and the clock (:func:`use_wall_clock`).  ``add_options``: an
    optional function of the parser that adds the script's own options.
    """
    import torch

    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--wall", action="store_true", help="wall-clock time instead of process CPU time")
    if add_options is not None:
        add_options(parser)
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error("--threads: expected an int >= 1")
    torch.set_num_threads(args.threads)
    use_wall_clock(args.wall)
    return args


def adaptive_median(fn, repeats: int, min_time: float = 0.05, max_samples: int = 50):
    """Median seconds of ``fn()`` (warnings silenced, wall clock); None if ``repeats == 0``.

    Runs ``fn`` ``repeats`` times, and keeps going while the samples add up to less than
    ``min_time`` seconds (at most ``max_samples``), so that fast solvers get a median
    robust to a busy machine while the slow generic path costs only ``repeats`` calls.
    """
    if repeats <= 0:
        return None
    samples: list[float] = []
    total = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        while len(samples) < repeats or (total < min_time and len(samples) < max_samples):
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
            total += samples[-1]
    return statistics.median(samples)


def synchronized_median(fn, device, rounds: int = 5) -> float:
    """Median wall seconds per call of ``fn`` on a torch ``device``, synchronized, after one warm-up."""
    import torch

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()
    sync()
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        sync()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def fmt(seconds: float) -> str:
    """A duration in s, ms or us, right-aligned in 11 characters."""
    if seconds >= 1.0:
        return f"{seconds:8.2f} s "
    if seconds >= 1e-3:
        return f"{seconds * 1e3:8.2f} ms"
    return f"{seconds * 1e6:8.1f} us"
