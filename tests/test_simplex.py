"""polytopes.Simplex: one-hot argmax, softmax, sparsemax, Gibbs marginals against brute force and the generic path."""

import pytest
import torch

import sstcvx
from polytopes import Simplex

REGULARIZERS = ("entropy", "euclidean", "exp_family_entropy")


def relax(P, U, tau, regularizer):
    return sstcvx.relax(P, U, tau, regularizer, solver="specialized")


def separated_utilities(batch, n, gap=0.1, dtype=torch.float64):
    """Rows of distinct values at least `gap` apart: the argmax is unique with a margin."""
    return torch.rand(batch, n).argsort(-1).to(dtype) * gap


def test_rejects_bad_sizes():
    with pytest.raises(ValueError, match="n"):
        Simplex(0)
    with pytest.raises(TypeError, match="n"):
        Simplex(3.0)


def test_vertices_and_declaration():
    P = Simplex(4)
    assert torch.equal(P.vertices, torch.eye(4, dtype=torch.float64))
    assert Simplex(1001).vertices is None  # a million entries at most
    x, constraints = P.cvxpy_declaration()
    assert x.shape == (4,) and len(constraints) == 2


def test_argmax_is_the_brute_force_vertex():
    P = Simplex(6)
    U = torch.randn(64, 6, dtype=torch.float64)
    X = sstcvx.argmax(P, U, solver="specialized")
    V = P.vertices
    assert torch.equal(X, V[(U @ V.T).argmax(-1)])
    assert ((X.unsqueeze(1) == V).all(-1).sum(-1) == 1).all()  # each row is exactly one vertex
    assert torch.equal(X[:4], sstcvx.argmax(P, U[:4], solver="generic"))


def test_sparsemax_known_value():
    P = Simplex(3)
    X = relax(P, torch.tensor([1.0, 0.5, -1.0], dtype=torch.float64), 1.0, "euclidean")
    torch.testing.assert_close(X, torch.tensor([0.75, 0.25, 0.0], dtype=torch.float64), atol=1e-15, rtol=0)
    # ties at the top share the mass equally
    X = relax(P, torch.tensor([2.0, 2.0, -5.0], dtype=torch.float64), 1.0, "euclidean")
    torch.testing.assert_close(X, torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64), atol=1e-15, rtol=0)


def test_sparsemax_satisfies_its_optimality_conditions():
    # x = max(Z - t, 0) with one threshold t per row and sum x = 1: Z - x equals t on the support, Z <= t off it
    P = Simplex(8)
    Z = 2 * torch.randn(2000, 8, dtype=torch.float64)
    X = relax(P, Z, 1.0, "euclidean")
    support = X > 0
    t = torch.where(support, Z - X, -torch.inf).amax(-1, keepdim=True)
    torch.testing.assert_close(torch.where(support, Z - X, t), t.expand_as(Z), atol=1e-12, rtol=0)
    assert (torch.where(support, -torch.inf, Z) <= t + 1e-12).all()
    torch.testing.assert_close(X.sum(-1), torch.ones(2000, dtype=torch.float64), atol=1e-12, rtol=0)


@pytest.mark.parametrize("regularizer", REGULARIZERS)
def test_agrees_with_generic_path(regularizer):
    P = Simplex(5)
    U = 2 * torch.randn(3, 5, dtype=torch.float64)
    fast = relax(P, U, 0.7, regularizer)
    slow = sstcvx.relax(P, U, 0.7, regularizer, solver="generic")
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=0)


def test_exp_family_entropy_is_the_brute_force_gibbs_marginals():
    P = Simplex(7)
    Z = 3 * torch.randn(5, 7, dtype=torch.float64)
    V = P.vertices
    expected = torch.softmax(Z @ V.T, -1) @ V
    torch.testing.assert_close(relax(P, Z, 1.0, "exp_family_entropy"), expected, atol=1e-8, rtol=0)
    torch.testing.assert_close(relax(P, Z, 1.0, "entropy"), expected, atol=1e-8, rtol=0)


@pytest.mark.parametrize("regularizer", REGULARIZERS)
def test_gradcheck(regularizer):
    P = Simplex(5)
    U = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda u: relax(P, u, 0.5, regularizer), (U,))


@pytest.mark.parametrize("regularizer", REGULARIZERS)
def test_tau_limits(regularizer):
    P = Simplex(6)
    U = separated_utilities(8, 6)
    hard = sstcvx.argmax(P, U)
    torch.testing.assert_close(relax(P, U, 1e-3, regularizer), hard, atol=1e-12, rtol=0)
    # tau -> infinity: argmin of f over the simplex, the barycentre for entropy and ||x||^2 alike
    torch.testing.assert_close(relax(P, U, 1e7, regularizer), torch.full_like(U, 1 / 6), atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch", [(), (3,), (2, 3)])
def test_batch_shape_and_dtype_preserved(batch, dtype):
    P = Simplex(4)
    U = torch.randn(*batch, 4, dtype=dtype)
    for X in [relax(P, U, 0.5, r) for r in REGULARIZERS] + [sstcvx.argmax(P, U)]:
        assert X.shape == U.shape and X.dtype == dtype and X.device == U.device


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("regularizer", REGULARIZERS)
def test_robust_to_extreme_utilities(regularizer, dtype):
    P = Simplex(30)
    for tau in (1e-3, 1.0, 1e3):
        theta = (1e3 * torch.randn(6, 30, dtype=dtype)).requires_grad_(True)
        X = relax(P, theta, tau, regularizer)
        (X * torch.randn_like(X)).sum().backward()
        assert torch.isfinite(X).all() and torch.isfinite(theta.grad).all()
        assert (X >= 0).all() and (X <= 1).all()
        tolerance = 1e-6 if dtype == torch.float64 else 1e-5
        torch.testing.assert_close(X.sum(-1).double(), torch.ones(6, dtype=torch.float64), atol=tolerance, rtol=0)
