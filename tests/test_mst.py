"""Tests of the tree hard samplers in polytopes/_mst.py.

Witnesses: networkx (maximum_spanning_tree, maximum_spanning_arborescence) and
brute-force enumeration for small n; structural validity of every output; masks;
dtype/shape/device contract; wide magnitudes; ties; input validation.
"""

import itertools

import networkx as nx
import pytest
import torch

from polytopes._mst import maximum_arborescence, maximum_spanning_tree

# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #


def sym(x):
    return x + x.transpose(-1, -2)


def nx_mst(W, mask=None):
    """networkx maximum spanning tree of one (n, n) matrix -> (n, n) adjacency."""
    n = W.shape[-1]
    G = nx.Graph()
    G.add_nodes_from(range(n))
    G.add_weighted_edges_from(
        (i, j, float(W[i, j])) for i in range(n) for j in range(i + 1, n) if mask is None or mask[i, j]
    )
    Y = torch.zeros(n, n, dtype=torch.float64)
    for i, j in nx.maximum_spanning_tree(G).edges:
        Y[i, j] = Y[j, i] = 1
    return Y


def nx_arb(S, root, mask=None):
    n = S.shape[-1]
    G = nx.DiGraph()
    G.add_nodes_from(range(n))
    G.add_weighted_edges_from(
        (h, d, float(S[h, d]))
        for h in range(n)
        for d in range(n)
        if h != d and d != root and (mask is None or mask[h, d])
    )
    Y = torch.zeros(n, n, dtype=torch.float64)
    if n > 1:
        for h, d in nx.algorithms.tree.branchings.maximum_spanning_arborescence(G).edges:
            Y[h, d] = 1
    return Y


def assert_spanning_tree(X, mask=None):
    """X (n, n): a 0/1 symmetric adjacency of a spanning tree (inside mask)."""
    n = X.shape[-1]
    assert torch.all((X == 0) | (X == 1))
    assert torch.equal(X, X.T)
    assert torch.all(X.diagonal() == 0)
    assert int(X.sum()) == 2 * (n - 1)
    if mask is not None:
        assert not torch.any((X == 1) & ~mask)
    G = nx.from_numpy_array(X.double().numpy())
    assert nx.is_connected(G) if n > 0 else True


def assert_arborescence(X, root, mask=None):
    """X (n, n): x[h, d] = 1 for the arcs of a spanning arborescence at root."""
    n = X.shape[-1]
    assert torch.all((X == 0) | (X == 1))
    assert torch.all(X.diagonal() == 0)
    assert torch.all(X[:, root] == 0)
    indeg = X.sum(0)
    for d in range(n):
        assert int(indeg[d]) == (0 if d == root else 1)
    if mask is not None:
        assert not torch.any((X == 1) & ~mask)
    head = X.argmax(0)
    for d in range(n):  # following heads from any vertex reaches the root
        v, steps = d, 0
        while v != root:
            v = int(head[v])
            steps += 1
            assert steps < n, "cycle in the head assignment"


def brute_arborescence_max(S, root):
    """max total score over all head assignments that form an arborescence."""
    n = S.shape[-1]
    others = [v for v in range(n) if v != root]
    best = None
    for heads in itertools.product(range(n), repeat=len(others)):
        head = dict(zip(others, heads))
        if any(h == d for d, h in head.items()):
            continue
        ok = True
        for d in others:
            v, steps = d, 0
            while v != root and steps < n:
                v, steps = head[v], steps + 1
            if v != root:
                ok = False
                break
        if ok:
            w = sum(float(S[h, d]) for d, h in head.items())
            best = w if best is None else max(best, w)
    return best


def brute_tree_max(W):
    n = W.shape[-1]
    edges = [(i, j) for i in range(n) for j in range(i + 1, n)]
    best = None
    for T in itertools.combinations(edges, n - 1):
        G = nx.Graph(list(T))
        G.add_nodes_from(range(n))
        if nx.is_connected(G):
            w = sum(float(W[i, j]) for i, j in T)
            best = w if best is None else max(best, w)
    return best


def total(X, S):
    return float((X.double() * S.double()).sum())


