"""The public contract: shapes, dtypes, dispatch, sampling modes, reproducibility and errors."""

import cvxpy as cp
import pytest
import torch

import sstcvx
from sstcvx import generic
from sstcvx.validation import all_finite


def ksubset(n=6, k=2):
    x = cp.Variable(n)
    return sstcvx.Polytope.from_cvxpy(x, [x >= 0, x <= 1, cp.sum(x) == k], name="ksub", recognize=False)


def simplex(n=4):
    x = cp.Variable(n)
    return sstcvx.Polytope.from_cvxpy(x, [x >= 0, cp.sum(x) == 1], name="simplex", recognize=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch", [(), (3,), (2, 3)])
def test_shapes_and_dtypes_preserved(dtype, batch):
    P = ksubset()
    U = torch.randn(*batch, 6, dtype=dtype)
    for X in (
        sstcvx.relax(P, U, 0.5, "binary_entropy"),
        sstcvx.argmax(P, U),
        sstcvx.sample(P, U, 0.5, "binary_entropy", mode="straight_through"),
    ):
        assert X.shape == U.shape and X.dtype == dtype and X.device == U.device


def test_readme_example():
    x = cp.Variable(8)
    P = sstcvx.Polytope.from_cvxpy(x, [x >= 0, x <= 1, cp.sum(x) == 3])
    theta = torch.randn(32, 8, requires_grad=True)
    X_soft = sstcvx.sample(P, theta, tau=0.5, regularizer="binary_entropy")
    X_hard = sstcvx.sample(P, theta, mode="hard")
    X_st = sstcvx.sample(P, theta, tau=0.5, regularizer="binary_entropy", mode="straight_through")
    (X_st * torch.randn(8)).sum().backward()
    assert X_soft.requires_grad and not X_hard.requires_grad
    assert ((X_hard == 0) | (X_hard == 1)).all() and (X_hard.sum(-1) == 3).all()
    assert torch.isfinite(theta.grad).all() and theta.grad.abs().sum() > 0


def test_straight_through_forward_is_hard_backward_is_relaxed():
    P = simplex(5)
    theta = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    g = torch.Generator().manual_seed(3)
    st = sstcvx.sample(P, theta, 0.7, "entropy", mode="straight_through", generator=g)
    hard = sstcvx.sample(P, theta, mode="hard", generator=torch.Generator().manual_seed(3))
    assert torch.equal(st.detach(), hard)
    w = torch.randn(4, 5, dtype=torch.float64)
    (st * w).sum().backward()
    grad_st = theta.grad.clone()
    theta.grad = None
    soft = sstcvx.sample(P, theta, 0.7, "entropy", generator=torch.Generator().manual_seed(3))
    (soft * w).sum().backward()
    torch.testing.assert_close(grad_st, theta.grad, atol=1e-6, rtol=0)


def test_generator_makes_sampling_reproducible():
    P = simplex(4)
    theta = torch.randn(10, 4)
    a = sstcvx.sample(P, theta, mode="hard", generator=torch.Generator().manual_seed(7))
    b = sstcvx.sample(P, theta, mode="hard", generator=torch.Generator().manual_seed(7))
    c = sstcvx.sample(P, theta, mode="hard", generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_gumbel_max_on_simplex_samples_softmax():
    P = sstcvx.Polytope.from_vertices(torch.eye(4))  # exact argmax by enumeration: fast enough for 20k draws
    theta = torch.tensor([1.0, 0.0, -1.0, 0.5], dtype=torch.float64)
    draws = sstcvx.sample(P, theta.expand(20000, 4), mode="hard", generator=torch.Generator().manual_seed(0))
    freq = draws.mean(0)
    # 4 standard errors of a frequency near 0.4 at 20000 draws is about 0.014
    torch.testing.assert_close(freq, torch.softmax(theta, -1), atol=0.015, rtol=0)


@pytest.mark.parametrize("noise", ["gumbel", "gaussian", "logistic", "exponential"])
def test_noise_laws_have_their_moments(noise):
    law = sstcvx.noise.get_noise(noise)
    eps = law.sample((200000,), dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    mean, var = {
        "gumbel": (0.5772156649, torch.pi**2 / 6),
        "gaussian": (0.0, 1.0),
        "logistic": (0.0, torch.pi**2 / 3),
        "exponential": (1.0, 1.0),
    }[noise]
    assert abs(eps.mean().item() - mean) < 0.02 and abs(eps.var().item() - var) < 0.05 * var
    # log_prob integrates to one on a grid
    grid = torch.linspace(-20, 40, 200001, dtype=torch.float64)
    assert abs(torch.trapezoid(law.log_prob(grid).exp(), grid).item() - 1) < 1e-4


def test_distribution_objects():
    P = simplex(4)
    theta = torch.randn(3, 4, requires_grad=True)
    hard = sstcvx.StochasticArgmax(P, theta)
    assert hard.batch_shape == (3,) and hard.event_shape == (4,)
    s = hard.sample((5,))
    assert s.shape == (5, 3, 4) and not s.requires_grad and (s.sum(-1) == 1).all()
    relaxed = sstcvx.RelaxedStochasticArgmax(P, theta, tau=0.5)
    r = relaxed.rsample((2,))
    assert r.shape == (2, 3, 4) and r.requires_grad
    st = sstcvx.StraightThroughStochasticArgmax(P, theta, tau=0.5)
    x = st.rsample()
    assert ((x == 0) | (x == 1)).all() and x.requires_grad
    x.sum().backward()
    with pytest.raises(NotImplementedError, match="no closed-form"):
        hard.log_prob(s)


def test_dispatch_specialized_and_generic():
    V = torch.eye(3)
    P = sstcvx.Polytope.from_vertices(V)
    assert sstcvx.relaxation_solver(P, "exp_family_entropy")[1] == "specialized"
    # x = V^T lambda has auxiliary variables: the torch backend's interior-point method serves it
    assert sstcvx.relaxation_solver(P, "entropy")[1] == "fast"
    assert sstcvx.relaxation_solver(P, "entropy", solver="fast")[1] == "fast"
    assert sstcvx.relaxation_solver(simplex(3), "entropy")[1] == "fast"  # the generic path's torch backend
    assert sstcvx.relaxation_solver(P, "entropy", solver="cvxpylayers")[1] == "generic"
    with pytest.raises(ValueError, match="no specialized solver for regularizer 'entropy'"):
        sstcvx.relax(P, torch.randn(3), regularizer="entropy", solver="specialized")
    with pytest.raises(ValueError, match="no specialized argmax"):
        sstcvx.argmax(simplex(3), torch.randn(3), solver="specialized")


def test_register_on_an_instance():
    P = simplex(4)
    calls = []

    @sstcvx.register_relaxation(P, "entropy")
    def softmax(P_, Z):
        calls.append(Z.shape)
        return torch.softmax(Z, -1)

    U = torch.randn(2, 4, dtype=torch.float64)
    torch.testing.assert_close(sstcvx.relax(P, U), sstcvx.relax(P, U, solver="generic"), atol=1e-6, rtol=0)
    assert calls == [(2, 4)]
    assert sstcvx.relaxation_solver(simplex(4), "entropy")[1] == "fast"  # other instances untouched


def test_exp_family_entropy_without_vertices_explains():
    with pytest.raises(ValueError, match="from_vertices"):
        sstcvx.relax(simplex(3), torch.randn(3), regularizer="exp_family_entropy")


def test_solver_failure_names_the_element(monkeypatch):
    P = simplex(4)
    U = torch.randn(3, 4, dtype=torch.float64)
    bad = {"solve_method": "Clarabel", "max_iter": 1}
    with pytest.warns(RuntimeWarning, match="failed with Clarabel") as caught:
        X = sstcvx.relax(P, U, 1.0, "entropy", solver="cvxpylayers", solver_args=bad)
    named = [str(w.message).split("batch element ")[1].split()[0] for w in caught if "failed with" in str(w.message)]
    assert sorted(named) == ["0", "1", "2"]  # one warning per element sent to the fallback, each named
    torch.testing.assert_close(X, torch.softmax(U, -1), atol=1e-6, rtol=0)
    monkeypatch.setattr(generic.settings, "FALLBACK_SOLVER_ARGS", {"solve_method": "Clarabel", "max_iter": 1})
    with pytest.raises(sstcvx.SolverError, match=r"batch element 0 failed with solver Clarabel") as info:
        sstcvx.relax(P, U, 1.0, "entropy", solver="cvxpylayers", solver_args=bad)
    assert info.value.element == 0 and info.value.solver == "Clarabel"


def test_feasibility_check_reads_constraints():
    x = cp.Variable((2, 3))
    P = sstcvx.Polytope.from_cvxpy(x, [x >= 0, x <= 2, cp.sum(x, axis=1) == 1])
    check = generic.generic_relaxation(P, sstcvx.regularizers.get_regularizer("euclidean")).feasibility
    good = torch.tensor([[[1.0, 0, 0], [0, 0.5, 0.5]]], dtype=torch.float64)
    assert check.violations(good).item() == 0
    bad = torch.tensor([[[1.0, 0.1, 0], [0, 0.5, 0.5]]], dtype=torch.float64)
    assert abs(check.violations(bad).item() - 0.1) < 1e-12
    assert abs(check.violations(-good).item() - 2.0) < 1e-12


# -- bad input ------------------------------------------------------------------------------


def test_bad_polytope_declarations():
    x = cp.Variable(3)
    with pytest.raises(TypeError, match="x: expected a cvxpy Variable"):
        sstcvx.Polytope.from_cvxpy([1, 2], [x >= 0])
    with pytest.raises(ValueError, match="is empty"):
        sstcvx.Polytope.from_cvxpy(x, [x >= 0, cp.sum(x) == -1])
    with pytest.raises(ValueError, match="do not bound x"):
        sstcvx.Polytope.from_cvxpy(x, [x >= 0, cp.sum(x) >= 1])
    with pytest.raises(ValueError, match=r"constraints\[1\].*not convex"):
        sstcvx.Polytope.from_cvxpy(x, [x >= 0, cp.sum_squares(x) >= 1])
    p = cp.Parameter(nonneg=True)
    with pytest.raises(ValueError, match=r"constraints\[0\].*Parameters"):
        sstcvx.Polytope.from_cvxpy(x, [cp.sum(x) == p, x >= 0])
    with pytest.raises(TypeError, match=r"constraints\[1\]: expected a cvxpy constraint"):
        sstcvx.Polytope.from_cvxpy(x, [x >= 0, "x <= 1"])
    y = cp.Variable(2)
    with pytest.raises(ValueError, match="no constraint involves x"):
        sstcvx.Polytope.from_cvxpy(x, [y >= 0, y <= 1])
    with pytest.raises(ValueError, match="vertices: expected shape"):
        sstcvx.Polytope.from_vertices(torch.zeros(3))


def test_bad_relax_arguments():
    P = ksubset()
    U = torch.randn(2, 6)
    with pytest.raises(ValueError, match=r"tau: expected a finite temperature > 0"):
        sstcvx.relax(P, U, tau=0.0)
    with pytest.raises(ValueError, match=r"tau: expected every temperature"):
        sstcvx.relax(P, U, tau=torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match=r"tau: expected a scalar or a tensor broadcastable"):
        sstcvx.relax(P, U, tau=torch.ones(3))
    with pytest.raises(ValueError, match=r"U: expected shape \(\*batch, 6\).*got \(2, 5\)"):
        sstcvx.relax(P, torch.randn(2, 5))
    with pytest.raises(ValueError, match=r"tau: U / tau overflows torch\.float32"):
        sstcvx.relax(P, torch.full((6,), 1e30), tau=1e-10)
    with pytest.raises(ValueError, match="U: expected finite values"):
        sstcvx.relax(P, torch.tensor([[float("nan")] * 6]))
    with pytest.raises(TypeError, match="U: expected a floating-point tensor"):
        sstcvx.relax(P, torch.ones(6, dtype=torch.long))
    with pytest.raises(ValueError, match="regularizer: unknown name 'entropie'"):
        sstcvx.relax(P, U, regularizer="entropie")
    with pytest.raises(ValueError, match="solver: expected one of"):
        sstcvx.relax(P, U, solver="fastest")
    with pytest.raises(TypeError, match=r"P: expected an sstcvx\.Polytope"):
        sstcvx.relax("simplex", U)
    with pytest.raises(ValueError, match="mode: expected one of"):
        sstcvx.sample(P, U, mode="soft")
    with pytest.raises(ValueError, match="noise: unknown name 'cauchy'"):
        sstcvx.sample(P, U, noise="cauchy")
    with pytest.raises(ValueError, match=r"theta: expected shape"):
        sstcvx.sample(P, torch.randn(7))
    nonconvex = sstcvx.Regularizer.from_cvxpy(lambda x: -cp.sum_squares(x), name="concave")
    with pytest.raises(ValueError, match=r"regularizer 'concave'.*not convex"):
        sstcvx.relax(P, U, regularizer=nonconvex)


def test_check_warns_on_non_integral_declaration():
    x = cp.Variable(3)
    # {x in [0,1]^3 : x1 + x2 + x3 <= 1.5} has the fractional vertex (1, 0.5, 0)
    P = sstcvx.Polytope.from_cvxpy(x, [x >= 0, x <= 1, cp.sum(x) <= 1.5])
    with pytest.warns(UserWarning, match="not integral"):
        assert not P.check(n_directions=32, generator=torch.Generator().manual_seed(0))
    assert ksubset().check(n_directions=8)


def test_all_finite_is_exact_when_the_sum_overflows():
    assert all_finite(torch.tensor([3e38, 3e38]))  # the float32 sum overflows, the entries are finite
    assert not all_finite(torch.tensor([1.0, float("inf")]))
    assert not all_finite(torch.tensor([float("-inf"), float("inf")]))
    assert not all_finite(torch.tensor([[0.0, float("nan")]]))
    assert all_finite(torch.zeros(0, 3))


def test_british_spelling_of_solver_values_is_an_alias():
    from polytopes import Simplex

    P = Simplex(4)
    U = torch.randn(2, 4, dtype=torch.float64)
    torch.testing.assert_close(
        sstcvx.relax(P, U, 1.0, "entropy", solver="specialised"),
        sstcvx.relax(P, U, 1.0, "entropy", solver="specialized"),
    )
