"""The fast generic solver (sstcvx.generic.dual_newton): closed forms, brute force over vertex lists,
gradients, extremes, batch shapes, failures and dispatch."""

import itertools
import warnings

import cvxpy as cp
import pytest
import torch

import sstcvx
from polytopes import KSubset, Permutation, Simplex
from polytopes.spanning_tree import spanning_trees_by_flows
from sstcvx import generic
from sstcvx.generic.interior_point import InteriorPointRelaxation


def fast(P, U, tau=1.0, reg="entropy"):
    return sstcvx.relax(P, U, tau, reg, solver="fast")


def declared_simplex(n):
    x = cp.Variable(n)
    return sstcvx.Polytope.from_cvxpy(x, [x >= 0, cp.sum(x) == 1], recognize=False)


def path_independent_sets(n):
    x = cp.Variable(n)
    return sstcvx.Polytope.from_cvxpy(
        x, [x >= 0, x <= 1, x[:-1] + x[1:] <= 1], name=f"IndependentSets(path {n})", recognize=False
    )


def redundant_ksubset(n, k):
    """k-subsets with a duplicated and rescaled equality, a dependent pair and loose rows."""
    x = cp.Variable(n)
    cons = [
        x >= 0,
        x <= 1,
        cp.sum(x) == k,
        2 * cp.sum(x) == 2 * k,
        cp.sum(x[: n // 2]) + cp.sum(x[n // 2 :]) == k,
        cp.sum(x) <= k + 1,
        x <= 2,
        cp.sum(x) >= k,
    ]
    return sstcvx.Polytope.from_cvxpy(x, cons, name="RedundantKSubset", recognize=False)


def groups(n_groups, size):
    x = cp.Variable((n_groups, size))
    return sstcvx.Polytope.from_cvxpy(x, [x >= 0, cp.sum(x, axis=1) == 1], name="OnePerGroup", recognize=False)


def zero_one_points(P):
    """Brute force: the 0/1 points of P's linear form (those with some feasible w are found by the
    form itself only when there is no w; with w, use the polytope's own vertex list)."""
    L = P.linear_form()
    pts = torch.tensor(list(itertools.product([0.0, 1.0], repeat=L.n)), dtype=torch.float64)
    assert L.n_aux == 0
    return pts[L.residuals(pts) <= 1e-9]


# -- closed forms --------------------------------------------------------------------------------
def test_softmax_and_sparsemax_on_a_declared_simplex():
    P = declared_simplex(6)
    U = torch.randn(16, 6, dtype=torch.float64)
    torch.testing.assert_close(fast(P, U, 0.7), torch.softmax(U / 0.7, -1), atol=1e-10, rtol=0)
    torch.testing.assert_close(
        fast(P, U, 0.5, "euclidean"), sstcvx.relax(Simplex(6), U, 0.5, "euclidean"), atol=1e-10, rtol=0
    )


@pytest.mark.parametrize("reg", ["binary_entropy", "euclidean"])
def test_ksubset_projections(reg):
    P = KSubset(12, 4)
    U = 2 * torch.randn(32, 12, dtype=torch.float64)
    torch.testing.assert_close(
        fast(P, U, 0.6, reg), sstcvx.relax(P, U, 0.6, reg, solver="specialized"), atol=1e-9, rtol=0
    )


def test_sinkhorn_on_birkhoff():
    P = Permutation(4)
    U = torch.randn(8, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(
        fast(P, U, 0.5), sstcvx.relax(P, U, 0.5, "entropy", solver="specialized"), atol=1e-9, rtol=0
    )


# -- brute force: the first-order optimality certificate over the enumerated vertex list -----------------
def _gradient_f(X, reg):
    if reg == "entropy":
        return torch.log(X) + 1
    if reg == "binary_entropy":
        return torch.log(X) - torch.log1p(-X)
    return X


@pytest.mark.parametrize("reg", ["entropy", "binary_entropy", "euclidean"])
@pytest.mark.parametrize(
    "make",
    [
        lambda: path_independent_sets(5),
        lambda: redundant_ksubset(6, 2),
        lambda: groups(2, 3),
        lambda: declared_simplex(4),
    ],
)
def test_first_order_certificate_over_the_vertex_list(make, reg):
    """X solves max <z, x> - f(x) over P = conv(V) iff X is in P and <z - grad f(X), v - X> <= 0 for every
    vertex v (a linear function is largest at a vertex): checked against the brute-forced 0/1 points."""
    P = make()
    V = zero_one_points(P).reshape(-1, *P.event_shape)
    U = torch.randn(6, *P.event_shape, dtype=torch.float64)
    X = fast(P, U, 0.8, reg)
    assert float(P.linear_form().residuals(X.reshape(6, -1)).max()) < 1e-9
    slope = (U / 0.8 - _gradient_f(X, reg)).reshape(6, -1)
    gap = (slope @ V.reshape(len(V), -1).T).amax(-1) - (slope * X.reshape(6, -1)).sum(-1)
    assert float(gap.max()) < 1e-8
    torch.testing.assert_close(X[:2], sstcvx.relax(P, U[:2], 0.8, reg, solver="cvxpylayers"), atol=1e-6, rtol=0)


def test_extended_formulation_agrees_with_cvxpylayers():
    """Spanning trees of K3 by flows (auxiliary variables with bounds, inequality rows)."""
    P = spanning_trees_by_flows(3)
    assert P.linear_form().n_aux > 0
    U = torch.randn(4, 3, dtype=torch.float64)
    solution = generic.fast_relaxation(P, sstcvx.regularizers.get_regularizer("binary_entropy")).solve(U / 0.7)
    assert (solution.status == 0).all()
    X = solution.x
    torch.testing.assert_close(X, sstcvx.relax(P, U, 0.7, "binary_entropy", solver="cvxpylayers"), atol=1e-6, rtol=0)
    trees = torch.tensor([[1.0, 1, 0], [1, 0, 1], [0, 1, 1]], dtype=torch.float64)  # brute force: K3's trees
    assert all(_acyclic_k3(t) for t in trees)
    slope = U / 0.7 - (torch.log(X) - torch.log1p(-X))
    assert float(((slope @ trees.T).amax(-1) - (slope * X).sum(-1)).max()) < 1e-8


def _acyclic_k3(v):
    return int(v.sum()) == 2


# -- gradients --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "make,reg",
    [
        (lambda: path_independent_sets(4), "euclidean"),
        (lambda: path_independent_sets(4), "binary_entropy"),
        (lambda: KSubset(5, 2), "euclidean"),
        (lambda: Permutation(3), "entropy"),
    ],
)
def test_gradcheck(make, reg):
    P = make()
    U = torch.randn(2, *P.event_shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda u: fast(P, u, 0.9, reg), (U,))


def test_vjp_agrees_with_the_specialized_solver():
    P = KSubset(10, 3)
    U = torch.randn(16, 10, dtype=torch.float64, requires_grad=True)
    G = torch.randn(16, 10, dtype=torch.float64)
    for reg in ("binary_entropy", "euclidean"):
        (g_fast,) = torch.autograd.grad((fast(P, U, 0.5, reg) * G).sum(), U)
        (g_spec,) = torch.autograd.grad((sstcvx.relax(P, U, 0.5, reg, solver="specialized") * G).sum(), U)
        torch.testing.assert_close(g_fast, g_spec, atol=1e-8, rtol=0)


# -- extremes, dtypes and shapes -----------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("tau,scale", [(1e-3, 1.0), (1e3, 1.0), (1.0, 1e3), (1e-3, 1e3)])
def test_extremes(dtype, tau, scale):
    U = scale * torch.randn(8, 10, dtype=torch.float64)
    cases = [(Simplex(10), "entropy"), (KSubset(10, 3), "binary_entropy"), (KSubset(10, 3), "euclidean")]
    for P, reg in cases:
        X = fast(P, U.to(dtype), tau, reg)
        assert X.dtype == dtype and torch.isfinite(X).all()
        ref = sstcvx.relax(P, U, tau, reg, solver="specialized")
        torch.testing.assert_close(X.double(), ref, atol=1e-8 if dtype == torch.float64 else 1e-5, rtol=0)
    B = Permutation(4)
    X = fast(B, U[:, :1].reshape(8, 1, 1) * torch.randn(8, 4, 4, dtype=torch.float64).to(dtype), tau)
    assert torch.isfinite(X).all() and float((X.sum(-1) - 1).abs().max()) < 1e-5


def test_extremes_with_inequality_rows_stay_feasible():
    P = path_independent_sets(8)
    for tau in (1e-3, 1e3):
        U = 10 * torch.randn(16, 8, dtype=torch.float64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # an element may go to the conic fallback
            X = fast(P, U, tau, "binary_entropy")
        assert float(P.linear_form().residuals(X).max()) < 1e-7


def test_batch_shapes_and_no_batch():
    P = groups(3, 4)
    U = torch.randn(2, 3, 3, 4, dtype=torch.float64)
    X = fast(P, U)
    assert X.shape == U.shape
    torch.testing.assert_close(X, torch.softmax(U, -1), atol=1e-10, rtol=0)
    torch.testing.assert_close(fast(P, U[0, 0]), torch.softmax(U[0, 0], -1), atol=1e-10, rtol=0)


# -- failures and dispatch ---------------------------------------------------------------------------
def test_non_converging_element_falls_back_then_is_named(monkeypatch, second_failure_is_named):
    # Birkhoff with the entropy: the solver's start (Sinkhorn sweeps) is not exact there, and one Newton
    # step leaves every element unconverged (on a simplex or a k-subset the start alone converges)
    P = Permutation(3)
    U = torch.randn(3, 3, 3, dtype=torch.float64)
    relaxation = generic.fast_relaxation(P, sstcvx.regularizers.get_regularizer("entropy"))
    monkeypatch.setattr(relaxation, "max_iter", 1)
    with pytest.warns(RuntimeWarning, match="did not converge") as caught:
        X = fast(P, U)
    # one warning per element re-solved, each naming its element
    named = [
        str(w.message).split("batch element ")[1].split()[0] for w in caught if "did not converge" in str(w.message)
    ]
    assert sorted(named) == ["0", "1", "2"]
    torch.testing.assert_close(X, sstcvx.relax(P, U, 1.0, "entropy", solver="specialized"), atol=1e-6, rtol=0)
    second_failure_is_named(P, U, "entropy")


def test_dispatch():
    P = declared_simplex(3)
    assert sstcvx.relaxation_solver(P, "entropy")[1] == "fast"
    assert sstcvx.relaxation_solver(P, "entropy", solver="generic")[1] == "fast"
    assert sstcvx.relaxation_solver(P, "entropy", solver="cvxpylayers")[1] == "generic"
    assert sstcvx.relaxation_solver(KSubset(4, 2), "euclidean")[1] == "specialized"
    assert sstcvx.relaxation_solver(KSubset(4, 2), "euclidean", solver="fast")[1] == "fast"
    tsallis = sstcvx.Regularizer.from_cvxpy(lambda x: cp.sum_squares(x), name="sq")
    assert sstcvx.relaxation_solver(P, tsallis)[1] == "generic"
    with pytest.raises(ValueError, match="solver='fast'"):
        sstcvx.relaxation_solver(P, tsallis, solver="fast")
    x = cp.Variable(3)
    ball = sstcvx.Polytope.from_cvxpy(x, [x >= 0, cp.norm(x, 2) <= 1], recognize=False)
    assert sstcvx.relaxation_solver(ball, "entropy")[1] == "generic"  # not linear: the conic path


def test_no_rows_is_a_closed_form():
    """The hypercube has bounds only: X = sigmoid(z) for the binary entropy, clamp(z, 0, 1) for euclidean."""
    x = cp.Variable(5)
    P = sstcvx.Polytope.from_cvxpy(x, [x >= 0, x <= 1], recognize=False)
    U = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(fast(P, U, 0.7, "binary_entropy"), torch.sigmoid(U / 0.7), atol=1e-12, rtol=0)
    torch.testing.assert_close(fast(P, U, 0.7, "euclidean"), (U / 0.7).clamp(0, 1), atol=1e-12, rtol=0)
    assert torch.autograd.gradcheck(lambda u: fast(P, u, 0.7, "binary_entropy"), (U,))


def test_auxiliary_variables_take_the_fast_path():
    """Extended formulations (auxiliary variables) go to the interior-point method under auto and generic too;
    solver="cvxpylayers" still pins the conic path."""
    P = spanning_trees_by_flows(3)
    for solver in ("auto", "generic", "fast"):
        fn, path = sstcvx.relaxation_solver(P, "binary_entropy", solver=solver)
        assert path == "fast" and isinstance(fn, InteriorPointRelaxation)
    assert sstcvx.relaxation_solver(P, "binary_entropy", solver="cvxpylayers")[1] == "generic"