# --------------------------------------------------------------------------- #
# spanning trees
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("n", range(2, 13))
def test_mst_equals_networkx(n):
    g = torch.Generator().manual_seed(100 + n)
    W = sym(torch.randn(8, n, n, generator=g, dtype=torch.float64))
    X = maximum_spanning_tree(W)
    for b in range(8):
        assert_spanning_tree(X[b])
        assert torch.equal(X[b], nx_mst(W[b]))  # distinct weights: unique tree


@pytest.mark.parametrize("n", [2, 3, 4, 5])
def test_mst_equals_brute_force(n):
    g = torch.Generator().manual_seed(7 * n)
    W = sym(torch.rand(6, n, n, generator=g, dtype=torch.float64))
    X = maximum_spanning_tree(W)
    for b in range(6):
        assert total(X[b], W[b]) / 2 == pytest.approx(brute_tree_max(W[b]), abs=1e-12)


def test_mst_tied_weights():
    g = torch.Generator().manual_seed(3)
    for n in (2, 5, 9, 12):
        W = sym(torch.randint(0, 3, (10, n, n), generator=g).double())
        X = maximum_spanning_tree(W)
        for b in range(10):
            assert_spanning_tree(X[b])
            assert total(X[b], W[b]) == total(nx_mst(W[b]), W[b])
        Z = torch.zeros(2, n, n)  # all weights equal: any spanning tree
        for Xb in maximum_spanning_tree(Z):
            assert_spanning_tree(Xb)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mst_wide_magnitudes(dtype):
    g = torch.Generator().manual_seed(11)
    n = 10
    mag = 10.0 ** (torch.rand(6, n, n, generator=g, dtype=torch.float64) * 9 - 3)
    sign = torch.where(torch.rand(6, n, n, generator=g) < 0.5, -1.0, 1.0).double()
    W = (mag * sign).triu(1)
    W = (W + W.transpose(-1, -2)).to(dtype)
    X = maximum_spanning_tree(W)
    assert X.dtype == dtype
    for b in range(6):
        assert_spanning_tree(X[b])
        assert torch.equal(X[b].double(), nx_mst(W[b]))


def test_mst_mask_matches_networkx():
    g = torch.Generator().manual_seed(5)
    n = 9
    for _trial in range(6):
        M = torch.rand(n, n, generator=g) < 0.35
        M = M | M.T
        perm = torch.randperm(n, generator=g)  # a Hamiltonian path keeps it connected
        M[perm[:-1], perm[1:]] = True
        M[perm[1:], perm[:-1]] = True
        W = sym(torch.randn(4, n, n, generator=g, dtype=torch.float64))
        W = torch.where(M, W, torch.full_like(W, float("nan")))  # ignored entries
        X = maximum_spanning_tree(W, mask=M)
        for b in range(4):
            assert_spanning_tree(X[b], mask=M)
            assert torch.equal(X[b], nx_mst(W[b], mask=M))


def test_mst_mask_forbids_best_edges_and_batched_mask():
    n = 6
    W = sym(torch.randn(3, n, n, dtype=torch.float64))
    W[:, 0, 1] = W[:, 1, 0] = 100.0
    M = torch.ones(3, n, n, dtype=torch.bool)
    M[1, 0, 1] = M[1, 1, 0] = False
    X = maximum_spanning_tree(W, mask=M)
    assert X[0, 0, 1] == 1 and X[2, 0, 1] == 1 and X[1, 0, 1] == 0
    for b in range(3):
        assert torch.equal(X[b], nx_mst(W[b], mask=M[b]))


def test_mst_disconnected_mask_raises_naming_element():
    n = 6
    M = torch.ones(4, n, n, dtype=torch.bool)
    M[2, :3, 3:] = False
    M[2, 3:, :3] = False
    W = sym(torch.randn(4, n, n))
    with pytest.raises(ValueError, match=r"disconnected.*batch element 2"):
        maximum_spanning_tree(W, mask=M)
    with pytest.raises(ValueError, match="disconnected"):
        maximum_spanning_tree(W, mask=M[2])


