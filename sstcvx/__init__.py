"""sstcvx: stochastic softmax tricks as differentiable convex-optimisation layers.

Declare a polytope P = conv(X) with CVXPY constraints (or list its vertices),
then draw hard samples (the LP argmax), relaxed samples (the regularized LP)
and straight-through samples with gradients, through a generic cvxpylayers
path or, for known polytopes (the ``polytopes`` package), specialized solvers.
See docs/design.md for the mathematics.
"""

from . import enumeration as _enumeration
from ._version import __version__
from .harness.compare import Comparison, ComparisonReport, compare
from .distributions import RelaxedStochasticArgmax, StochasticArgmax, StraightThroughStochasticArgmax
from .errors import SecondDerivativeError, SolverError
from .generic import DEFAULT_SOLVER_ARGS, FALLBACK_SOLVER_ARGS
from .noise import Exponential, Gaussian, Gumbel, Logistic, Noise, get_noise
from .polytope import DeclaredPolytope, Polytope, VertexPolytope
from .registry import find_argmax, find_relaxation, register_argmax, register_relaxation, specialized_regularizers
from .regularizers import Regularizer, get_regularizer
from .sampling import argmax, perturb, relax, relaxation_solver, sample, straight_through
from .validation import set_validate_args

# The explicit vertex list is the exact, specialized solver of from_vertices polytopes.
register_relaxation(VertexPolytope, "exp_family_entropy")(_enumeration.vertex_marginals)
register_argmax(VertexPolytope)(_enumeration.best_vertex)


__all__ = [
    "Polytope",
    "DeclaredPolytope",
    "VertexPolytope",
    "Regularizer",
    "get_regularizer",
    "Noise",
    "Gumbel",
    "Gaussian",
    "Logistic",
    "Exponential",
    "get_noise",
    "relax",
    "argmax",
    "sample",
    "perturb",
    "straight_through",
    "set_validate_args",
    "relaxation_solver",
    "register_relaxation",
    "register_argmax",
    "find_relaxation",
    "find_argmax",
    "specialized_regularizers",
    "StochasticArgmax",
    "RelaxedStochasticArgmax",
    "StraightThroughStochasticArgmax",
    "SolverError",
    "SecondDerivativeError",
    "compare",
    "Comparison",
    "ComparisonReport",
    "DEFAULT_SOLVER_ARGS",
    "FALLBACK_SOLVER_ARGS",
]
