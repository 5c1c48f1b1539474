"""Compare the generic CVXPY path with a reference on the same utilities: ``sstcvx.compare``.

The reference is, in order of preference (``reference="auto"``):

1. ``"specialized"``: the solver registered for (P, regularizer) in the registry;
2. ``"brute_force"``: enumeration of ``P.vertices`` (or of ``vertices=`` given by the
   caller): for ``exp_family_entropy`` the exact Gibbs marginals softmax(V Z)^T V; for a
   CVXPY regularizer the same relaxed program stated on the vertex list,
   x = V^T lambda with lambda in the simplex (an independent formulation of P, so a
   wrong constraint in a user's declaration shows up as a difference);
3. ``"second_solver"``: the generic path again, with other conic solver settings
   (``reference_solver_args``, by default SCS at eps 1e-9).

Everything that goes wrong is counted in the report (``warnings``, ``failures``,
``messages``), never raised: a failing batch is re-run element by element and the
elements that solved are still compared.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch

from .. import registry
from ..enumeration import best_vertex, vertex_marginals
from ..generic import (
    AffineFeasibility,
    default_solver_args,
    fallback_solver_args,
    generic_relaxation,
    moreau_relaxation,
)
from ..generic.settings import check_moreau_args, check_solver_args
from ..noise import get_noise
from ..polytope import VertexPolytope
from ..regularizers import get_regularizer
from ..sampling import argmax, relax
from ..validation import check_polytope
from .report import Comparison, ComparisonReport
from .timing import adaptive_median

REFERENCES = ("auto", "specialized", "brute_force", "second_solver")
#: The ``solver=`` values the compared path can take.
GENERIC_BACKENDS = ("generic", "fast", "cvxpylayers", "moreau")
#: Above this many vertices, brute force is not attempted.
MAX_BRUTE_FORCE_VERTICES = 5000
#: Above this many vertices, the vertex formulation of a CVXPY regularizer is not attempted
#: (it has one variable per vertex).
MAX_VERTEX_FORMULATION = 2000
_IGNORED_WARNINGS = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)
_MAX_MESSAGES = 5


# ----------------------------------------------------------------------------------------------
# running one path, with failures and warnings counted
# ----------------------------------------------------------------------------------------------


class _Log:
    def __init__(self):
        self.warnings = 0
        self.failures = 0
        self.messages = []

    def note(self, message: str):
        if message not in self.messages and len(self.messages) < _MAX_MESSAGES:
            self.messages.append(message)

    def run(self, what: str, fn, *args):
        """fn(*args) with its warnings counted; an exception is counted and returns None."""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                result = fn(*args)
            except Exception as error:  # counted, not fatal
                result = None
                self.failures += 1
                self.note(f"{what} failed: {type(error).__name__}: {_one_line(error)}")
        for w in caught:
            if issubclass(w.category, _IGNORED_WARNINGS):
                continue
            self.warnings += 1
            self.note(f"{what} warned: {w.category.__name__}: {_one_line(w.message)}")
        return result


def _one_line(x) -> str:
    text = " ".join(str(x).split())
    return text if len(text) <= 300 else text[:297] + "..."


class _Path:
    """One way of computing X_tau(U) (and its VJP) on a batch."""

    def __init__(self, name: str, relax_fn):
        self.name = name
        self.relax_fn = relax_fn  # U -> X

    def value_and_vjp(self, U, G):
        u = U.detach().clone().requires_grad_(True)
        X = self.relax_fn(u)
        (grad,) = torch.autograd.grad((X * G).sum(), u, allow_unused=True)
        if grad is None:
            grad = torch.zeros_like(u)
        return X.detach(), grad.detach()

    def measure(self, U, G, log: _Log):
        """(X, grad, ok) with ok the rows that solved; a failing batch is retried row by row."""
        result = log.run(self.name, self.value_and_vjp, U, G)
        if result is not None:
            return result[0], result[1], torch.ones(U.shape[0], dtype=torch.bool)
        if U.shape[0] == 1:
            return None, None, torch.zeros(1, dtype=torch.bool)
        X = torch.full_like(U, float("nan"))
        grad = torch.full_like(U, float("nan"))
        ok = torch.zeros(U.shape[0], dtype=torch.bool)
        isolated = _Log()
        for i in range(U.shape[0]):
            row = isolated.run(f"{self.name} (batch element {i})", self.value_and_vjp, U[i : i + 1], G[i : i + 1])
            if row is not None:
                X[i], grad[i], ok[i] = row[0][0], row[1][0], True
        log.warnings += isolated.warnings
        for m in isolated.messages:
            log.note(m)
        log.note(f"{self.name}: {int((~ok).sum())} of {U.shape[0]} batch elements failed when solved one by one")
        return X, grad, ok

    def times(self, U, G, repeats: int):
        def forward():
            self.relax_fn(U.detach().clone().requires_grad_(True))

        def forward_backward():
            u = U.detach().clone().requires_grad_(True)
            (self.relax_fn(u) * G).sum().backward()

        return adaptive_median(forward, repeats), adaptive_median(forward_backward, repeats)


def _vertex_list(P, vertices):
    if vertices is not None:
        V = torch.as_tensor(vertices, dtype=torch.float64)
        if tuple(V.shape[1:]) != tuple(P.event_shape):
            raise ValueError(
                f"vertices: expected shape (m, {', '.join(map(str, P.event_shape))}) for {P.name}, got {tuple(V.shape)}"
            )
        return V
    try:
        V = P.vertices
    except Exception:  # a broken enumeration only disables brute force
        return None
    if V is None or V.shape[0] > MAX_BRUTE_FORCE_VERTICES:
        return None
    return V


def _hard_is_vertex(X, V, feasibility) -> bool:
    """Every row of X is a listed vertex (when V is known), else 0/1 and feasible."""
    flat = X.reshape(X.shape[0], -1).to(torch.float64)
    if V is not None:
        Vf = V.reshape(V.shape[0], -1)
        return bool((torch.cdist(flat, Vf).amin(dim=-1) <= 1e-9).all())
    integral = bool(((flat - flat.round()).abs() <= 1e-9).all())
    feasible = feasibility is None or bool((feasibility.violations(X) <= 1e-6).all())
    return integral and feasible


def _per_instance_ratio(t_generic, n_generic, t_ref, n_ref):
    if t_generic is None or t_ref is None or t_ref <= 0:
        return None
    return (t_generic / n_generic) / (t_ref / n_ref)


def _diffs(A, B, rows):
    if A is None or B is None or not rows.any():
        return None, None
    d = (A[rows] - B[rows]).abs()
    if not torch.isfinite(d).all():
        return float("inf"), float("inf")
    return float(d.max()), float(d.mean())


# ----------------------------------------------------------------------------------------------
# the harness
# ----------------------------------------------------------------------------------------------


def compare(
    P,
    regularizer="entropy",
    *,
    tau=1.0,
    batch: int = 16,
    U: torch.Tensor | None = None,
    noise="gumbel",
    seed: int = 0,
    repeats: int = 3,
    reference: str = "auto",
    vertices=None,
    max_generic_batch: int | None = None,
    solver_args: dict | None = None,
    reference_solver_args: dict | None = None,
    hard: bool = True,
    generic: bool = True,
    dtype: torch.dtype = torch.float64,
    generic_backend: str = "generic",
) -> ComparisonReport:
    """Run the generic path and a reference on the same utilities and report how they differ.

    For each regularizer and temperature (``regularizer`` and ``tau`` may be single
    values or sequences; one row per pair), computes on the same ``U`` of shape
    ``(batch, *P.event_shape)``, U = theta + noise with theta ~ N(0, 1):

    * X_tau = argmax_{x in P} <U, x> - tau f(x) by the generic CVXPY path and by the
      reference (see the module docstring for ``reference``), their max and mean
      absolute difference, and the same for the VJP with a random cotangent G;
    * when brute force applies and is not the reference (``exp_family_entropy`` with
      ``P.vertices`` known), the worst distance of either path from it;
    * the hard samples (LP argmax) of the generic path and of the specialized oracle
      (or brute force): the fraction that agree and whether every one is a vertex;
    * the median over at least ``repeats`` timed calls (more for fast paths, up to
      50 calls or 0.05 s; after the measuring call, which is the
      warm-up) of the forward and forward+backward time of each path and of the
      argmax, their per-instance ratios (``speedup``), and the generic layer's build time.

    Args:
        P: any :class:`sstcvx.Polytope` (a family from ``polytopes``, ``from_cvxpy`` or ``from_vertices``).
        regularizer: a name, a :class:`sstcvx.Regularizer`, or a sequence of them.
        tau: temperature(s) > 0.
        batch: rows of U (ignored when ``U`` is given).
        U: utilities ``(batch, *P.event_shape)`` to use instead of random ones.
        noise, seed: the noise law of U and the seed of theta, the noise and G.
        repeats: timed repetitions (0: no timing).
        reference: ``"auto"``, ``"specialized"``, ``"brute_force"`` or ``"second_solver"``.
        vertices: the point list ``(m, *event_shape)`` of P, for brute force on a polytope
            that does not enumerate its own (``P.vertices is None``).
        max_generic_batch: run the generic path on at most this many rows of U (it costs
            milliseconds per row); the differences are over those rows.
        solver_args: the generic path's conic solver settings (default ``sstcvx.generic.default_solver_args``).
        reference_solver_args: the second solver's settings (default: the generic path's fallback for the regularizer).
        hard: also compare the hard samples.
        generic: run the generic path (False: time the reference alone, e.g. at sizes the
            generic path cannot reach).
        dtype: floating dtype of U.
        generic_backend: the ``solver=`` of the compared path: ``"generic"`` (the fast torch solver
            where it applies, cvxpylayers otherwise), ``"fast"``, ``"cvxpylayers"`` or ``"moreau"``
            (cvxpylayers on Moreau, the ``moreau`` extra; ``solver_args`` are then Moreau's); with
            ``reference="second_solver"`` (cvxpylayers) or ``"specialized"`` this puts any two
            backends on the same utilities.

    Returns a :class:`ComparisonReport`.  Solver failures and warnings are counted in
    it, never raised; invalid arguments raise ``ValueError``/``TypeError``.
    Cost: (2 + 2 * repeats) generic solves per row and configuration, plus the reference's.
    """
    check_polytope(P)
    regs = [regularizer] if isinstance(regularizer, str) or not isinstance(regularizer, Sequence) else list(regularizer)
    if not regs:
        raise ValueError("regularizer: expected at least one regularizer")
    regs = [get_regularizer(r) for r in regs]
    taus = [tau] if not isinstance(tau, Sequence) else list(tau)
    for t in taus:
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not (math.isfinite(t) and t > 0):
            raise ValueError(f"tau: expected finite temperatures > 0, got {t!r}")
    if generic_backend not in GENERIC_BACKENDS:
        raise ValueError(f"generic_backend: expected one of {GENERIC_BACKENDS}, got {generic_backend!r}")
    reference = {"specialised": "specialized"}.get(reference, reference) if isinstance(reference, str) else reference
    if reference not in REFERENCES:
        raise ValueError(f"reference: expected one of {REFERENCES}, got {reference!r}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 0:
        raise ValueError(f"repeats: expected an int >= 0, got {repeats!r}")
    if max_generic_batch is not None and (not isinstance(max_generic_batch, int) or max_generic_batch < 1):
        raise ValueError(f"max_generic_batch: expected an int >= 1 or None, got {max_generic_batch!r}")
    if generic_backend == "moreau":
        if solver_args is not None:
            check_moreau_args(solver_args)
    else:
        check_solver_args(solver_args)
    try:
        check_solver_args(reference_solver_args)
    except ValueError as error:
        raise ValueError(f"reference_{error}") from None

    generator = torch.Generator().manual_seed(seed)
    event = tuple(P.event_shape)
    if U is None:
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch: expected an int >= 1, got {batch!r}")
        theta = torch.randn((batch,) + event, generator=generator, dtype=dtype)
        U = theta + get_noise(noise).sample(theta.shape, dtype=dtype, device=theta.device, generator=generator)
    else:
        if not isinstance(U, torch.Tensor) or U.dim() != len(event) + 1 or tuple(U.shape[1:]) != event:
            shape = tuple(U.shape) if isinstance(U, torch.Tensor) else type(U).__name__
            raise ValueError(f"U: expected a tensor of shape (batch, {', '.join(map(str, event))}), got {shape}")
        U = U.detach()
    B = U.shape[0]
    G = torch.randn(U.shape, generator=generator, dtype=torch.float64).to(U.dtype)
    Bg = B if max_generic_batch is None else min(B, max_generic_batch)
    Ug, Gg = U[:Bg], G[:Bg]
    V = _vertex_list(P, vertices)
    size = int(torch.Size(event).numel())

    hard_log = _Log()
    hard_stats = _compare_hard(P, U, Ug, V, repeats, hard_log, generic) if hard else {}

    rows: list[Comparison] = []
    for reg in regs:
        ref_name, ref_path, bf_path = _reference(P, reg, reference, V, reference_solver_args)
        for t in taus:
            # the hard samples' warnings and failures are counted once, in the first row
            rows.append(
                _compare_one(
                    P,
                    reg,
                    float(t),
                    U,
                    G,
                    Ug,
                    Gg,
                    ref_name,
                    ref_path,
                    bf_path,
                    solver_args,
                    repeats,
                    hard_stats,
                    hard_log if not rows else _Log(),
                    generic,
                    size,
                    generic_backend,
                )
            )
    return ComparisonReport(rows)


def _reference(P, reg, reference, V, reference_solver_args):
    """(name, path factory tau -> _Path or None, brute-force factory or None) for one regularizer."""
    has_specialized = registry.find_relaxation(P, reg) is not None
    brute_exact = V is not None and reg.name == "exp_family_entropy"
    vertex_formulation = (
        V is not None
        and reg.has_cvxpy_form
        and not isinstance(P, VertexPolytope)
        and V.shape[0] <= MAX_VERTEX_FORMULATION
    )
    Pv = VertexPolytope(V, name=f"vertices of {P.name}") if V is not None else None

    def brute(tau):
        if brute_exact:
            return _Path("brute force", lambda u: vertex_marginals(Pv, u / tau))
        return _Path("brute force (vertex formulation)", lambda u: relax(Pv, u, tau, reg, solver="cvxpylayers"))

    def specialized(tau):
        return _Path("specialized", lambda u: relax(P, u, tau, reg, solver="specialized"))

    # the second solver is the other one of the pair the generic path picks for this regularizer
    args = dict(
        fallback_solver_args(default_solver_args(reg)) if reference_solver_args is None else reference_solver_args
    )

    def second(tau):
        return _Path(
            f"second solver ({args.get('solve_method', '?')})",
            lambda u: relax(P, u, tau, reg, solver="cvxpylayers", solver_args=args),
        )

    choice = reference
    if choice == "auto":
        if has_specialized:
            choice = "specialized"
        elif brute_exact or vertex_formulation:
            choice = "brute_force"
        elif reg.has_cvxpy_form:
            choice = "second_solver"
        else:
            return "none", None, None
    if choice == "specialized":
        if not has_specialized:
            raise ValueError(
                f"reference='specialized': no specialized solver for {reg.name!r} on {P.name}; "
                f"registered: {registry.specialized_regularizers(P) or 'none'}"
            )
        return "specialized", specialized, (brute if brute_exact else None)
    if choice == "brute_force":
        if not (brute_exact or vertex_formulation):
            raise ValueError(
                f"reference='brute_force': {P.name} lists no vertices (pass vertices=...) "
                f"or has more than {MAX_BRUTE_FORCE_VERTICES}, or it is itself a vertex list"
            )
        return "brute_force", brute, None
    if not reg.has_cvxpy_form:
        raise ValueError(f"reference='second_solver': regularizer {reg.name!r} has no CVXPY form")
    return f"solver:{args.get('solve_method', '?')}", second, None


def _compare_hard(P, U, Ug, V, repeats, log, generic):
    stats = {}
    Pv = VertexPolytope(V, name=f"vertices of {P.name}") if V is not None else None
    if registry.find_argmax(P) is not None:
        ref_fn = lambda u: argmax(P, u, solver="specialized")
    elif Pv is not None:
        ref_fn = lambda u: best_vertex(Pv, u)
    else:
        ref_fn = None
    X_ref = log.run("reference argmax", ref_fn, U) if ref_fn is not None else None
    X_gen = log.run("generic argmax", lambda u: argmax(P, u, solver="generic"), Ug) if generic else None
    feasibility = None
    if V is None and X_gen is not None:
        try:
            x, constraints = P.cvxpy_declaration()
            feasibility = AffineFeasibility(x, constraints)
        except Exception as error:
            log.note(f"feasibility check unavailable: {_one_line(error)}")
    checks = [_hard_is_vertex(X, V, feasibility) for X in (X_gen, X_ref) if X is not None]
    stats["hard_is_vertex"] = all(checks) if checks else None
    if X_gen is not None and X_ref is not None:
        same = (X_gen - X_ref[: Ug.shape[0]]).reshape(Ug.shape[0], -1).abs().amax(dim=-1) <= 1e-9
        stats["hard_agreement"] = float(same.double().mean())
    if X_gen is not None:
        stats["time_generic_argmax"] = adaptive_median(lambda: argmax(P, Ug, solver="generic"), repeats)
    if X_ref is not None:
        stats["time_reference_argmax"] = adaptive_median(lambda: ref_fn(U), repeats)
    return stats


def _compare_one(
    P,
    reg,
    tau,
    U,
    G,
    Ug,
    Gg,
    ref_name,
    ref_path,
    bf_path,
    solver_args,
    repeats,
    hard_stats,
    hard_log,
    generic,
    size,
    generic_backend="generic",
):
    row = Comparison(
        polytope=P.name,
        regularizer=reg.name,
        tau=tau,
        batch=U.shape[0],
        generic_batch=Ug.shape[0] if generic else 0,
        size=size,
        reference=ref_name,
        **hard_stats,
    )
    log = _Log()
    log.warnings, log.failures = hard_log.warnings, hard_log.failures
    for m in hard_log.messages:
        log.note(m)

    if ref_path is None:
        log.failures += 1
        log.note(
            f"no reference for {reg.name!r} on {P.name}: no specialized solver, no vertex list, "
            "and no CVXPY form for a second solver"
        )
        X_ref = g_ref = None
        ok_ref = torch.zeros(U.shape[0], dtype=torch.bool)
    else:
        ref = ref_path(tau)
        X_ref, g_ref, ok_ref = ref.measure(U, G, log)
    X_gen = g_gen = None
    if generic:
        # the conic layer of the backend compared (its build time is reported): Moreau's, or diffcp's
        build = moreau_relaxation if generic_backend == "moreau" else generic_relaxation
        layer = log.run("generic path (build)", build, P, reg)
        if layer is not None:
            row.build_time_generic = layer.build_time
            gen = _Path(
                "generic path", lambda u: relax(P, u, tau, reg, solver=generic_backend, solver_args=solver_args)
            )
            X_gen, g_gen, ok_gen = gen.measure(Ug, Gg, log)
            if X_gen is not None and X_ref is not None:
                rows = ok_gen & ok_ref[: Ug.shape[0]]
                row.max_abs_diff, row.mean_abs_diff = _diffs(X_gen, X_ref[: Ug.shape[0]], rows)
                row.max_abs_grad_diff, row.mean_abs_grad_diff = _diffs(g_gen, g_ref[: Ug.shape[0]], rows)
            if X_gen is not None and bool(ok_gen.all()):
                row.time_generic, row.time_generic_backward = gen.times(Ug, Gg, repeats)
    if bf_path is not None and X_ref is not None:
        X_bf, _, ok_bf = bf_path(tau).measure(U, G, log)
        if X_bf is not None:
            worst = [_diffs(X_ref, X_bf, ok_ref & ok_bf)[0]]
            if X_gen is not None:
                worst.append(_diffs(X_gen, X_bf[: Ug.shape[0]], ok_gen & ok_bf[: Ug.shape[0]])[0])
            worst = [w for w in worst if w is not None]
            row.brute_force_max_abs_diff = max(worst) if worst else None
    if X_ref is not None and bool(ok_ref.all()):
        row.time_reference, row.time_reference_backward = ref.times(U, G, repeats)
        if ref_name == "specialized":
            row.time_specialized, row.time_specialized_backward = row.time_reference, row.time_reference_backward
    row.speedup = _per_instance_ratio(row.time_generic, row.generic_batch, row.time_reference, row.batch)
    row.speedup_backward = _per_instance_ratio(
        row.time_generic_backward, row.generic_batch, row.time_reference_backward, row.batch
    )
    for name in (
        "max_abs_diff",
        "mean_abs_diff",
        "max_abs_grad_diff",
        "mean_abs_grad_diff",
        "brute_force_max_abs_diff",
    ):
        value = getattr(row, name)
        if value is not None and not math.isfinite(value):
            setattr(row, name, None)
            log.note(f"{name}: not finite (some outputs were NaN or infinite)")
    row.warnings, row.failures, row.messages = log.warnings, log.failures, list(log.messages)
    return row


__all__ = ["compare", "Comparison", "ComparisonReport", "REFERENCES"]
