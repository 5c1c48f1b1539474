"""sstcvx: stochastic softmax tricks as differentiable convex-optimization layers.

Declare a polytope P = conv(X) with CVXPY constraints (or list its vertices),
then draw hard samples (the LP argmax), relaxed samples (the regularized LP)
and straight-through samples with gradients, through a generic cvxpylayers
path or, for known polytopes (the ``polytopes`` package), specialized solvers.
See docs/design.md for the mathematics.
"""

from . import enumeration as _enumeration
from ._version import __version__ as __version__
from .distributions import RelaxedStochasticArgmax, StochasticArgmax, StraightThroughStochasticArgmax
from .errors import SecondDerivativeError, SolverError
from .harness.compare import compare
from .noise import Noise
from .polytope import Polytope, VertexPolytope
from .registry import register_argmax, register_relaxation
from .regularizers import Regularizer
from .sampling import argmax, perturb, relax, relaxation_solver, sample, straight_through
from .validation import set_validate_args

# The explicit vertex list is the exact, specialized solver of from_vertices polytopes.
register_relaxation(VertexPolytope, "exp_family_entropy")(_enumeration.vertex_marginals)
register_argmax(VertexPolytope)(_enumeration.best_vertex)
del VertexPolytope

# The public surface; everything else is importable from its submodule (sstcvx.noise.Gumbel,
# sstcvx.registry.find_relaxation, sstcvx.harness.report.ComparisonReport, sstcvx.generic, ...).
__all__ = [
    "Polytope",
    "Regularizer",
    "Noise",
    "relax",
    "argmax",
    "sample",
    "perturb",
    "straight_through",
    "relaxation_solver",
    "set_validate_args",
    "register_relaxation",
    "register_argmax",
    "compare",
    "StochasticArgmax",
    "RelaxedStochasticArgmax",
    "StraightThroughStochasticArgmax",
    "SolverError",
    "SecondDerivativeError",
]
