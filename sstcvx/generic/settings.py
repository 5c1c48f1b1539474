"""The generic path's conic solver settings and fallback policy, and its tolerances.

The settings are diffcp's ``solver_args`` (``solve_method`` picks the conic solver inside
diffcp).  Measured accuracies of each choice are in ``docs/generic.md``.
"""

from __future__ import annotations

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

#: The cvxpylayers backend of every generic layer, named explicitly so that a change of
#: cvxpylayers' default (e.g. to Moreau) cannot silently replace it: the settings above
#: (``solve_method``, tolerances, fallback) are diffcp's.
BACKEND = "DIFFCP"

#: The opt-in backend (``solver="moreau"``, ``pip install sstcvx[moreau]``): Moreau through cvxpylayers.
MOREAU_BACKEND = "MOREAU"
#: Moreau's settings on the generic path: its interior-point method named, since Moreau's "auto"
#: picks an active-set method on small problems, whose derivatives are not smooth in the utilities.
MOREAU_ARGS = {"solver": "ipm"}


def moreau_available() -> bool:
    """Whether the ``moreau`` package (the ``moreau`` extra) is installed."""
    import importlib.util

    return importlib.util.find_spec("moreau") is not None


def check_moreau_args(solver_args) -> dict:
    """Validate Moreau's ``solver_args``: a dict whose keys are fields of ``moreau.Settings`` (Moreau
    ignores unknown keys silently, so a misspelt setting would not take effect); returns it."""
    if not isinstance(solver_args, dict):
        raise TypeError(f"solver_args: expected a dict of Moreau settings, got {type(solver_args).__name__}")
    import moreau

    fields = set(moreau.Settings.model_fields)
    unknown = sorted(set(solver_args) - fields)
    if unknown:
        raise ValueError(f"solver_args: {unknown} are not Moreau settings; expected keys among {sorted(fields)}")
    return solver_args


#: Keys that diffcp's batch solver itself takes (the rest go to the conic solver).
DIFFCP_KEYS = frozenset({"solve_method", "mode", "n_jobs_forward", "n_jobs_backward", "derivative_kwargs"})
#: SCS settings keys handled by diffcp before SCS sees them.
_DIFFCP_SCS_KEYS = frozenset({"eps"})
#: SCS settings that name files (not probed, since probing would write them).
_SCS_FILE_KEYS = frozenset({"write_data_filename", "log_csv_filename"})


def solve_methods() -> tuple:
    """The ``solve_method`` values diffcp accepts in this environment (ECOS only when installed)."""
    import importlib.util

    names = ["Clarabel", "CLARABEL", "SCS"]
    if importlib.util.find_spec("ecos") is not None:
        names.append("ECOS")
    return tuple(names)


_CHECKED: dict = {}


def check_solver_args(solver_args) -> dict | None:
    """Validate ``solver_args`` up front; returns it (a dict) or ``None``.

    ``solve_method`` must be one that diffcp knows (:func:`solve_methods`); the other keys must
    be settings of that conic solver or diffcp's own keys: for Clarabel each key is set on a
    fresh ``clarabel.DefaultSettings`` (which rejects unknown names and wrong types), for SCS
    the settings are passed to SCS on a one-variable LP (which rejects them the same way).
    Without this, a misspelt name fails every solve and the fallback silently replaces it.
    Checked once per distinct settings (cached), microseconds to a millisecond.
    """
    if solver_args is None:
        return None
    if not isinstance(solver_args, dict):
        raise TypeError(f"solver_args: expected a dict of diffcp settings or None, got {type(solver_args).__name__}")
    try:
        key = repr(sorted(solver_args.items()))
    except TypeError:
        key = None
    if key is not None and key in _CHECKED:
        return solver_args
    methods = solve_methods()
    method = solver_args.get("solve_method")
    if method is None or method not in methods:
        raise ValueError(
            f"solver_args: solve_method {method!r} is not a conic solver diffcp knows; expected one of "
            f"{', '.join(map(repr, methods))} (e.g. sstcvx.generic.CLARABEL_ARGS or SCS_ARGS)"
        )
    settings = {k: v for k, v in solver_args.items() if k not in DIFFCP_KEYS}
    if method.upper() == "CLARABEL":
        import clarabel

        probe = clarabel.DefaultSettings()
        for name, value in settings.items():
            try:
                setattr(probe, name, value)
            except AttributeError:
                raise ValueError(
                    f"solver_args: {name!r} is not a Clarabel setting (nor a diffcp key: "
                    f"{', '.join(sorted(DIFFCP_KEYS))}); see clarabel.DefaultSettings"
                ) from None
            except (TypeError, ValueError, OverflowError) as error:
                raise ValueError(f"solver_args: Clarabel setting {name}={value!r}: {error}") from None
    elif method == "SCS":
        _probe_scs({k: v for k, v in settings.items() if k not in _SCS_FILE_KEYS | _DIFFCP_SCS_KEYS})
    if key is not None:
        if len(_CHECKED) > 256:
            _CHECKED.clear()
        _CHECKED[key] = True
    return solver_args


def _probe_scs(settings: dict) -> None:
    import numpy as np
    import scipy.sparse as sp
    import scs

    data = {"A": sp.csc_matrix(np.array([[1.0], [-1.0]])), "b": np.array([1.0, 0.0]), "c": np.array([-1.0])}
    settings = dict(settings)
    settings["verbose"] = False
    try:
        scs.solve(data, {"l": 2}, **settings)
    except TypeError as error:
        raise ValueError(
            f"solver_args: SCS rejects these settings ({error}); diffcp's own keys are "
            f"{', '.join(sorted(DIFFCP_KEYS | _DIFFCP_SCS_KEYS))}"
        ) from None
    except ValueError as error:
        raise ValueError(f"solver_args: SCS rejects these settings ({error})") from None
