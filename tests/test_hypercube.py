"""polytopes.Hypercube: facts of the cube (closed forms, identities, special inputs); the shared contract is tests/test_contract.py."""

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


def test_exp_family_entropy_is_the_brute_force_gibbs_marginals():
    P = Hypercube(8)
    Z = 3 * torch.randn(5, 8, dtype=torch.float64)
    V = P.vertices
    expected = torch.softmax(Z @ V.T, -1) @ V
    torch.testing.assert_close(relax(P, Z, 1.0, "exp_family_entropy"), expected, atol=1e-8, rtol=0)
    torch.testing.assert_close(relax(P, Z, 1.0, "binary_entropy"), expected, atol=1e-8, rtol=0)


@pytest.mark.parametrize("regularizer", REGULARIZERS)
def test_large_tau_gives_the_centre(regularizer):
    # argmin of f over the cube: 1/2 for the entropies and 0 for ||x||^2 / 2
    U = torch.randn(8, 6, dtype=torch.float64)
    centre = 0.0 if regularizer == "euclidean" else 0.5
    torch.testing.assert_close(relax(Hypercube(6), U, 1e7, regularizer), torch.full_like(U, centre), atol=1e-6, rtol=0)


def test_finite_utilities_whose_sum_overflows_are_accepted():
    """relax checks U / tau with one sum; a sum that overflows on finite entries must not raise."""
    X = sstcvx.relax(Hypercube(2), torch.tensor([3e38, 3e38]), tau=1.0, regularizer="binary_entropy")
    assert X.tolist() == [1.0, 1.0]
