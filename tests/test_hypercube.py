"""polytopes.Hypercube: threshold argmax, sigmoid, clamp, Gibbs marginals against brute force and the generic path."""

import pytest
import torch

import sstcvx
from polytopes import Hypercube

REGULARIZERS = ("binary_entropy", "euclidean", "exp_family_entropy")


def relax(P, U, tau, regularizer):
    return sstcvx.relax(P, U, tau, regularizer, solver="specialized")


def test_rejects_bad_sizes():
    with pytest.raises(ValueError, match="n"):
        Hypercube(0)
    with pytest.raises(TypeError, match="n"):
        Hypercube("3")


def test_vertices_are_all_bit_vectors():
    V = Hypercube(4).vertices
    assert V.shape == (16, 4) and V.dtype == torch.float64
    assert torch.unique(V, dim=0).shape[0] == 16 and ((V == 0) | (V == 1)).all()
    assert Hypercube(20).vertices is None


def test_argmax_is_the_brute_force_vertex():
    P = Hypercube(5)
    U = torch.randn(64, 5, dtype=torch.float64)
    X = sstcvx.argmax(P, U, solver="specialized")
    V = P.vertices
    assert torch.equal(X, V[(U @ V.T).argmax(-1)])
    assert ((X.unsqueeze(1) == V).all(-1).sum(-1) == 1).all()
    assert torch.equal(X[:4], sstcvx.argmax(P, U[:4], solver="generic"))


@pytest.mark.parametrize("regularizer", REGULARIZERS)
def test_agrees_with_generic_path(regularizer):
    P = Hypercube(5)
    U = 2 * torch.randn(3, 5, dtype=torch.float64)
    fast = relax(P, U, 0.7, regularizer)
    slow = sstcvx.relax(P, U, 0.7, regularizer, solver="generic")
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=0)


def test_exp_family_entropy_is_the_brute_force_gibbs_marginals():
    P = Hypercube(8)
    Z = 3 * torch.randn(5, 8, dtype=torch.float64)
    V = P.vertices
    expected = torch.softmax(Z @ V.T, -1) @ V
    torch.testing.assert_close(relax(P, Z, 1.0, "exp_family_entropy"), expected, atol=1e-8, rtol=0)
    torch.testing.assert_close(relax(P, Z, 1.0, "binary_entropy"), expected, atol=1e-8, rtol=0)


@pytest.mark.parametrize("regularizer", REGULARIZERS)
def test_gradcheck(regularizer):
    P = Hypercube(5)
    U = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda u: relax(P, u, 0.5, regularizer), (U,))


@pytest.mark.parametrize("regularizer", REGULARIZERS)
def test_tau_limits(regularizer):
    P = Hypercube(6)
    U = torch.randn(8, 6, dtype=torch.float64)
    U = U + 0.1 * U.sign()  # |U| >= 0.1: the hard bits are decided with a margin
    torch.testing.assert_close(relax(P, U, 1e-3, regularizer), sstcvx.argmax(P, U), atol=1e-12, rtol=0)
    # tau -> infinity: argmin of f over the cube, 1/2 for the entropies and 0 for ||x||^2 / 2
    centre = 0.0 if regularizer == "euclidean" else 0.5
    torch.testing.assert_close(relax(P, U, 1e7, regularizer), torch.full_like(U, centre), atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch", [(), (3,), (2, 3)])
def test_batch_shape_and_dtype_preserved(batch, dtype):
    P = Hypercube(4)
    U = torch.randn(*batch, 4, dtype=dtype)
    for X in [relax(P, U, 0.5, r) for r in REGULARIZERS] + [sstcvx.argmax(P, U)]:
        assert X.shape == U.shape and X.dtype == dtype and X.device == U.device


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("regularizer", REGULARIZERS)
def test_robust_to_extreme_utilities(regularizer, dtype):
    P = Hypercube(30)
    for tau in (1e-3, 1.0, 1e3):
        theta = (1e3 * torch.randn(6, 30, dtype=dtype)).requires_grad_(True)
        X = relax(P, theta, tau, regularizer)
        (X * torch.randn_like(X)).sum().backward()
        assert torch.isfinite(X).all() and torch.isfinite(theta.grad).all()
        assert (X >= 0).all() and (X <= 1).all()
    hard = sstcvx.argmax(P, theta.detach())
    torch.testing.assert_close(relax(P, theta.detach(), 1e-3, regularizer), hard, atol=1e-6, rtol=0)


def test_finite_utilities_whose_sum_overflows_are_accepted():
    """relax checks U / tau with one sum; a sum that overflows on finite entries must not raise."""
    X = sstcvx.relax(Hypercube(2), torch.tensor([3e38, 3e38]), tau=1.0, regularizer="binary_entropy")
    assert X.tolist() == [1.0, 1.0]
