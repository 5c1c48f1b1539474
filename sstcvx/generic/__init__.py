"""The generic path: any polytope declared with CVXPY.

Two backends: the fast batched torch solver (:mod:`~sstcvx.generic.dual_newton`) for the built-in
entropy, binary entropy and Euclidean regularizers on a linear declaration, and conic solvers
through cvxpylayers for everything else (and as the reference).

* :mod:`~sstcvx.generic.dual_newton`: the fast torch solver (dual barrier-Newton, implicit backward);
* :mod:`~sstcvx.generic.settings`: the conic solver settings, fallback policy and tolerances;
* :mod:`~sstcvx.generic.layer`: the cvxpylayers layer with checked solutions and derivatives;
* :mod:`~sstcvx.generic.lifted`: ``exp_family_entropy`` over the vertex weights;
* :mod:`~sstcvx.generic.lp`: the hard sample (one LP per element) and the feasibility check;
* :mod:`~sstcvx.generic.cache`: what is built once per polytope.

Cost: tens of microseconds per instance on the fast solver, milliseconds per instance on the
conic path (one conic solve each).  Accuracy: about 1e-10 on the fast solver; the conic
solver's tolerance otherwise (the defaults agree with the closed forms to about 1e-8).
"""

from __future__ import annotations

from ..regularizers import CvxpyRegularizer, SeparableRegularizer
from . import cache
from .dual_newton import FAST_REGULARIZERS, FastRelaxation
from .interior_point import InteriorPointRelaxation
from .layer import GenericRelaxation
from .lifted import VertexWeightsRelaxation
from .lp import AffineFeasibility, GenericArgmax
from .settings import (
    CLARABEL_ARGS,
    DEFAULT_SOLVER_ARGS,
    FALLBACK_SOLVER_ARGS,
    MOREAU_BACKEND,
    SCS_ARGS,
    default_solver_args,
    fallback_solver_args,
    moreau_available,
)

__all__ = [
    "generic_relaxation",
    "moreau_relaxation",
    "fast_relaxation",
    "FastRelaxation",
    "InteriorPointRelaxation",
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
    if isinstance(regularizer, (CvxpyRegularizer, SeparableRegularizer)):
        return ("user", id(regularizer))
    return ("builtin", regularizer.name)


def generic_relaxation(P, regularizer):
    """The cached generic layer of ``(P, regularizer)``, built on first use."""
    if regularizer.has_cvxpy_form:
        build = lambda: GenericRelaxation(P, regularizer)
    else:
        build = lambda: VertexWeightsRelaxation(P, regularizer)
    return cache.cached(P, ("relax",) + _regularizer_key(regularizer), build)


def moreau_relaxation(P, regularizer):
    """The cached generic layer of ``(P, regularizer)`` on cvxpylayers' Moreau backend (opt-in: the
    ``moreau`` extra), with the checks and the diffcp fallback of :class:`GenericRelaxation`."""
    if not moreau_available():
        raise ImportError("solver='moreau' needs the moreau package: pip install 'sstcvx[moreau]'")
    if not regularizer.has_cvxpy_form:
        raise ValueError(
            f"solver='moreau': regularizer {regularizer.name!r} has no CVXPY form (Moreau solves the "
            "declared problem); use solver='generic', or give the regularizer a cvxpy form"
        )
    build = lambda: GenericRelaxation(P, regularizer, backend=MOREAU_BACKEND)
    return cache.cached(P, ("moreau",) + _regularizer_key(regularizer), build)


def fast_relaxation(P, regularizer):
    """The cached fast torch solver of ``(P, regularizer)`` (:class:`InteriorPointRelaxation` for a
    declaration with inequality rows or auxiliary variables and for ``Regularizer.separable``,
    :class:`FastRelaxation` otherwise), or ``None`` where it does not apply
    (a regularizer other than the built-in entropy, binary_entropy and euclidean and those of
    ``Regularizer.separable``, or a declaration that is not linear).

    """
    separable = isinstance(regularizer, SeparableRegularizer)
    if not separable and (isinstance(regularizer, CvxpyRegularizer) or regularizer.name not in FAST_REGULARIZERS):
        return None

    def build():
        try:
            # the interior-point method where there are inequality rows, auxiliary variables or a user's
            # phi (only its derivatives needed); Newton on the dual, faster there, for the rest
            form = P.linear_form()
            if separable or form.m_in or form.n_aux:
                return InteriorPointRelaxation(P, regularizer)
            return FastRelaxation(P, regularizer)
        except (ValueError, NotImplementedError):  # not a linear declaration: the conic path serves it
            return False

    fast = cache.cached(P, ("fast",) + _regularizer_key(regularizer), build)
    return fast or None


def generic_argmax(P) -> GenericArgmax:
    """The cached LP of ``P``, built on first use."""
    return cache.cached(P, ("argmax",), lambda: GenericArgmax(P))
