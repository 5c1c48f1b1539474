"""The family registry: what the tooling (compare, bench, demo, device checks) knows of a polytope family.

A family module (``polytopes/simplex.py``, or a module of a third-party package) ends with
one :func:`register_family` call carrying everything the tooling needs: the command-line
name, a constructor ``make(n, k)``, the regularizers worth comparing, the sizes to run and
the largest size at which the generic path is affordable.  The core never imports a family;
the tooling finds them through :func:`load_families`, which imports every module named in
the ``sstcvx.families`` entry-point group (``polytopes`` declares itself there in
``pyproject.toml``), so a package that declares the same group gets its families into
``sstcvx compare``, ``sstcvx bench`` and ``sstcvx demo`` with no change here.
"""

from __future__ import annotations

import importlib
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata

#: The entry-point group that packages declaring families register their modules under.
ENTRY_POINT_GROUP = "sstcvx.families"


@dataclass(frozen=True)
class Family:
    """A polytope family as the tooling sees it.

    Attributes:
        name: the command-line name (``sstcvx compare NAME``), lowercase with underscores.
        make: ``make(n, k) -> Polytope``; ``k`` is ``None`` unless the family takes a second
            size (``uses_k``), and then ``None`` asks for the family's default.
        regularizers: the regularizer names compared and benchmarked on this family.
        n: the default size of ``sstcvx compare`` and the demo.
        sizes, quick_sizes: the sizes swept by ``sstcvx bench`` (full / ``--quick``).
        max_generic_n: the largest n at which the generic CVXPY path is run by the bench.
        device_check_n, quick_device_check_n: the sizes of the accelerator check (full / quick).
        uses_k: whether ``make`` takes a meaningful second size ``k``.
        recognize: optional ``recognize(form) -> match or None``, for declarations in CVXPY.
        test_sizes: the sizes the contract suite (``tests/test_contract.py``) runs, smallest
            first: the exact witnesses (the generic path, gradcheck, the tau limits) at the first,
            which must list its vertices and build its declaration; brute force wherever the
            vertices are listed; extreme utilities at the first and the last.  Empty: ``quick_sizes``.
    """

    name: str
    make: Callable
    regularizers: tuple
    n: int
    sizes: tuple
    quick_sizes: tuple
    max_generic_n: int
    device_check_n: int
    quick_device_check_n: int
    uses_k: bool = False
    recognize: Callable | None = None
    test_sizes: tuple = ()

    def __call__(self, n: int | None = None, k: int | None = None):
        """The polytope of size ``n`` (the default size when ``None``)."""
        if k is not None and not self.uses_k:
            raise ValueError(f"k: family {self.name!r} takes no k, got {k}")
        return self.make(self.n if n is None else n, k)


_FAMILIES: dict[str, Family] = {}
_LOAD_ERRORS: dict[str, str] = {}
_loaded = False
# Held while the entry-point group loads, so that a second thread waits for every family
# instead of seeing a half-filled registry (reentrant: a family module may ask for families()).
_LOAD_LOCK = threading.RLock()


def register_family(family: Family) -> Family:
    """Register ``family`` under ``family.name`` (re-registering a name replaces it). Returns it."""
    if not isinstance(family, Family):
        raise TypeError(f"family: expected an sstcvx.families.Family, got {type(family).__name__}")
    if not family.name or not family.name.replace("_", "").isalnum() or family.name != family.name.lower():
        raise ValueError(f"family.name: expected a lowercase identifier such as 'ksubset', got {family.name!r}")
    _FAMILIES[family.name] = family
    return family


def load_families() -> dict[str, str]:
    """Import every module of the ``sstcvx.families`` entry-point group, once.

    A module that fails to import is reported with a warning and recorded (see
    :func:`load_errors`); the others still load.  Returns the errors so far.
    """
    global _loaded
    with _LOAD_LOCK:
        if _loaded:
            return dict(_LOAD_ERRORS)
        _loaded = True
        for entry in metadata.entry_points(group=ENTRY_POINT_GROUP):
            try:
                importlib.import_module(entry.value.split(":")[0])
            except Exception as error:  # a broken family package fails alone
                _LOAD_ERRORS[entry.name] = f"{type(error).__name__}: {error}"
                warnings.warn(
                    f"sstcvx family package {entry.name!r} ({entry.value}) failed to load: {error}",
                    RuntimeWarning,
                    stacklevel=2,
                )
        return dict(_LOAD_ERRORS)


def load_errors() -> dict[str, str]:
    """``{entry point: error}`` for the family packages that failed to import."""
    return dict(_LOAD_ERRORS)


def families() -> dict[str, Family]:
    """Every registered family by name, after loading the entry-point group."""
    load_families()
    return dict(_FAMILIES)


def get_family(name: str) -> Family:
    """The family registered as ``name``; ``KeyError`` naming the known ones otherwise."""
    known = families()
    if name not in known:
        raise KeyError(f"unknown family {name!r}; expected one of {', '.join(sorted(known)) or '(none registered)'}")
    return known[name]
