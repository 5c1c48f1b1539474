"""The opt-in Moreau backend of the cvxpylayers path (``solver="moreau"``, the ``moreau`` extra): the
backend named in the layer, Moreau's settings checked, every answer checked as on diffcp (Moreau's
infeasible answers re-solved through diffcp with a warning), the closed form to Moreau's tolerance."""

import warnings

import cvxpy as cp
import pytest
import torch

import sstcvx
from sstcvx import generic
from sstcvx.generic import settings


def declared_simplex(n):
    x = cp.Variable(n)
    return sstcvx.Polytope.from_cvxpy(x, [x >= 0, cp.sum(x) == 1], name=f"declared simplex({n})", recognize=False)


def utilities(shape, seed=0):
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def test_missing_package_is_named(monkeypatch):
    monkeypatch.setattr(generic, "moreau_available", lambda: False)
    with pytest.raises(ImportError, match=r"sstcvx\[moreau\]"):
        sstcvx.relax(declared_simplex(3), utilities((2, 3)), 1.0, "entropy", solver="moreau")


def test_regularizer_without_cvxpy_form_is_refused(monkeypatch):
    monkeypatch.setattr(generic, "moreau_available", lambda: True)
    with pytest.raises(ValueError, match="no CVXPY form"):
        sstcvx.relaxation_solver(declared_simplex(3), "exp_family_entropy", solver="moreau")


#: the tests below run Moreau itself
needs_moreau = pytest.mark.skipif(not settings.moreau_available(), reason="the moreau extra is not installed")


@needs_moreau
def test_layer_uses_moreau_and_its_interior_point_method():
    relaxation, path = sstcvx.relaxation_solver(declared_simplex(4), "entropy", solver="moreau")
    assert path == "moreau" and relaxation.backend == settings.MOREAU_BACKEND
    assert relaxation.layer.ctx.solver == "MOREAU"
    assert type(relaxation.layer.ctx.solver_ctx).__name__ == "MOREAU_ctx"
    # the method fixed at construction: Moreau's "auto" would take its active-set method on this size
    assert relaxation.layer.ctx.solver_ctx.options == settings.MOREAU_ARGS
    # the cvxpylayers path keeps its own diffcp layer: the two are cached apart
    assert sstcvx.relaxation_solver(declared_simplex(4), "entropy", solver="cvxpylayers")[1] == "generic"


@needs_moreau
def test_entropy_matches_the_softmax_and_its_gradient():
    P = declared_simplex(5)
    U = utilities((6, 5), seed=1).requires_grad_(True)
    G = utilities((6, 5), seed=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no element re-solved through diffcp
        X = sstcvx.relax(P, U, 1.0, "entropy", solver="moreau")
        (g,) = torch.autograd.grad(X, U, G)
    S = torch.softmax(U, -1)
    (g_ref,) = torch.autograd.grad(S, U, G)
    # Moreau's default tolerances: agreement to about 3e-5 (docs/generic.md)
    torch.testing.assert_close(X, S.detach(), atol=1e-4, rtol=0)
    torch.testing.assert_close(g, g_ref, atol=1e-3, rtol=0)


@needs_moreau
def test_infeasible_answers_are_re_solved_through_diffcp():
    """Moreau 0.4.1 through cvxpylayers returns points outside the polytope for the Euclidean
    regularizer (its bounds ignored); the layer's feasibility check catches each element, names it
    in a warning, and re-solves it through diffcp, so the result is the projection all the same."""
    P = declared_simplex(5)
    U = utilities((3, 5), seed=3)
    with pytest.warns(RuntimeWarning, match="failed with Moreau") as caught:
        X = sstcvx.relax(P, U, 1.0, "euclidean", solver="moreau")
    named = [str(w.message) for w in caught if "failed with Moreau" in str(w.message)]
    assert len(named) <= U.shape[0]
    reference = sstcvx.relax(P, U, 1.0, "euclidean", solver="cvxpylayers")
    torch.testing.assert_close(X, reference, atol=1e-7, rtol=0)
    assert float(X.min()) >= -1e-7


@needs_moreau
def test_settings_are_checked_against_moreau():
    P = declared_simplex(3)
    with pytest.raises(ValueError, match="not Moreau settings"):
        sstcvx.relax(P, utilities((2, 3)), 1.0, "entropy", solver="moreau", solver_args={"solve_method": "SCS"})
    X = sstcvx.relax(P, utilities((2, 3)), 1.0, "entropy", solver="moreau", solver_args={"max_iter": 200})
    torch.testing.assert_close(X, torch.softmax(utilities((2, 3)), -1), atol=1e-4, rtol=0)


@needs_moreau
def test_compare_puts_moreau_beside_the_specialized_solver():
    from polytopes import Simplex

    report = sstcvx.compare(Simplex(4), "entropy", batch=4, repeats=0, generic_backend="moreau")
    (row,) = report.rows
    assert row.max_abs_diff < 1e-4
    with pytest.raises(ValueError, match="generic_backend"):
        sstcvx.compare(Simplex(4), "entropy", batch=4, repeats=0, generic_backend="diffcp")


@needs_moreau
def test_user_regularizer_from_cvxpy_runs_on_moreau():
    P = declared_simplex(4)
    reg = sstcvx.Regularizer.from_cvxpy(lambda x: cp.sum_squares(x) - cp.sum(cp.entr(x)), name="mix")
    U = utilities((3, 4), seed=4)
    X = sstcvx.relax(P, U, 1.0, reg, solver="moreau")
    reference = sstcvx.relax(P, U, 1.0, reg, solver="cvxpylayers")
    torch.testing.assert_close(X, reference, atol=1e-4, rtol=0)


@needs_moreau
def test_command_line_compare_takes_the_backend(capsys):
    from sstcvx.harness.cli import main

    status = main(["compare", "simplex", "--n", "4", "--batch", "2", "--repeats", "0", "--regularizer", "entropy",
                   "--backend", "moreau"])  # fmt: skip
    out = capsys.readouterr().out
    assert status == 0 and "Simplex(n=4)" in out and "entropy" in out
