"""The generic path's conic solver settings and fallback policy, and its tolerances.

The settings are diffcp's ``solver_args`` (``solve_method`` picks the conic solver inside
diffcp).  Measured accuracies of each choice are in ``docs/generic.md``.
"""

from __future__ import annotations

#: The cvxpylayers backend, named so that a change of cvxpylayers' default cannot swap it (the
#: settings below are diffcp's ``solver_args``; another backend would drop them silently).
CONIC_BACKEND = "DIFFCP"

#: Clarabel at tight tolerances: about 1e-8 from the closed forms on exponential cones (the entropies).
CLARABEL_ARGS = {
    "solve_method": "Clarabel",
    "tol_gap_abs": 1e-12,
    "tol_gap_rel": 1e-12,
    "tol_feas": 1e-12,
    "tol_ktratio": 1e-10,
    "max_iter": 400,
}
#: SCS at eps 1e-9: about 1e-8 on the second-order cone of 1/2 ||x||^2, where Clarabel through
#: diffcp stops near 3e-6; but off by up to 1e-4 on exponential cones.
SCS_ARGS = {"solve_method": "SCS", "eps_abs": 1e-9, "eps_rel": 1e-9, "max_iters": 100_000}
#: The default settings for regularizers other than "euclidean" (which defaults to SCS_ARGS).
DEFAULT_SOLVER_ARGS = CLARABEL_ARGS
#: Settings retried, element by element, when a Clarabel solve fails or is infeasible.
FALLBACK_SOLVER_ARGS = SCS_ARGS


def default_solver_args(regularizer) -> dict:
    """The conic solver settings that are most accurate for ``regularizer`` (measured, see above)."""
    return SCS_ARGS if regularizer.name == "euclidean" else DEFAULT_SOLVER_ARGS


def fallback_solver_args(args: dict) -> dict:
    """The settings to retry an element with: the other solver of the pair."""
    return CLARABEL_ARGS if args.get("solve_method") == "SCS" else FALLBACK_SOLVER_ARGS


#: Entries of an LP solution closer than this to an integer are snapped to it.
SNAP_TOLERANCE = 1e-6
#: A relaxed solution violating P's affine constraints by more than this is re-solved.
FEASIBILITY_TOLERANCE = 1e-6
#: Relative slack of the plausibility tests on vector-Jacobian products (see implausible_gradients).
GRADIENT_SLACK = 1e-3
