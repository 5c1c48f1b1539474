"""The benchmark scripts' timing helpers: those of :mod:`sstcvx.harness.timing`."""

from sstcvx.harness.timing import (  # noqa: F401  (re-exported for the scripts)
    adaptive_median,
    benchmark_arguments,
    clock,
    fmt,
    interleaved,
    median_time,
    synchronized_median,
    use_wall_clock,
)