def test_mst_shapes_and_trivial_sizes():
    W = sym(torch.randn(2, 3, 7, 7))
    X = maximum_spanning_tree(W)
    assert X.shape == (2, 3, 7, 7) and X.dtype == W.dtype
    assert torch.equal(X.reshape(6, 7, 7), maximum_spanning_tree(W.reshape(6, 7, 7)))
    assert torch.equal(maximum_spanning_tree(W[1, 2]), X[1, 2])  # unbatched
    assert torch.equal(maximum_spanning_tree(torch.randn(4, 1, 1)), torch.zeros(4, 1, 1))
    assert maximum_spanning_tree(torch.randn(0, 5, 5)).shape == (0, 5, 5)


def test_mst_diagonal_ignored():
    W = sym(torch.randn(5, 8, 8))
    W2 = W.clone()
    W2.diagonal(dim1=-2, dim2=-1).fill_(float("nan"))
    assert torch.equal(maximum_spanning_tree(W), maximum_spanning_tree(W2))


def test_mst_validation():
    with pytest.raises(TypeError, match="weights"):
        maximum_spanning_tree([[0.0, 1.0], [1.0, 0.0]])
    with pytest.raises(TypeError, match="weights"):
        maximum_spanning_tree(torch.ones(2, 3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="weights"):
        maximum_spanning_tree(torch.randn(5))
    with pytest.raises(ValueError, match=r"weights.*\(2, 3, 4\)"):
        maximum_spanning_tree(torch.randn(2, 3, 4))
    W = sym(torch.randn(3, 4, 4))
    W[1, 0, 2] = W[1, 2, 0] = float("inf")
    with pytest.raises(ValueError, match=r"weights.*finite.*batch element 1"):
        maximum_spanning_tree(W)
    W = sym(torch.randn(3, 4, 4))
    W[2, 0, 3] += 1.0
    with pytest.raises(ValueError, match=r"weights.*symmetric.*batch element 2"):
        maximum_spanning_tree(W)
    W = sym(torch.randn(3, 4, 4))
    with pytest.raises(TypeError, match="mask"):
        maximum_spanning_tree(W, mask=torch.ones(4, 4))
    with pytest.raises(ValueError, match="mask"):
        maximum_spanning_tree(W, mask=torch.ones(5, 5, dtype=torch.bool))
    M = torch.ones(4, 4, dtype=torch.bool)
    M[0, 1] = False
    with pytest.raises(ValueError, match=r"mask.*symmetric"):
        maximum_spanning_tree(W, mask=M)


# --------------------------------------------------------------------------- #
# arborescences
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("n", range(2, 13))
def test_arborescence_equals_networkx(n):
    g = torch.Generator().manual_seed(200 + n)
    S = torch.randn(8, n, n, generator=g, dtype=torch.float64)
    for root in sorted({0, n // 2, n - 1}):
        X = maximum_arborescence(S, root=root)
        for b in range(8):
            assert_arborescence(X[b], root)
            assert torch.equal(X[b], nx_arb(S[b], root))  # distinct: unique optimum


@pytest.mark.parametrize("n", [2, 3, 4, 5])
def test_arborescence_equals_brute_force(n):
    g = torch.Generator().manual_seed(31 * n)
    S = torch.randn(6, n, n, generator=g, dtype=torch.float64)
    for root in (0, n - 1):
        X = maximum_arborescence(S, root=root)
        for b in range(6):
            assert_arborescence(X[b], root)
            assert total(X[b], S[b]) == pytest.approx(brute_arborescence_max(S[b], root), abs=1e-12)
    # integer scores with many ties: still a maximum arborescence, exactly
    T = torch.randint(-2, 3, (6, n, n), generator=g).double()
    X = maximum_arborescence(T)
    for b in range(6):
        assert_arborescence(X[b], 0)
        assert total(X[b], T[b]) == brute_arborescence_max(T[b], 0)


def test_arborescence_tied_scores_larger_n():
    g = torch.Generator().manual_seed(9)
    for n in (6, 10, 14):
        T = torch.randint(0, 3, (10, n, n), generator=g).double()
        X = maximum_arborescence(T, root=1)
        for b in range(10):
            assert_arborescence(X[b], 1)
            assert total(X[b], T[b]) == total(nx_arb(T[b], 1), T[b])
        for Xb in maximum_arborescence(torch.zeros(2, n, n)):
            assert_arborescence(Xb, 0)


def nested_cycles(n):
    """Scores whose contractions nest n - 2 levels deep: 1 <-> 2 is the first
    cycle, and the k-th supervertex {1..k+1} then forms a cycle with k + 2."""
    S = torch.full((n, n), -1000.0, dtype=torch.float64)
    S[0, 1:] = -500.0
    S[1, 2] = S[2, 1] = 100.0
    for k in range(3, n):
        S[k - 1, k] = 50.0
        S[k, 1] = 99.0 - 0.01 * k
    return S


def test_arborescence_deep_nesting():
    """Many contraction rounds, in a batch whose other elements finish early,
    also with the vertices relabelled (cycle representatives change)."""
    n = 12
    g = torch.Generator().manual_seed(1)
    S = nested_cycles(n)
    perm = torch.cat([torch.tensor([0]), torch.randperm(n - 1, generator=g) + 1])
    batch = torch.stack(
        [
            S,
            torch.randn(n, n, generator=g, dtype=torch.float64),
            S[perm][:, perm],
            torch.randn(n, n, generator=g, dtype=torch.float64),
        ]
    )
    X = maximum_arborescence(batch)
    for b in range(4):
        assert_arborescence(X[b], 0)
        assert torch.equal(X[b], nx_arb(batch[b], 0))
    # the optimum: 0 -> 3 -> 1 -> 2 and the chain 3 -> 4 -> ... -> n-1
    heads = {1: 3, 2: 1, 3: 0, **{k: k - 1 for k in range(4, n)}}
    assert all(X[0, h, d] == 1 for d, h in heads.items())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_arborescence_wide_magnitudes(dtype):
    g = torch.Generator().manual_seed(13)
    n = 11
    mag = 10.0 ** (torch.rand(8, n, n, generator=g, dtype=torch.float64) * 9 - 3)
    sign = torch.where(torch.rand(8, n, n, generator=g) < 0.5, -1.0, 1.0).double()
    S = (mag * sign).to(dtype)
    X = maximum_arborescence(S, root=3)
    assert X.dtype == dtype
    for b in range(8):
        assert_arborescence(X[b], 3)
        assert torch.equal(X[b].double(), nx_arb(S[b], 3))


def test_arborescence_mask():
    g = torch.Generator().manual_seed(17)
    n = 9
    for _trial in range(5):
        M = torch.rand(n, n, generator=g) < 0.3
        perm = torch.randperm(n - 1, generator=g) + 1  # path root -> ... keeps it feasible
        order = torch.cat([torch.tensor([0]), perm])
        M[order[:-1], order[1:]] = True
        S = torch.randn(4, n, n, generator=g, dtype=torch.float64)
        S = torch.where(M, S, torch.full_like(S, float("nan")))
        X = maximum_arborescence(S, mask=M)
        for b in range(4):
            assert_arborescence(X[b], 0, mask=M)
            assert torch.equal(X[b], nx_arb(S[b], 0, mask=M))


def test_arborescence_unreachable_raises_naming_element():
    n = 5
    M = torch.ones(3, n, n, dtype=torch.bool)
    M[1, :, 4] = False  # nothing enters vertex 4
    S = torch.randn(3, n, n)
    with pytest.raises(ValueError, match=r"arborescence.*batch element 1"):
        maximum_arborescence(S, mask=M)
    M = torch.ones(n, n, dtype=torch.bool)
    M[0, :] = False  # the root has no outgoing arc
    with pytest.raises(ValueError, match="arborescence"):
        maximum_arborescence(S, mask=M)


def test_arborescence_ignores_diagonal_and_root_column():
    S = torch.randn(6, 7, 7)
    S2 = S.clone()
    S2.diagonal(dim1=-2, dim2=-1).fill_(float("nan"))
    S2[..., :, 2] = float("inf")
    assert torch.equal(maximum_arborescence(S, root=2), maximum_arborescence(S2, root=2))


def test_arborescence_shapes_and_trivial_sizes():
    S = torch.randn(2, 3, 6, 6)
    X = maximum_arborescence(S, root=5)
    assert X.shape == (2, 3, 6, 6) and X.dtype == S.dtype
    assert torch.equal(X.reshape(6, 6, 6), maximum_arborescence(S.reshape(6, 6, 6), 5))
    assert torch.equal(maximum_arborescence(S[0, 1], 5), X[0, 1])  # unbatched
    assert torch.equal(maximum_arborescence(torch.randn(3, 1, 1)), torch.zeros(3, 1, 1))
    assert maximum_arborescence(torch.randn(0, 4, 4)).shape == (0, 4, 4)
    X2 = maximum_arborescence(torch.randn(5, 2, 2), root=1)
    assert torch.equal(X2, torch.tensor([[0.0, 0.0], [1.0, 0.0]]).expand(5, 2, 2))


def test_arborescence_validation():
    with pytest.raises(TypeError, match="scores"):
        maximum_arborescence(torch.ones(2, 3, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="scores"):
        maximum_arborescence(torch.randn(3, 4, 5))
    with pytest.raises(ValueError, match="root"):
        maximum_arborescence(torch.randn(3, 4, 4), root=4)
    with pytest.raises(ValueError, match="root"):
        maximum_arborescence(torch.randn(3, 4, 4), root=-1)
    with pytest.raises(TypeError, match="root"):
        maximum_arborescence(torch.randn(3, 4, 4), root=1.0)
    with pytest.raises(TypeError, match="root"):
        maximum_arborescence(torch.randn(3, 4, 4), root=True)
    S = torch.randn(3, 4, 4)
    S[2, 1, 3] = float("nan")
    with pytest.raises(ValueError, match=r"scores.*finite.*batch element 2"):
        maximum_arborescence(S)
    with pytest.raises(TypeError, match="mask"):
        maximum_arborescence(torch.randn(3, 4, 4), mask=torch.ones(4, 4, dtype=torch.int64))


# --------------------------------------------------------------------------- #
# a larger batch through the lockstep paths, and the device contract
# --------------------------------------------------------------------------- #


def test_large_batch_against_networkx():
    g = torch.Generator().manual_seed(23)
    n = 20
    S = torch.randn(48, n, n, generator=g)
    X = maximum_arborescence(S)
    T = maximum_spanning_tree(sym(S))
    for b in range(48):
        assert torch.equal(X[b].double(), nx_arb(S[b], 0))
        assert torch.equal(T[b].double(), nx_mst(sym(S)[b]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    g = torch.Generator().manual_seed(29)
    S = torch.randn(64, 15, 15, generator=g)
    for f, x in ((maximum_arborescence, S), (maximum_spanning_tree, sym(S))):
        Y = f(x.cuda())
        assert Y.device.type == "cuda"
        assert torch.equal(Y.cpu(), f(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_arborescence_large_scores_close_reduced_costs(dtype):
    """Reduced scores 2e-3 - 1e6 and 1e-3 - 1e6 differ by less than a float32
    ulp of 1e6: they must be compared in a wider type to pick 0 -> 1."""
    S = torch.zeros(3, 3, dtype=dtype)
    S[1, 2] = S[2, 1] = 1e6
    S[0, 1], S[0, 2] = 2e-3, 1e-3
    X = maximum_arborescence(S)
    assert_arborescence(X, 0)
    assert total(X, S) == brute_arborescence_max(S.double(), 0)
    assert X[0, 1] == 1 and X[1, 2] == 1


def test_inputs_requiring_grad_are_not_modified():
    S = torch.randn(4, 6, 6, requires_grad=True)
    W = sym(S.detach()).requires_grad_()
    S_copy, W_copy = S.detach().clone(), W.detach().clone()
    X, T = maximum_arborescence(S), maximum_spanning_tree(W)
    assert not X.requires_grad and not T.requires_grad
    assert torch.equal(S.detach(), S_copy) and torch.equal(W.detach(), W_copy)
    assert torch.equal(X, maximum_arborescence(S_copy))
