"""Arborescence: vertices, declaration, other roots, masks, the tau limits' closed forms; the shared contract is tests/test_contract.py."""

import itertools

import pytest
import torch

import sstcvx
from polytopes.arborescence import Arborescence


def is_arborescence(x, n, root):
    x = x.round()
    if x.diagonal().any() or x[:, root].any():
        return False
    if not torch.equal(x.sum(0)[[v for v in range(n) if v != root]], torch.ones(n - 1, dtype=x.dtype)):
        return False
    parent = x.argmax(0).tolist()
    for v in range(n):
        seen, u = set(), v
        while u != root:
            if u in seen:
                return False
            seen.add(u)
            u = parent[u]
    return True


def polytope_violation(x, n, root):
    """Largest violation of the arborescence polytope's constraints by x (n, n)."""
    x = x.double()
    others = [v for v in range(n) if v != root]
    worst = max(float(-x.min()), float(x.diagonal().abs().max()), float(x[:, root].abs().max()))
    worst = max(worst, float((x.sum(0)[others] - 1).abs().max()))
    for size in range(2, n):
        for S in itertools.combinations(others, size):
            worst = max(worst, float(x[list(S)][:, list(S)].sum()) - (size - 1))
    return worst


@pytest.mark.parametrize("n,root", [(2, 0), (3, 1), (4, 0), (5, 4), (6, 2)])
def test_vertices_are_all_arborescences(n, root):
    A = Arborescence(n, root)
    V = A.vertices
    assert A.event_shape == (n, n)
    assert V.shape == (n ** (n - 2), n, n)  # rooted spanning arborescences of the complete digraph
    assert torch.unique(V.reshape(V.shape[0], -1), dim=0).shape[0] == V.shape[0]
    assert all(is_arborescence(v, n, root) for v in V)


@pytest.mark.parametrize("n,root", [(4, 2), (5, 3)])
def test_a_root_other_than_0(n, root):
    """The contract suite runs root 0.  Another root: brute force for the relaxation and the argmax,
    the generic path, gradcheck; the entries that do not matter (the diagonal, the root's column)
    are ignored and exactly 0."""
    A = Arborescence(n, root)
    U = 3 * torch.randn(6, n, n, dtype=torch.float64)
    tau = 0.6
    X = sstcvx.relax(A, U, tau, "exp_family_entropy", solver="specialized")
    V = A.vertices.reshape(-1, n * n)
    brute = (torch.softmax(U.reshape(6, -1) / tau @ V.T, -1) @ V).reshape(6, n, n)
    torch.testing.assert_close(X, brute, atol=1e-8, rtol=0)
    best = V[(U.reshape(6, -1) @ V.T).argmax(-1)].reshape(6, n, n)
    torch.testing.assert_close(sstcvx.argmax(A, U, solver="specialized"), best, atol=0, rtol=0)
    # ignored entries: diagonal and the root's column do not matter and are exactly 0
    U2 = U.clone()
    U2[:, :, root] = 1e3 * torch.randn(6, n, dtype=torch.float64)
    U2.diagonal(dim1=-2, dim2=-1).copy_(-1e3)
    X2 = sstcvx.relax(A, U2, tau, "exp_family_entropy")
    torch.testing.assert_close(X2, X, atol=1e-12, rtol=0)
    assert (X[:, :, root] == 0).all() and (X.diagonal(dim1=-2, dim2=-1) == 0).all()
    if n == 4:
        torch.testing.assert_close(
            X, sstcvx.relax(A, U, tau, "exp_family_entropy", solver="generic"), atol=1e-6, rtol=0
        )
        u = U[:2].clone().requires_grad_(True)
        assert torch.autograd.gradcheck(lambda u: sstcvx.relax(A, u, 0.9, "exp_family_entropy"), (u,))


def test_declaration_is_the_arborescence_polytope():
    n, root = 4, 1
    A = Arborescence(n, root)
    assert A.check(n_directions=8)
    U = 2 * torch.randn(2, n, n, dtype=torch.float64)
    X = sstcvx.relax(A, U, 0.5, "entropy", solver="generic")
    assert polytope_violation(X[0], n, root) <= 1e-6 and polytope_violation(X[1], n, root) <= 1e-6
    # a 2-cycle 2 -> 3 -> 2 plus 1 -> 0 has unit in-degrees but violates the subset row {2, 3}
    x, constraints = A.cvxpy_declaration()
    bad = torch.zeros(n, n, dtype=torch.float64)
    bad[1, 0] = bad[2, 3] = bad[3, 2] = 1
    x.value = bad.numpy()
    assert max(float(c.violation().max()) for c in constraints) > 0.5


def test_declaration_size_limit_names_the_specialized_solver():
    with pytest.raises(ValueError, match="specialized"):
        Arborescence(9).cvxpy_declaration()
    assert Arborescence(12).vertices is None


@pytest.mark.parametrize("n", [4, 9])
def test_large_tau_gives_the_barycentre(n):
    """Uniform arborescences: an edge {r, d} lies in 2/n of the trees of K_n, so the root's arcs
    have marginal 2/n and every other in-arc (1 - 2/n)/(n - 2) = 1/n (not 1/(n - 1))."""
    A = Arborescence(n, root=1)
    X = sstcvx.relax(A, torch.randn(3, n, n, dtype=torch.float64), 1e7, "exp_family_entropy")
    expected = A.arcs.double() / n
    expected[1] *= 2
    torch.testing.assert_close(X, expected.expand_as(X), atol=1e-6, rtol=0)
    if A.vertices is not None:
        torch.testing.assert_close(A.vertices.mean(0), expected, atol=1e-12, rtol=0)


def test_masked_digraph():
    mask = torch.tensor(
        [[0, 1, 1, 0, 0], [0, 0, 1, 1, 0], [0, 1, 0, 1, 1], [0, 0, 0, 0, 1], [0, 1, 0, 1, 0]], dtype=torch.bool
    )
    A = Arborescence(5, 0, mask=mask)
    V = A.vertices
    assert len(V) > 1 and all(is_arborescence(v, 5, 0) for v in V) and (V[:, ~A.arcs] == 0).all()
    U = torch.randn(4, 5, 5, dtype=torch.float64)
    brute = (torch.softmax(U.reshape(4, -1) @ V.reshape(len(V), -1).T, -1) @ V.reshape(len(V), -1)).reshape(4, 5, 5)
    torch.testing.assert_close(sstcvx.relax(A, U, 1.0, "exp_family_entropy"), brute, atol=1e-8, rtol=0)
    best = V[(U.reshape(4, -1) @ V.reshape(len(V), -1).T).argmax(-1)]
    torch.testing.assert_close(sstcvx.argmax(A, U), best, atol=0, rtol=0)
    with pytest.raises(ValueError, match="reached"):
        Arborescence(3, 0, mask=torch.tensor([[0, 1, 0], [0, 0, 0], [0, 0, 0]], dtype=torch.bool))
    with pytest.raises(ValueError, match="root"):
        Arborescence(3, root=3)
