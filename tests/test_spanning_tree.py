"""SpanningTree: vertices, declaration, general graphs, the tau limits' closed forms; the shared contract is tests/test_contract.py."""

import itertools

import numpy as np
import pytest
import torch

import sstcvx
from polytopes.spanning_tree import SpanningTree


def is_spanning_tree(x, edges, n):
    chosen = edges[x.round().bool()].tolist()
    if len(chosen) != n - 1:
        return False
    parent = list(range(n))

    def find(a):
        while parent[a] != a:
            a = parent[a]
        return a

    for i, j in chosen:
        a, b = find(i), find(j)
        if a == b:
            return False
        parent[a] = b
    return True


def subtour_violation(x, edges, n):
    """Largest violation of the spanning-tree polytope's constraints by x (E,)."""
    x = x.double()
    worst = max(float(-x.min()), float(x.max() - 1), abs(float(x.sum()) - (n - 1)))
    for size in range(2, n):
        for S in itertools.combinations(range(n), size):
            inside = torch.from_numpy(np.isin(edges.numpy(), S).all(axis=1))
            worst = max(worst, float(x[inside].sum()) - (size - 1))
    return worst


@pytest.mark.parametrize("n", [2, 3, 4, 5, 6])
def test_vertices_are_all_spanning_trees(n):
    P = SpanningTree(n)
    V = P.vertices
    E = n * (n - 1) // 2
    assert P.event_shape == (E,) and P.edges.shape == (E, 2)
    assert torch.equal(P.edges, torch.triu_indices(n, n, 1).T)
    assert V.shape == (n ** (n - 2), E)  # Cayley
    assert torch.unique(V, dim=0).shape[0] == V.shape[0]
    assert all(is_spanning_tree(v, P.edges, n) for v in V)


def test_declaration_is_the_spanning_tree_polytope():
    """The generic path with a non-EF regularizer stays inside P; LP vertices are trees."""
    n = 4
    P = SpanningTree(n)
    assert P.check(n_directions=8)
    U = 2 * torch.randn(2, 6, dtype=torch.float64)
    X = sstcvx.relax(P, U, 0.5, "entropy", solver="generic")
    assert subtour_violation(X[0], P.edges, n) <= 1e-6 and subtour_violation(X[1], P.edges, n) <= 1e-6
    # a point violating a subtour row but with the right sum is outside: the rows are there
    x, constraints = P.cvxpy_declaration()
    bad = np.array([1.0, 1.0, 0.0, 1.0, 0.0, 0.0])  # triangle 0-1-2 ... edges (0,1),(0,2),(1,2): a cycle
    x.value = bad
    assert max(float(np.max(c.violation())) for c in constraints) > 0.5


def test_declaration_size_limit_names_the_specialized_solver():
    P = SpanningTree(9)
    with pytest.raises(ValueError, match="specialized"):
        P.cvxpy_declaration()
    assert SpanningTree(12).vertices is None
    U = torch.randn(3, 66, dtype=torch.float64)
    assert sstcvx.relax(P, torch.randn(3, 36), 1.0, "exp_family_entropy").shape == (3, 36)
    assert sstcvx.argmax(SpanningTree(12), U).sum(-1).eq(11).all()


def test_the_relaxation_approaches_the_hard_tree():
    # close tree scores (theta of order 1) need a very small tau: soft at tau = 1, the hard tree at 1e-8
    P = SpanningTree(5)
    theta = torch.randn(6, 10, dtype=torch.float64)
    hard = sstcvx.argmax(P, theta)
    gaps = [
        (sstcvx.relax(P, theta, t, "exp_family_entropy") - hard).abs().max().item() for t in (1.0, 1e-2, 1e-4, 1e-8)
    ]
    assert gaps[0] > 0.1 and gaps[-1] < 1e-6


@pytest.mark.parametrize("n", [4, 9])
def test_large_tau_gives_the_barycentre(n):
    P = SpanningTree(n)
    E = P.edges.shape[0]
    X = sstcvx.relax(P, torch.randn(3, E, dtype=torch.float64), 1e7, "exp_family_entropy")
    torch.testing.assert_close(X, torch.full_like(X, (n - 1) / E), atol=1e-6, rtol=0)
    X0 = sstcvx.relax(P, torch.zeros(1, E, dtype=torch.float64), 1.0, "exp_family_entropy")
    torch.testing.assert_close(X0, torch.full_like(X0, (n - 1) / E), atol=1e-12, rtol=0)


def test_general_graph():
    edges = [[0, 1], [1, 2], [2, 3], [3, 0], [0, 2], [3, 4], [2, 4]]
    P = SpanningTree(5, edges=edges)
    assert P.event_shape == (7,)
    V = P.vertices
    assert all(is_spanning_tree(v, P.edges, 5) for v in V)
    U = torch.randn(4, 7, dtype=torch.float64)
    torch.testing.assert_close(
        sstcvx.relax(P, U, 0.5, "exp_family_entropy"), torch.softmax(U / 0.5 @ V.T, -1) @ V, atol=1e-8, rtol=0
    )
    torch.testing.assert_close(sstcvx.argmax(P, U), V[(U @ V.T).argmax(-1)], atol=0, rtol=0)
    with pytest.raises(ValueError, match="disconnected"):
        SpanningTree(5, edges=[[0, 1], [2, 3], [3, 4]])
    with pytest.raises(ValueError, match="repeated"):
        SpanningTree(3, edges=[[0, 1], [1, 0], [1, 2]])
    with pytest.raises(ValueError, match="loop"):
        SpanningTree(3, edges=[[0, 0], [0, 1], [1, 2]])
    with pytest.raises(ValueError, match="n"):
        SpanningTree(1)
