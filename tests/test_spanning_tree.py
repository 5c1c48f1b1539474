"""SpanningTree: vertices, declaration, hard argmax, exp_family_entropy relaxation, tau limits, contract."""

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


@pytest.mark.parametrize("n", [4, 5])
def test_exp_family_entropy_equals_brute_force_and_generic(n):
    P = SpanningTree(n)
    U = 3 * torch.randn(7, P.edges.shape[0], dtype=torch.float64)
    tau = 0.7
    X = sstcvx.relax(P, U, tau, "exp_family_entropy", solver="specialized")
    V = P.vertices
    brute = torch.softmax(U / tau @ V.T, -1) @ V
    torch.testing.assert_close(X, brute, atol=1e-8, rtol=0)
    # the generic path: Clarabel on the entropy problem over the vertex weights (125 exponential
    # cones at n = 5), to its tolerance: measured up to 1.4e-6 on some draws with the packages of
    # this release, hence 5e-6
    generic = sstcvx.relax(P, U, tau, "exp_family_entropy", solver="generic")
    torch.testing.assert_close(X, generic, atol=5e-6, rtol=0)
    # and its backward (the lifted problem's covariance at the solver's weights), down to tau = 0.1
    G = torch.randn_like(U)
    for t in (tau, 0.1):
        grads = []
        for solver in ("specialized", "generic"):
            u = U.clone().requires_grad_(True)
            Xs = sstcvx.relax(P, u, t, "exp_family_entropy", solver=solver)
            grads.append(torch.autograd.grad((Xs * G).sum(), u)[0])
        torch.testing.assert_close(grads[1], grads[0], atol=1e-4 if t < 0.5 else 1e-6, rtol=0)
    assert sstcvx.relax(P, U, tau, "exp_family_entropy").shape == U.shape  # auto


@pytest.mark.parametrize("n", [4, 5, 6])
def test_argmax_equals_brute_force_and_is_a_vertex(n):
    P = SpanningTree(n)
    U = torch.randn(20, P.edges.shape[0], dtype=torch.float64)
    X = sstcvx.argmax(P, U, solver="specialized")
    V = P.vertices
    torch.testing.assert_close(X, V[(U @ V.T).argmax(-1)], atol=0, rtol=0)
    assert ((X == 0) | (X == 1)).all()
    if n == 4:  # the generic LP over the declaration agrees
        torch.testing.assert_close(sstcvx.argmax(P, U[:4], solver="generic"), X[:4], atol=0, rtol=0)


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


def test_gradcheck():
    P = SpanningTree(5)
    U = torch.randn(2, 10, dtype=torch.float64, requires_grad=True)
    tau = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda u, t: sstcvx.relax(P, u, t, "exp_family_entropy"), (U, tau))


@pytest.mark.parametrize("n", [5, 12])
def test_small_tau_reaches_the_hard_argmax(n):
    P = SpanningTree(n)
    E = P.edges.shape[0]
    theta = 1e3 * (2 * torch.rand(6, E, dtype=torch.float64) - 1)
    hard = sstcvx.argmax(P, theta)
    X = sstcvx.relax(P, theta, 1e-3, "exp_family_entropy")
    torch.testing.assert_close(X, hard, atol=1e-6, rtol=0)
    torch.testing.assert_close(X.sum(-1), torch.full((6,), n - 1.0, dtype=torch.float64), atol=1e-6, rtol=0)
    # the approach on a moderate theta (close tree scores need a very small tau)
    theta = torch.randn(6, E, dtype=torch.float64)
    hard = sstcvx.argmax(P, theta)
    gaps = [(sstcvx.relax(P, theta, t, "exp_family_entropy") - hard).abs().max().item() for t in (1.0, 1e-2, 1e-4, 1e-8)]
    assert gaps[0] > 0.1 and gaps[-1] < 1e-6


@pytest.mark.parametrize("n", [4, 9])
def test_large_tau_gives_the_barycentre(n):
    P = SpanningTree(n)
    E = P.edges.shape[0]
    X = sstcvx.relax(P, torch.randn(3, E, dtype=torch.float64), 1e7, "exp_family_entropy")
    torch.testing.assert_close(X, torch.full_like(X, (n - 1) / E), atol=1e-6, rtol=0)
    X0 = sstcvx.relax(P, torch.zeros(1, E, dtype=torch.float64), 1.0, "exp_family_entropy")
    torch.testing.assert_close(X0, torch.full_like(X0, (n - 1) / E), atol=1e-12, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("tau", [1e-3, 1.0, 1e3])
def test_finite_values_and_gradients(dtype, tau):
    P = SpanningTree(10)
    theta = (1e3 * torch.randn(8, 45, dtype=dtype)).requires_grad_(True)
    X = sstcvx.sample(P, theta, tau, "exp_family_entropy", generator=torch.Generator().manual_seed(0))
    assert X.dtype == dtype and torch.isfinite(X).all()
    torch.testing.assert_close(X.double().sum(-1), torch.full((8,), 9.0, dtype=torch.float64), atol=1e-5 if dtype == torch.float32 else 1e-6, rtol=0)
    (X * torch.randn_like(X)).sum().backward()
    assert torch.isfinite(theta.grad).all()


def test_batch_shape_dtype_device():
    P = SpanningTree(5)
    U = torch.randn(2, 3, 10, dtype=torch.float32)
    for X in (sstcvx.relax(P, U, 0.5, "exp_family_entropy"), sstcvx.argmax(P, U)):
        assert X.shape == U.shape and X.dtype == U.dtype and X.device == U.device
    flat = sstcvx.relax(P, U.reshape(6, 10).double(), 0.5, "exp_family_entropy")
    torch.testing.assert_close(sstcvx.relax(P, U, 0.5, "exp_family_entropy").reshape(6, 10).double(), flat, atol=1e-6, rtol=0)
    if torch.cuda.is_available():
        Uc = U.cuda()
        assert sstcvx.relax(P, Uc, 0.5, "exp_family_entropy").device == Uc.device
        assert sstcvx.argmax(P, Uc).device == Uc.device


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
