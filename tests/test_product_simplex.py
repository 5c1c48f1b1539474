"""polytopes.ProductSimplex: one item per group, against brute force, gradcheck and the generic path."""

import math

import pytest
import torch

import sstcvx
from polytopes import ProductSimplex
from sstcvx.families import families

REGULARIZERS = ("entropy", "euclidean", "exp_family_entropy")


def relax(P, U, tau, regularizer):
    return sstcvx.relax(P, U, tau, regularizer, solver="specialized")


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="groups"):
        ProductSimplex(0, 3)
    with pytest.raises(ValueError, match="items"):
        ProductSimplex(2, 0)
    with pytest.raises(TypeError, match="items"):
        ProductSimplex(3)
    with pytest.raises(ValueError, match=r"groups\[1\]"):
        ProductSimplex([2, 0])
    with pytest.raises(ValueError, match="at least one group"):
        ProductSimplex([])
    with pytest.raises(TypeError, match="groups"):
        ProductSimplex(2.0, 3)


@pytest.mark.parametrize("P", [ProductSimplex(3, 4), ProductSimplex([2, 3, 1])], ids=["regular", "ragged"])
def test_vertices_are_the_one_per_group_points(P):
    V = P.vertices
    assert V.shape[0] == math.prod(P.sizes)
    assert len(torch.unique(V.reshape(V.shape[0], -1), dim=0)) == V.shape[0]
    flat = V.reshape(V.shape[0], -1)
    for g, (a, b) in enumerate(zip(P.offsets[:-1], P.offsets[1:])):
        assert torch.equal(flat[:, a:b].sum(-1), torch.ones(V.shape[0], dtype=torch.float64)), g
    assert ((flat == 0) | (flat == 1)).all()
    # the declaration holds at every vertex and its LP optimum is a vertex
    assert float(P.linear_form().residuals(flat).max()) == 0.0
    assert ProductSimplex(20, 3).vertices is None


@pytest.mark.parametrize("P", [ProductSimplex(3, 4), ProductSimplex([2, 3, 1, 4])], ids=["regular", "ragged"])
def test_argmax_is_the_brute_force_vertex(P):
    U = torch.randn((64,) + tuple(P.event_shape), dtype=torch.float64)
    X = sstcvx.argmax(P, U, solver="specialized")
    V = P.vertices.reshape(P.vertices.shape[0], -1)
    expected = V[(U.reshape(64, -1) @ V.T).argmax(-1)].reshape(U.shape)
    assert torch.equal(X, expected)
    assert torch.equal(X[:3], sstcvx.argmax(P, U[:3], solver="generic"))


@pytest.mark.parametrize("P", [ProductSimplex(2, 3), ProductSimplex([3, 2, 4])], ids=["regular", "ragged"])
def test_exp_family_entropy_is_the_brute_force_gibbs_marginals(P):
    Z = 3 * torch.randn((5,) + tuple(P.event_shape), dtype=torch.float64)
    V = P.vertices.reshape(P.vertices.shape[0], -1)
    expected = (torch.softmax(Z.reshape(5, -1) @ V.T, -1) @ V).reshape(Z.shape)
    torch.testing.assert_close(relax(P, Z, 1.0, "exp_family_entropy"), expected, atol=1e-13, rtol=0)


@pytest.mark.parametrize("regularizer", ("entropy", "euclidean"))
@pytest.mark.parametrize("P", [ProductSimplex(2, 3), ProductSimplex([3, 2])], ids=["regular", "ragged"])
def test_agrees_with_generic_path(P, regularizer):
    U = 2 * torch.randn((3,) + tuple(P.event_shape), dtype=torch.float64)
    fast = relax(P, U, 0.7, regularizer)
    slow = sstcvx.relax(P, U, 0.7, regularizer, solver="generic")
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=0)


def test_euclidean_is_the_per_group_projection():
    # a known value per group: sparsemax([1, 0.5, -1]) = [0.75, 0.25, 0]; a group of one is always 1
    P = ProductSimplex([3, 1, 2])
    Z = torch.tensor([[1.0, 0.5, -1.0, -7.0, 2.0, 2.0]], dtype=torch.float64)
    X = relax(P, Z, 1.0, "euclidean")
    torch.testing.assert_close(
        X, torch.tensor([[0.75, 0.25, 0.0, 1.0, 0.5, 0.5]], dtype=torch.float64), atol=1e-15, rtol=0
    )


@pytest.mark.parametrize("regularizer", REGULARIZERS)
@pytest.mark.parametrize("P", [ProductSimplex(2, 4), ProductSimplex([3, 1, 2])], ids=["regular", "ragged"])
def test_gradcheck(P, regularizer):
    Z = torch.randn((2,) + tuple(P.event_shape), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z: relax(P, z, 1.0, regularizer), (Z,))


@pytest.mark.parametrize("regularizer", REGULARIZERS)
def test_dtype_shape_and_group_sums(regularizer):
    P = ProductSimplex([4, 2, 3])
    U = torch.randn(2, 5, 9, dtype=torch.float32)
    X = sstcvx.relax(P, U, 0.5, regularizer)
    assert X.shape == U.shape and X.dtype == torch.float32
    sums = torch.stack([X[..., a:b].sum(-1) for a, b in zip(P.offsets[:-1], P.offsets[1:])], -1)
    torch.testing.assert_close(sums, torch.ones_like(sums), atol=1e-6, rtol=0)
    assert (X >= 0).all()


def test_registered_family():
    family = families()["product_simplex"]
    P = family(3, 2)
    assert isinstance(P, ProductSimplex) and tuple(P.event_shape) == (3, 2)
    assert tuple(family(4).event_shape) == (4, 4)
    assert set(family.regularizers) <= set(sstcvx.registry.specialized_regularizers(P))
