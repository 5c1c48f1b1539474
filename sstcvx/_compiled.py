"""When the core's solvers take their CPU kernels compiled by numba (the interior-point iteration of the
fast generic path, :mod:`sstcvx.generic._compiled_interior_point`).

The same convention as the families' switch ``polytopes._compiled`` (whose :func:`disabled` also enters
this one): CPU tensors take the kernels unless the environment variable ``SSTCVX_COMPILED`` is ``0`` when
this module is first imported, or within a :func:`disabled` block, or where numba or the kernel module
cannot be loaded (warned once).  The kernel module is imported only when a CPU tensor first asks, so that
importing sstcvx never loads numba.
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
KERNEL_MODULES = ("sstcvx.generic._compiled_interior_point",)
_available: bool | None = None


def enabled_for(t: torch.Tensor) -> bool:
    """True where ``t`` takes the compiled kernels: they are enabled and available, and ``t`` is on the CPU."""
    return ENABLED and t.device.type == "cpu" and (_available if _available is not None else _load())


def _load() -> bool:
    """Import numba and the kernel modules once; where that fails, warn once and let every tensor take the
    torch implementation."""
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
