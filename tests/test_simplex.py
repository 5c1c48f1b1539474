"""polytopes.Simplex: facts of the simplex (closed forms, identities); the shared contract is tests/test_contract.py."""

import pytest
import torch

import sstcvx
from polytopes import Simplex

REGULARIZERS = ("entropy", "euclidean", "exp_family_entropy")


def relax(P, U, tau, regularizer):
    return sstcvx.relax(P, U, tau, regularizer, solver="specialized")


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


@pytest.mark.parametrize("scale", [1e-6, 1.0, 1e4])
def test_newton_threshold_is_the_sorted_one_on_long_rows(scale):
    """Long rows take Newton's steps on the threshold instead of a sort: the same threshold to rounding, on
    random rows, on rows with ties at the top and on integer-valued rows (roots on a breakpoint)."""
    from polytopes import _kernels

    gen = torch.Generator().manual_seed(3)
    Z = scale * torch.randn(64, 300, dtype=torch.float64, generator=gen)
    Z[:8, :5] = Z[:8].amax(-1, keepdim=True)  # ties at the top
    Z[8:16] = torch.randint(-3, 4, (8, 300), generator=gen).to(torch.float64)
    assert Z.shape[-1] >= _kernels.NEWTON_FROM
    t_sorted = _kernels.sparsemax_threshold(Z)[0]
    t = _kernels.simplex_threshold(Z)
    torch.testing.assert_close(t, t_sorted, atol=4e-16 * max(scale, 1.0) * 300, rtol=0)
    X = relax(Simplex(300), Z, 1.0, "euclidean")
    # sum x = 1 to the rounding of Z - t (a tie of 5 at |Z| ~ 3e4 already gives 1.5e-11)
    torch.testing.assert_close(X.sum(-1), torch.ones(64, dtype=torch.float64), atol=1e-12 * max(scale, 1.0), rtol=0)
    torch.testing.assert_close(X, (Z - t_sorted).clamp_min(0.0), atol=4e-16 * max(scale, 1.0) * 300, rtol=0)


def test_exp_family_entropy_is_the_brute_force_gibbs_marginals():
    P = Simplex(7)
    Z = 3 * torch.randn(5, 7, dtype=torch.float64)
    V = P.vertices
    expected = torch.softmax(Z @ V.T, -1) @ V
    torch.testing.assert_close(relax(P, Z, 1.0, "exp_family_entropy"), expected, atol=1e-8, rtol=0)
    torch.testing.assert_close(relax(P, Z, 1.0, "entropy"), expected, atol=1e-8, rtol=0)


@pytest.mark.parametrize("regularizer", REGULARIZERS)
def test_large_tau_gives_the_barycentre(regularizer):
    # argmin of f over the simplex: the barycentre for both entropies and ||x||^2 alike
    U = torch.randn(8, 6, dtype=torch.float64)
    torch.testing.assert_close(relax(Simplex(6), U, 1e7, regularizer), torch.full_like(U, 1 / 6), atol=1e-6, rtol=0)
