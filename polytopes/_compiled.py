"""When the solvers take their CPU kernels compiled by numba.

Eager torch dispatches every operation on its own, a few microseconds each, so an algorithm made of
many small dependent steps (a dynamic program over the items, dozens of sweeps over a 10 x 10 matrix)
spends its time in dispatch at small batch sizes, whatever the arithmetic costs.  For those steps the
CPU path runs a loop compiled by numba over the batch; tensors on other devices keep the torch
implementation, which is also the reference the tests compare the kernels with.

The kernels live in the modules ``polytopes/_compiled_*.py``, which import numba and declare their
functions with ``numba.njit(cache=True)``.  A family imports such a module inside the function that
takes the compiled path, so sstcvx and the families import numba only when a CPU tensor first takes
a compiled path, and each kernel is compiled on its first call (then read from numba's on-disk cache by later processes).  The kernels run
on one thread, like the torch paths they replace at the benchmarks' one thread, and read the tensors
through numpy views (no copy for contiguous CPU tensors).

:func:`enabled_for` says whether a tensor takes the compiled path: a CPU tensor, with the kernels
enabled and available.  They are enabled unless the environment variable ``SSTCVX_COMPILED`` is ``0``
when this module is first imported; tests switch them off for a block with :func:`disabled`.  They are
available unless importing numba or a kernel module fails, which warns once (see :func:`_load`).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import warnings
from collections.abc import Iterator

import torch

from sstcvx import _compiled as sstcvx_compiled

#: Whether CPU tensors take the compiled kernels (see the module docstring).
ENABLED = os.environ.get("SSTCVX_COMPILED", "1") != "0"


#: The kernel modules, imported (not compiled) by the first :func:`enabled_for` that would say True.
KERNEL_MODULES = ("_compiled_gibbs", "_compiled_sinkhorn", "_compiled_birkhoff")
_available: bool | None = None


def enabled_for(t: torch.Tensor) -> bool:
    """True where ``t`` takes the compiled kernels: the kernels are enabled and available, and ``t`` is on
    the CPU."""
    return ENABLED and t.device.type == "cpu" and (_available if _available is not None else _load())


def _load() -> bool:
    """Import numba and the kernel modules once.  Where that fails (numba missing or broken, or no place
    for its cache: ``numba.njit(cache=True)`` raises at declaration when neither the package's folder nor
    a user cache folder is writable), warn once and let every tensor take the torch implementation."""
    global _available
    try:
        for name in KERNEL_MODULES:
            importlib.import_module(f"{__package__}.{name}")
        _available = True
    except Exception as error:
        _available = False
        warnings.warn(
            f"sstcvx: the compiled CPU kernels are unavailable ({type(error).__name__}: {error}); the torch "
            "implementations run instead, slower at small batch sizes. Setting NUMBA_CACHE_DIR to a writable "
            "folder fixes a missing cache location; SSTCVX_COMPILED=0 silences this",
            RuntimeWarning,
            stacklevel=3,
        )
    return _available


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Within the block, every tensor takes the torch implementation (tests compare the two paths), the
    core's kernels (:mod:`sstcvx._compiled`) included."""
    global ENABLED
    before, ENABLED = ENABLED, False
    try:
        with sstcvx_compiled.disabled():
            yield
    finally:
        ENABLED = before
