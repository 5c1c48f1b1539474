"""When solvers take their CPU kernels compiled by numba: one switch for the core and the families.

Eager torch dispatches every operation on its own, a few microseconds each, so an algorithm made of many
small dependent steps (an interior-point iteration on a small problem, a dynamic program over the items,
Newton steps on a 10 x 10 matrix) spends its time in dispatch at small batch sizes, whatever the
arithmetic costs.  For those steps the CPU path runs a loop compiled by numba over the batch, one element
at a time, on one thread; tensors on other devices keep the torch implementation, which is also the
reference the tests compare the kernels with.

The kernels live in modules that import numba and declare their functions with
``numba.njit(cache=True)``: the core's :mod:`sstcvx.generic._compiled_interior_point` and
:mod:`sstcvx._compiled_separable`, and the families'
``polytopes/_compiled_*.py`` (registered by :mod:`polytopes._compiled` with
:func:`register_kernel_modules`).  A solver imports its kernel module inside the function that takes the
compiled path, so importing sstcvx or a family never loads numba; each kernel is compiled on its first
call and read from numba's on-disk cache by later processes.  Each kernel module is self-contained (the
small dense Cholesky routines are written in each): numba checks a cached kernel against its own file
only, so a kernel that called a function from another file could keep running a stale copy of it.

:func:`enabled_for` says whether a tensor takes the compiled path: a CPU tensor, with the kernels enabled
and available.  They are enabled unless the environment variable ``SSTCVX_COMPILED`` is ``0`` when this
module is first imported, and outside :func:`disabled` blocks (tests compare the two paths with it).  They
are available unless importing numba or a kernel module fails, which warns once (see :func:`_load`).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import warnings
from collections.abc import Iterator

import torch

#: Whether CPU tensors take the compiled kernels (see the module docstring).
ENABLED = os.environ.get("SSTCVX_COMPILED", "1") != "0"

#: The kernel modules, imported (not compiled) by the first :func:`enabled_for` that would say True.
KERNEL_MODULES: list[str] = ["sstcvx.generic._compiled_interior_point", "sstcvx._compiled_separable"]
#: Whether every module of KERNEL_MODULES imported; None until the first :func:`enabled_for` asks.
_available: bool | None = None


def register_kernel_modules(*names: str) -> None:
    """Add kernel modules (full dotted names) to those :func:`enabled_for` checks before saying True."""
    global _available
    new = [name for name in names if name not in KERNEL_MODULES]
    KERNEL_MODULES.extend(new)
    if new and _available:
        _available = None  # the new modules are imported at the next question


def enabled_for(t: torch.Tensor) -> bool:
    """True where ``t`` takes the compiled kernels: they are enabled and available, and ``t`` is on the CPU."""
    return ENABLED and t.device.type == "cpu" and (_available if _available is not None else _load())


def _load() -> bool:
    """Import numba and the kernel modules once.  Where that fails (numba missing or broken, or no place
    for its cache: ``numba.njit(cache=True)`` raises at declaration when neither the package's folder nor
    a user cache folder is writable), warn once and let every tensor take the torch implementation."""
    global _available
    try:
        for name in KERNEL_MODULES:
            importlib.import_module(name)
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
    """Within the block, every tensor takes the torch implementation (tests compare the two paths)."""
    global ENABLED
    before, ENABLED = ENABLED, False
    try:
        yield
    finally:
        ENABLED = before
