"""When the solvers take their CPU kernels compiled by numba.

Eager torch dispatches every operation on its own, a few microseconds each, so an algorithm made of
many small dependent steps (a dynamic program over the items, dozens of sweeps over a 10 x 10 matrix)
spends its time in dispatch at small batch sizes, whatever the arithmetic costs.  For those steps the
CPU path runs a loop compiled by numba over the batch; tensors on other devices keep the torch
implementation, which is also the reference the tests compare the kernels with.

The kernels live in the modules ``polytopes/_compiled_*.py``, which import numba and declare their
functions with ``numba.njit(cache=True)``.  A family imports such a module inside the function that
takes the compiled path, so importing sstcvx or a family does not load numba, and each kernel is
compiled on its first call (then read from numba's on-disk cache by later processes).  The kernels run
on one thread, like the torch paths they replace at the benchmarks' one thread, and read the tensors
through numpy views (no copy for contiguous CPU tensors).

:func:`enabled_for` says whether a tensor takes the compiled path: a CPU tensor, with the kernels
enabled.  They are enabled unless the environment variable ``SSTCVX_COMPILED`` is ``0`` when this
module is first imported; tests switch them off for a block with :func:`disabled`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

#: Whether CPU tensors take the compiled kernels (see the module docstring).
ENABLED = os.environ.get("SSTCVX_COMPILED", "1") != "0"


def enabled_for(t: torch.Tensor) -> bool:
    """True where ``t`` takes the compiled kernels: the kernels are enabled and ``t`` is on the CPU."""
    return ENABLED and t.device.type == "cpu"


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Within the block, every tensor takes the torch implementation (tests compare the two paths)."""
    global ENABLED
    before, ENABLED = ENABLED, False
    try:
        yield
    finally:
        ENABLED = before
