"""The generic path's per-polytope cache: layers and LPs built once per (polytope, key).

The cache is a weak-key map owned by the generic path, so a polytope carries no private
state written by other modules and is freed normally; entries are built under a lock, so
two threads never build (or share a half-built) entry twice.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable

_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LOCK = threading.RLock()


def cached(P, key, build: Callable):
    """The entry ``key`` of polytope ``P``, built by ``build()`` on first use."""
    with _LOCK:
        entries = _CACHE.get(P)
        if entries is None:
            entries = _CACHE[P] = {}
        entry = entries.get(key)
        if entry is None:
            entry = entries[key] = build()
        return entry


def entries(P) -> dict:
    """A copy of the cached entries of ``P`` (for tests and diagnostics)."""
    with _LOCK:
        return dict(_CACHE.get(P, {}))


def clear(P) -> None:
    """Drop every cached entry of ``P`` (rebuilt on demand)."""
    with _LOCK:
        _CACHE.pop(P, None)
