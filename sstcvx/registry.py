"""The registry of specialized solvers, keyed by polytope and regularizer.

``polytopes`` (or a user) registers fast solvers here; ``sstcvx.relax`` and
``sstcvx.argmax`` look them up when ``solver`` is ``"auto"`` or
``"specialized"``.  A target is either a :class:`~sstcvx.Polytope` subclass
(the solver serves every instance, subclasses included) or one polytope
instance (for a user's own ``from_cvxpy`` declaration).

Solver signatures, on a flattened batch ``B``:

* relaxation: ``fn(P, Z) -> X`` with ``Z = U / tau`` of shape ``(B, *P.event_shape)``;
  returns ``X = argmax_{x in P} <Z, x> - f(x)``, same shape, dtype and device,
  differentiable with respect to ``Z``.
* argmax: ``fn(P, U) -> X`` with the same shapes; returns a vertex of ``P``
  maximising ``<U, x>`` (no gradient needed).

Lookup order: solvers registered on the instance, then (for a declaration recognized as a
known family, ``P.recognized``; see :mod:`sstcvx.recognition`) the family polytope's
solvers composed with the coordinate map, then solvers registered on P's classes.
"""

from __future__ import annotations

from typing import Callable

_RELAXATIONS: dict = {}
_ARGMAXES: dict = {}


def _check_target(target):
    from .polytope import Polytope

    if isinstance(target, Polytope):
        return
    if isinstance(target, type) and issubclass(target, Polytope):
        return
    raise TypeError(
        f"target: expected a Polytope subclass or instance, got {type(target).__name__}"
    )


def _instance_table(target, attribute):
    table = target.__dict__.get(attribute)
    if table is None:
        table = {}
        setattr(target, attribute, table)
    return table


def register_relaxation(target, regularizer: str) -> Callable:
    """Decorator: register ``fn(P, Z)`` as the specialized solver of ``regularizer`` on ``target``."""
    _check_target(target)
    from .regularizers import get_regularizer

    name = get_regularizer(regularizer).name

    def decorate(fn):
        if isinstance(target, type):
            _RELAXATIONS[(target, name)] = fn
        else:
            _instance_table(target, "_own_relaxations")[name] = fn
        return fn

    return decorate


def register_argmax(target) -> Callable:
    """Decorator: register ``fn(P, U)`` as the specialized hard argmax (LP oracle) of ``target``."""
    _check_target(target)

    def decorate(fn):
        if isinstance(target, type):
            _ARGMAXES[target] = fn
        else:
            target._own_argmax = fn
        return fn

    return decorate


def find_relaxation(P, regularizer_name: str):
    """The specialized relaxation solver for ``(P, regularizer)``, or ``None``."""
    own = P.__dict__.get("_own_relaxations") or {}
    if regularizer_name in own:
        return own[regularizer_name]
    recognized = getattr(P, "recognized", None)
    if recognized is not None:
        fn = find_relaxation(recognized.polytope, regularizer_name)
        if fn is not None:
            return recognized.relaxation(fn)
    for cls in type(P).__mro__:
        fn = _RELAXATIONS.get((cls, regularizer_name))
        if fn is not None:
            return fn
    return None


def find_argmax(P):
    """The specialized hard argmax for ``P``, or ``None``."""
    own = P.__dict__.get("_own_argmax")
    if own is not None:
        return own
    recognized = getattr(P, "recognized", None)
    if recognized is not None:
        fn = find_argmax(recognized.polytope)
        if fn is not None:
            return recognized.argmax(fn)
    for cls in type(P).__mro__:
        fn = _ARGMAXES.get(cls)
        if fn is not None:
            return fn
    return None


def specialized_regularizers(P) -> list[str]:
    """Names of the regularizers with a specialized solver on ``P``."""
    names = set((P.__dict__.get("_own_relaxations") or {}).keys())
    recognized = getattr(P, "recognized", None)
    if recognized is not None:
        names.update(specialized_regularizers(recognized.polytope))
    for cls in type(P).__mro__:
        names.update(name for (c, name) in _RELAXATIONS if c is cls)
    return sorted(names)


#: The British spelling of :func:`specialized_regularizers`, kept as an alias.
specialised_regularizers = specialized_regularizers
