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

from collections.abc import Callable

from .regularizers import Regularizer, SeparableRegularizer, get_regularizer

#: The registration key of a solver that serves every separable regularizer
#: (``Regularizer.separable``) on its target; it applies when no solver is registered under the
#: regularizer's own name.  Such a solver receives the regularizer: ``fn(P, Z, regularizer)``.
SEPARABLE = "separable"

_RELAXATIONS: dict = {}
_ARGMAXES: dict = {}


def _check_target(target):
    from .polytope import Polytope

    if isinstance(target, Polytope):
        return
    if isinstance(target, type) and issubclass(target, Polytope):
        return
    raise TypeError(f"target: expected a Polytope subclass or instance, got {type(target).__name__}")


def _instance_table(target, attribute):
    table = target.__dict__.get(attribute)
    if table is None:
        table = {}
        setattr(target, attribute, table)
    return table


def register_relaxation(target, regularizer: str) -> Callable:
    """Decorator: register ``fn(P, Z)`` as the specialized solver of ``regularizer`` on ``target``.

    ``regularizer="separable"`` (:data:`SEPARABLE`) registers ``fn(P, Z, regularizer)`` for every
    separable regularizer (``Regularizer.separable``) that has no solver under its own name.
    """
    _check_target(target)
    name = SEPARABLE if regularizer == SEPARABLE else get_regularizer(regularizer).name

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


def find_relaxation(P, regularizer):
    """The specialized relaxation solver ``fn(P, Z)`` for ``(P, regularizer)``, or ``None``.

    ``regularizer`` is a name or a :class:`~sstcvx.Regularizer`; for a separable one without a
    solver under its own name, the target's ``"separable"`` solver, bound to it, is returned.
    """
    if isinstance(regularizer, Regularizer):
        fn = _find(P, regularizer.name)
        if fn is None and isinstance(regularizer, SeparableRegularizer):
            fn = _find(P, SEPARABLE, regularizer)
        return fn
    return _find(P, regularizer)


def _bind(fn, separable):
    """A ``"separable"`` solver ``fn(P, Z, regularizer)`` bound to one regularizer."""
    return fn if separable is None else (lambda P, Z: fn(P, Z, separable))


def _find(P, regularizer_name: str, separable=None):
    """The solver registered under ``regularizer_name`` for P (its own, its recognized family's, its
    class's), bound to ``separable`` (the regularizer) when looking up the ``"separable"`` key."""
    own = P.__dict__.get("_own_relaxations") or {}
    if regularizer_name in own:
        return _bind(own[regularizer_name], separable)
    recognized = getattr(P, "recognized", None)
    if recognized is not None:
        fn = _find(recognized.polytope, regularizer_name, separable)
        if fn is not None:
            return recognized.relaxation(fn)
    for cls in type(P).__mro__:
        fn = _RELAXATIONS.get((cls, regularizer_name))
        if fn is not None:
            return _bind(fn, separable)
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
    """Names of the regularizers with a specialized solver on ``P`` (not counting the solver for
    every separable regularizer; see :func:`serves_separable`)."""
    names = set((P.__dict__.get("_own_relaxations") or {}).keys())
    recognized = getattr(P, "recognized", None)
    if recognized is not None:
        names.update(specialized_regularizers(recognized.polytope))
    for cls in type(P).__mro__:
        names.update(name for (c, name) in _RELAXATIONS if c is cls)
    names.discard(SEPARABLE)
    return sorted(names)


def serves_separable(P) -> bool:
    """Whether ``P`` has a specialized solver for every separable regularizer."""
    return _find(P, SEPARABLE) is not None


#: The British spelling of :func:`specialized_regularizers`, kept as an alias.
specialised_regularizers = specialized_regularizers
