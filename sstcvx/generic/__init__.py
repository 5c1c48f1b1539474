"""The generic path: any polytope declared with CVXPY, solved by conic solvers through cvxpylayers.

* :mod:`~sstcvx.generic.settings`: the conic solver settings, fallback policy and tolerances;
* :mod:`~sstcvx.generic.layer`: the cvxpylayers layer with checked solutions and derivatives;
* :mod:`~sstcvx.generic.lifted`: ``exp_family_entropy`` over the vertex weights;
* :mod:`~sstcvx.generic.lp`: the hard sample (one LP per element) and the feasibility check;
* :mod:`~sstcvx.generic.cache`: what is built once per polytope.

Cost: milliseconds per instance (one conic solve each).  Accuracy: the conic solver's
tolerance; the defaults agree with the closed forms to about 1e-8.
"""

from __future__ import annotations

from ..regularizers import CvxpyRegularizer
from . import cache
from .layer import GenericRelaxation
from .lifted import VertexWeightsRelaxation
from .lp import AffineFeasibility, GenericArgmax
from .settings import (
    CLARABEL_ARGS,
    DEFAULT_SOLVER_ARGS,
    FALLBACK_SOLVER_ARGS,
    SCS_ARGS,
    default_solver_args,
    fallback_solver_args,
)

__all__ = [
    "generic_relaxation",
    "generic_argmax",
    "GenericRelaxation",
    "VertexWeightsRelaxation",
    "GenericArgmax",
    "AffineFeasibility",
    "CLARABEL_ARGS",
    "SCS_ARGS",
    "DEFAULT_SOLVER_ARGS",
    "FALLBACK_SOLVER_ARGS",
    "default_solver_args",
    "fallback_solver_args",
]


def _regularizer_key(regularizer):
    if isinstance(regularizer, CvxpyRegularizer):
        return ("user", id(regularizer))
    return ("builtin", regularizer.name)


def generic_relaxation(P, regularizer):
    """The cached generic layer of ``(P, regularizer)``, built on first use."""
    if regularizer.has_cvxpy_form:
        build = lambda: GenericRelaxation(P, regularizer)  # noqa: E731
    else:
        build = lambda: VertexWeightsRelaxation(P, regularizer)  # noqa: E731
    return cache.cached(P, ("relax",) + _regularizer_key(regularizer), build)


def generic_argmax(P) -> GenericArgmax:
    """The cached LP of ``P``, built on first use."""
    return cache.cached(P, ("argmax",), lambda: GenericArgmax(P))
