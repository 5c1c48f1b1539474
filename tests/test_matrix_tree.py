"""polytopes._matrix_tree: Matrix-Tree log-partitions and marginals against brute force,
the log-determinant reference, each other (fast vs stable), and at extreme spreads."""

import pytest
import torch

import sstcvx
from polytopes import _matrix_tree as mt
from polytopes import _matrix_tree_fast as fast
from polytopes import _matrix_tree_graphs as graphs
from polytopes.arborescence import Arborescence
from polytopes.spanning_tree import SpanningTree

METHODS = ("fast", "stable", "auto")


@pytest.fixture(autouse=True)
def _one_thread():
    """These tests run many tiny batched ops, whose time on a busy machine is mostly intra-op
    thread wake-ups (a 2 × 25 matmul measured 40 ms with two threads under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def gibbs(V, Z):
    """Brute-force marginals softmax(V Z)ᵀ V and log-partition over the vertex list V (m, *event)."""
    Vf = V.reshape(V.shape[0], -1)
    scores = Z.reshape(Z.shape[0], -1) @ Vf.T
    return (torch.softmax(scores, -1) @ Vf).reshape(Z.shape), torch.logsumexp(scores, -1)


def clustered_edges(B, n, strength, generator=None):
    """K_n edge scores: strong (strength) inside three random clusters, weak (0) across; κ ~ e^strength."""
    edges = torch.triu_indices(n, n, 1).T
    lab = torch.randint(0, 3, (B, n), generator=generator)
    same = (lab[:, edges[:, 0]] == lab[:, edges[:, 1]]).double()
    return strength * same + torch.randn(B, len(edges), dtype=torch.float64, generator=generator), edges


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("n", [4, 5])
def test_spanning_tree_brute_force(n, method):
    P = SpanningTree(n)
    Z = 2 * torch.randn(6, P.edges.shape[0], dtype=torch.float64)
    mu_bf, logz_bf = gibbs(P.vertices, Z)
    mu = mt.spanning_tree_marginals(Z, P.edges, n, method=method)
    torch.testing.assert_close(mu, mu_bf, atol=1e-8, rtol=0)
    torch.testing.assert_close(mt.spanning_tree_log_partition(Z, P.edges, n, method=method), logz_bf, atol=1e-8, rtol=0)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("n,root", [(4, 0), (4, 2), (5, 4), (5, 1)])
def test_arborescence_brute_force(n, root, method):
    A = Arborescence(n, root)
    Z = 2 * torch.randn(6, n, n, dtype=torch.float64)
    mu_bf, logz_bf = gibbs(A.vertices, Z)
    torch.testing.assert_close(mt.arborescence_marginals(Z, root, method=method), mu_bf, atol=1e-8, rtol=0)
    torch.testing.assert_close(mt.arborescence_log_partition(Z, root, method=method), logz_bf, atol=1e-8, rtol=0)


@pytest.mark.parametrize("method", METHODS)
def test_general_graph_and_mask_brute_force(method):
    edges = torch.tensor([[0, 1], [1, 2], [2, 3], [3, 4], [0, 4], [1, 3], [0, 2]])
    P = SpanningTree(5, edges=edges)
    Z = 2 * torch.randn(5, len(edges), dtype=torch.float64)
    torch.testing.assert_close(
        mt.spanning_tree_marginals(Z, P.edges, 5, method=method), gibbs(P.vertices, Z)[0], atol=1e-8, rtol=0
    )
    mask = torch.rand(5, 5) < 0.6
    mask[0, 1:] = True  # reachable from the root
    A = Arborescence(5, root=0, mask=mask)
    Zd = 2 * torch.randn(5, 5, 5, dtype=torch.float64)
    mu = mt.arborescence_marginals(Zd, 0, mask=mask, method=method)
    torch.testing.assert_close(mu, gibbs(A.vertices, Zd)[0], atol=1e-8, rtol=0)
    assert (mu[:, ~A.arcs] == 0).all()


@pytest.mark.parametrize("n", [10, 30])
def test_fast_stable_and_logdet_reference_agree(n):
    edges = torch.triu_indices(n, n, 1).T
    Z = torch.randn(8, len(edges), dtype=torch.float64, requires_grad=True)
    fast = mt.spanning_tree_marginals(Z, edges, n, method="fast")
    stable = mt.spanning_tree_marginals(Z, edges, n, method="stable")
    torch.testing.assert_close(fast, stable, atol=1e-10, rtol=0)
    # the naive reference: autograd of slogdet of the reduced Laplacian
    W = torch.zeros(8, n, n, dtype=torch.float64)
    W[:, edges[:, 0], edges[:, 1]] = Z.exp()
    W = W + W.mT
    L = torch.diag_embed(W.sum(-1)) - W
    (ref,) = torch.autograd.grad(torch.linalg.slogdet(L[:, 1:, 1:])[1].sum(), Z, create_graph=True)
    torch.testing.assert_close(fast, ref, atol=1e-10, rtol=0)
    # the analytic backward of the fast path equals autograd of autograd (stable) and of slogdet
    G = torch.randn_like(fast)
    (g_fast,) = torch.autograd.grad((fast * G).sum(), Z)
    (g_stable,) = torch.autograd.grad((stable * G).sum(), Z)
    (g_ref,) = torch.autograd.grad((ref * G).sum(), Z)
    torch.testing.assert_close(g_fast, g_stable, atol=1e-10, rtol=0)
    torch.testing.assert_close(g_fast, g_ref, atol=1e-10, rtol=0)
    # directed, root in the middle (exercises the permutation)
    Zd = torch.randn(8, n, n, dtype=torch.float64, requires_grad=True)
    a = mt.arborescence_marginals(Zd, n // 2, method="fast")
    b = mt.arborescence_marginals(Zd, n // 2, method="stable")
    torch.testing.assert_close(a, b, atol=1e-10, rtol=0)
    G = torch.randn_like(a)
    torch.testing.assert_close(
        torch.autograd.grad((a * G).sum(), Zd)[0], torch.autograd.grad((b * G).sum(), Zd)[0], atol=1e-10, rtol=0
    )


def test_auto_falls_back_where_the_inverse_is_inaccurate():
    """Clustered weights make L̂ ill-conditioned: the plain inverse loses digits, auto must not."""
    g = torch.Generator().manual_seed(1)
    Z, edges = clustered_edges(16, 12, 32.0, generator=g)
    Z[:8] = torch.randn(8, Z.shape[1], dtype=torch.float64, generator=g)  # half well conditioned
    exact = mt.spanning_tree_marginals(Z, edges, 12, method="stable")
    fast = mt.spanning_tree_marginals(Z, edges, 12, method="fast")
    auto = mt.spanning_tree_marginals(Z, edges, 12, method="auto")
    assert (fast - exact).abs().max() > 1e-6  # the hazard is real on this input
    torch.testing.assert_close(auto, exact, atol=1e-10, rtol=0)
    torch.testing.assert_close(auto.sum(-1), torch.full((16,), 11.0, dtype=torch.float64), atol=1e-9, rtol=0)
    logz = mt.spanning_tree_log_partition(Z, edges, 12)
    torch.testing.assert_close(
        logz, mt.spanning_tree_log_partition(Z, edges, 12, method="stable"), atol=1e-9, rtol=1e-12
    )


@pytest.mark.parametrize("n,root", [(6, 0), (12, 5)])
def test_arborescence_auto_falls_back_per_element(n, root):
    """Clustered arc scores make the directed L̂ ill-conditioned: the screen sends exactly those
    elements to the log-space path, the well-conditioned ones stay on the inverse path."""
    g = torch.Generator().manual_seed(n)
    lab = torch.randint(0, 3, (8, n), generator=g)
    Zd = 32.0 * (lab.unsqueeze(-1) == lab.unsqueeze(-2)).double() + torch.randn(
        8, n, n, dtype=torch.float64, generator=g
    )
    Zd[:4] = torch.randn(4, n, n, dtype=torch.float64, generator=g)  # well conditioned
    Zc, D = mt._arb_prepare(Zd, root, None)
    ok = fast.FastArborescenceMarginals.apply(Zc, D, True)[1]
    assert ok is not None and ok[:4].all() and not ok[4:].all()
    exact = mt.arborescence_marginals(Zd, root, method="stable")
    assert (mt.arborescence_marginals(Zd, root, method="fast") - exact).abs().max() > 1e-6  # the hazard is real
    auto = mt.arborescence_marginals(Zd, root)
    torch.testing.assert_close(auto, exact, atol=1e-10, rtol=0)
    others = [v for v in range(n) if v != root]
    torch.testing.assert_close(auto.sum(-2)[:, others], torch.ones(8, n - 1, dtype=torch.float64), atol=1e-9, rtol=0)
    logz = mt.arborescence_log_partition(Zd, root)
    torch.testing.assert_close(logz, mt.arborescence_log_partition(Zd, root, method="stable"), atol=1e-9, rtol=1e-12)


@pytest.mark.parametrize("strength", [5.0, 10.0, 15.0, 20.0])
def test_auto_accuracy_across_conditioning(strength):
    Z, edges = clustered_edges(32, 10, strength)
    auto = mt.spanning_tree_marginals(Z, edges, 10)
    exact = mt.spanning_tree_marginals(Z, edges, 10, method="stable")
    torch.testing.assert_close(auto, exact, atol=1e-10, rtol=0)


@pytest.mark.parametrize("n", [6, 20])
def test_extreme_spread_is_exact_and_reaches_the_hard_tree(n):
    """tau = 1e-3 with |theta| = 1e3: log-weights spread over 1e6; the marginals are the MST."""
    P = SpanningTree(n)
    theta = 1e3 * (2 * torch.rand(4, P.edges.shape[0], dtype=torch.float64) - 1)
    Z = theta / 1e-3
    mu = mt.spanning_tree_marginals(Z, P.edges, n)
    hard = sstcvx.argmax(P, theta)
    assert torch.isfinite(mu).all()
    torch.testing.assert_close(mu, hard, atol=1e-6, rtol=0)
    torch.testing.assert_close(mu.sum(-1), torch.full((4,), n - 1.0, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(mt.spanning_tree_log_partition(Z, P.edges, n), (Z * hard).sum(-1), atol=1e-6, rtol=1e-12)


@pytest.mark.parametrize("method", ("fast", "stable"))
def test_gradcheck(method):
    edges = torch.triu_indices(5, 5, 1).T
    Z = torch.randn(2, 10, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z: mt.spanning_tree_marginals(z, edges, 5, method=method), (Z,))
    for root in (0, 2, 4):
        Zd = torch.randn(2, 5, 5, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda z: mt.arborescence_marginals(z, root, method=method), (Zd,))


def test_gradcheck_mixed_batch_and_stable_second_order():
    """auto with one element on each path; the stable path is twice differentiable."""
    Z, edges = clustered_edges(2, 6, 0.0)
    Z[1] = Z[1] + 40.0 * (torch.arange(15) % 4 == 0)  # an ill-conditioned element: stable path
    assert fast.FastSpanningTreeMarginals.apply(*mt._st_prepare(Z, edges, 6), True)[1].tolist() == [True, False]
    Z.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z: mt.spanning_tree_marginals(z, edges, 6), (Z,))
    Zs = torch.randn(1, 6, dtype=torch.float64, requires_grad=True)
    e4 = torch.triu_indices(4, 4, 1).T
    assert torch.autograd.gradgradcheck(lambda z: mt.spanning_tree_marginals(z, e4, 4, method="stable"), (Zs,))


def test_dtype_batch_and_bad_input():
    edges = torch.triu_indices(6, 6, 1).T
    Z = torch.randn(2, 3, 15)
    mu = mt.spanning_tree_marginals(Z, edges, 6)
    assert mu.shape == (2, 3, 15) and mu.dtype == torch.float32
    torch.testing.assert_close(mu, mt.spanning_tree_marginals(Z.double(), edges, 6).float())
    Zd = torch.randn(4, 5, 5, dtype=torch.float32)
    assert mt.arborescence_marginals(Zd).dtype == torch.float32
    assert mt.arborescence_log_partition(Zd).shape == (4,)
    with pytest.raises(ValueError, match="method"):
        mt.spanning_tree_marginals(Z, edges, 6, method="inverse")
    with pytest.raises(ValueError, match="edges"):
        mt.spanning_tree_marginals(Z, edges[:3], 6)
    with pytest.raises(ValueError, match="root"):
        mt.arborescence_marginals(Zd, root=7)


def test_no_grad_and_inference_mode():
    """The stable path differentiates internally; it must work where autograd is off."""
    edges = torch.triu_indices(6, 6, 1).T
    Z = 1e3 * torch.randn(3, 15, dtype=torch.float64)  # spread far too large for the inverse
    expected = mt.spanning_tree_marginals(Z, edges, 6)
    with torch.no_grad():
        torch.testing.assert_close(mt.spanning_tree_marginals(Z, edges, 6), expected, atol=0, rtol=0)
    with torch.inference_mode():
        torch.testing.assert_close(mt.spanning_tree_marginals(Z, edges, 6), expected, atol=0, rtol=0)
        Zd = 1e3 * torch.randn(2, 7, 7, dtype=torch.float64)
        mu = mt.arborescence_marginals(Zd, root=3)
    torch.testing.assert_close(
        mu.sum(-2)[:, [0, 1, 2, 4, 5, 6]], torch.ones(2, 6, dtype=torch.float64), atol=1e-9, rtol=0
    )


def test_edge_tables_follow_in_place_changes_of_the_edge_list():
    """The edge tables are cached by the tensor's identity; an in-place edit must not reuse them."""
    edges = torch.tensor([[0, 1], [1, 2], [2, 3], [0, 3]])
    Z = torch.tensor([[0.3, -0.2, 1.1, 0.5]], dtype=torch.float64)
    before = mt.spanning_tree_marginals(Z, edges, 4)
    assert torch.equal(mt.spanning_tree_marginals(Z, edges, 4), before)
    edges[3] = torch.tensor([1, 3])  # the cycle 0-1-2-3 becomes the triangle 1-2-3 plus the pendant edge 0-1
    after = mt.spanning_tree_marginals(Z, edges, 4)
    torch.testing.assert_close(after, mt.spanning_tree_marginals(Z, edges.clone(), 4), atol=0, rtol=0)
    assert abs(after[0, 0].item() - 1.0) < 1e-12 and not torch.allclose(after, before)


def test_incidence_matmul_and_gather_tables_agree(monkeypatch):
    """Small graphs build L̂ and b_eᵀ X b_e by a matmul with the incidence table, large ones by
    gathers: both agree (values and gradients), and the gather path passes gradcheck on a
    small graph too."""
    edges = torch.tensor([[0, 1], [1, 2], [2, 3], [3, 4], [0, 4], [1, 3], [2, 5], [5, 6], [0, 6]])
    Z = torch.randn(3, len(edges), dtype=torch.float64, requires_grad=True)
    G = torch.randn(3, len(edges), dtype=torch.float64)

    def run():
        mu = mt.spanning_tree_marginals(Z, edges.clone(), 7)
        return mu, torch.autograd.grad((mu * G).sum(), Z)[0]

    assert mt._st_prepare(Z, edges, 7)[1].incidence is not None
    mu_matmul, g_matmul = run()
    monkeypatch.setattr(graphs, "DENSE_INCIDENCE_MAX", 0)  # part of the cache key: no stale tables
    assert mt._st_prepare(Z, edges, 7)[1].incidence is None
    mu_gather, g_gather = run()
    torch.testing.assert_close(mu_gather, mu_matmul, atol=1e-13, rtol=0)
    torch.testing.assert_close(g_gather, g_matmul, atol=1e-13, rtol=0)
    assert torch.autograd.gradcheck(lambda z: mt.spanning_tree_marginals(z, edges, 7, method="fast"), (Z,))


@pytest.mark.parametrize("root", [0, 3, 5])
def test_directed_incidence_matmul_and_slicing_agree(monkeypatch, root):
    """Small digraphs build L̂ and the marginals' forms in L̂⁻¹ by matmuls with incidence tables,
    large ones by slicing: both agree (values and gradients, with a mask), and the slicing path
    passes gradcheck on a small digraph too."""
    n = 6
    mask = torch.rand(n, n, generator=torch.Generator().manual_seed(root)) < 0.8
    mask[:, :] |= torch.eye(n, dtype=torch.bool).roll(1, 0)  # a Hamiltonian cycle keeps every root reachable
    Z = torch.randn(3, n, n, dtype=torch.float64, requires_grad=True)
    G = torch.randn(3, n, n, dtype=torch.float64)

    def run():
        mu = mt.arborescence_marginals(Z, root, mask=mask, method="fast")
        return mu, torch.autograd.grad((mu * G).sum(), Z)[0]

    assert mt._arb_prepare(Z, root, mask)[1].incidence is not None
    mu_matmul, g_matmul = run()
    monkeypatch.setattr(graphs, "DIRECTED_DENSE_INCIDENCE_MAX", 0)
    assert mt._arb_prepare(Z, root, mask)[1].incidence is None
    mu_slices, g_slices = run()
    torch.testing.assert_close(mu_slices, mu_matmul, atol=1e-13, rtol=0)
    torch.testing.assert_close(g_slices, g_matmul, atol=1e-13, rtol=0)
    assert torch.autograd.gradcheck(lambda z: mt.arborescence_marginals(z, root, mask=mask, method="fast"), (Z,))


# --------------------------------------------------------------------------------------------
# second derivatives: the fast path's backward is built from torch operations
# --------------------------------------------------------------------------------------------
def reachable_mask(n, seed):
    """A random digraph with a Hamiltonian cycle, so that every root reaches every vertex."""
    mask = torch.rand(n, n, generator=torch.Generator().manual_seed(seed)) < 0.6
    return mask | torch.eye(n, dtype=torch.bool).roll(1, 0)


@pytest.mark.parametrize("n", [4, 5])
def test_spanning_tree_gradgradcheck(n):
    edges = torch.triu_indices(n, n, 1).T
    Z = torch.randn(2, len(edges), dtype=torch.float64, requires_grad=True)
    for method in ("fast", "auto"):
        assert torch.autograd.gradgradcheck(lambda z: mt.spanning_tree_marginals(z, edges, n, method=method), (Z,))
    general = torch.tensor([[0, 1], [1, 2], [2, 3], [0, 3], [1, 3]])[: n + 1] % n
    if n == 4:
        Zg = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradgradcheck(lambda z: mt.spanning_tree_marginals(z, general, 4), (Zg,))


@pytest.mark.parametrize("n,root", [(4, 0), (4, 2), (5, 4), (5, 1)])
def test_arborescence_gradgradcheck(n, root):
    Zd = torch.randn(2, n, n, dtype=torch.float64, requires_grad=True)
    for mask in (None, reachable_mask(n, root)):
        for method in ("fast", "auto"):
            assert torch.autograd.gradgradcheck(
                lambda z: mt.arborescence_marginals(z, root, mask, method=method), (Zd,)
            )


def test_gradgradcheck_of_the_large_graph_tables_and_a_mixed_batch(monkeypatch):
    """The gather / slicing code that large graphs use, and a batch with one element on each path."""
    monkeypatch.setattr(graphs, "DENSE_INCIDENCE_MAX", 0)
    monkeypatch.setattr(graphs, "DIRECTED_DENSE_INCIDENCE_MAX", 0)
    edges = torch.triu_indices(5, 5, 1).T
    Z = torch.randn(2, 10, dtype=torch.float64, requires_grad=True)
    assert mt._st_prepare(Z, edges, 5)[1].incidence is None
    assert torch.autograd.gradgradcheck(lambda z: mt.spanning_tree_marginals(z, edges, 5, method="fast"), (Z,))
    Zd = torch.randn(2, 5, 5, dtype=torch.float64, requires_grad=True)
    assert mt._arb_prepare(Zd, 2, None)[1].incidence is None
    assert torch.autograd.gradgradcheck(lambda z: mt.arborescence_marginals(z, 2, method="fast"), (Zd,))
    Zm, e6 = clustered_edges(2, 6, 0.0)
    Zm[1] = Zm[1] + 40.0 * (torch.arange(15) % 4 == 0)  # ill conditioned: the stable path
    assert fast.FastSpanningTreeMarginals.apply(*mt._st_prepare(Zm, e6, 6), True)[1].tolist() == [True, False]
    assert torch.autograd.gradgradcheck(lambda z: mt.spanning_tree_marginals(z, e6, 6), (Zm.requires_grad_(True),))


def test_second_derivatives_agree_across_paths_and_with_slogdet():
    """Hessian-vector products of ⟨G, μ⟩ through the fast path equal those through the stable
    path (autograd of autograd of a log-space elimination) and the third derivative of slogdet."""
    n = 8
    edges = torch.triu_indices(n, n, 1).T
    Z = torch.randn(3, len(edges), dtype=torch.float64, requires_grad=True)
    G, v = torch.randn(3, len(edges), dtype=torch.float64), torch.randn(3, len(edges), dtype=torch.float64)

    def hvp(marginals):
        (g,) = torch.autograd.grad((marginals(Z) * G).sum(), Z, create_graph=True)
        assert g.requires_grad  # the first derivative carries a graph: nothing silently vanishes
        return torch.autograd.grad((g * v).sum(), Z)[0]

    def slogdet_marginals(z):
        W = (
            torch.zeros(3, n * n, dtype=torch.float64)
            .index_copy(1, edges[:, 0] * n + edges[:, 1], z.exp())
            .view(3, n, n)
        )
        W = W + W.mT
        L = torch.diag_embed(W.sum(-1)) - W
        return torch.autograd.grad(torch.linalg.slogdet(L[:, :-1, :-1])[1].sum(), z, create_graph=True)[0]

    h_fast = hvp(lambda z: mt.spanning_tree_marginals(z, edges, n, method="fast"))
    torch.testing.assert_close(
        h_fast, hvp(lambda z: mt.spanning_tree_marginals(z, edges, n, method="stable")), atol=1e-10, rtol=0
    )
    torch.testing.assert_close(h_fast, hvp(slogdet_marginals), atol=1e-10, rtol=0)
    Zd = torch.randn(3, n, n, dtype=torch.float64, requires_grad=True)
    Gd, vd = torch.randn(3, n, n, dtype=torch.float64), torch.randn(3, n, n, dtype=torch.float64)
    hd = []
    for method in ("fast", "stable"):
        (g,) = torch.autograd.grad((mt.arborescence_marginals(Zd, 3, method=method) * Gd).sum(), Zd, create_graph=True)
        hd.append(torch.autograd.grad((g * vd).sum(), Zd)[0])
    torch.testing.assert_close(hd[0], hd[1], atol=1e-10, rtol=0)


def test_relaxations_are_twice_differentiable():
    """Through the public API: sstcvx.relax on the tree polytopes (the registered solvers)."""
    P, A = SpanningTree(4), Arborescence(5, root=3, mask=reachable_mask(5, 7))
    U = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    Ud = torch.randn(2, 5, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(
        lambda u: sstcvx.relax(P, u, 0.7, "exp_family_entropy", solver="specialized"), (U,)
    )
    assert torch.autograd.gradgradcheck(
        lambda u: sstcvx.relax(A, u, 0.7, "exp_family_entropy", solver="specialized"), (Ud,)
    )


# --------------------------------------------------------------------------------------------
# shared state: thread safety and pickling
# --------------------------------------------------------------------------------------------
def test_threads_share_the_table_caches_correctly():
    """Many threads on one polytope, fresh edge lists and masks, while the caches are emptied:
    every result equals the one computed alone."""
    import threading

    g = torch.Generator().manual_seed(3)
    cases = []
    for n in (5, 9, 20):
        edges = torch.triu_indices(n, n, 1).T
        Z = torch.randn(4, len(edges), dtype=torch.float64, generator=g)
        Zd = torch.randn(4, n, n, dtype=torch.float64, generator=g)
        cases.append(("st", edges, n, Z, mt.spanning_tree_marginals(Z, edges, n)))
        for root in (0, n // 2):
            cases.append(("arb", root, None, Zd, mt.arborescence_marginals(Zd, root)))
        mask = reachable_mask(n, n)
        cases.append(("arb", 1, mask, Zd, mt.arborescence_marginals(Zd, 1, mask)))
    errors = []
    start = threading.Barrier(6)

    def worker(k):
        start.wait()
        for r in range(12):
            for c, (kind, a, b, Z, expected) in enumerate(cases):
                if (k + r + c) % 7 == 0:
                    graphs.clear_caches()
                if kind == "st":
                    edges = a if (k + r) % 2 else a.clone()  # the identity cache and the content cache
                    got = mt.spanning_tree_marginals(Z, edges, b)
                else:
                    got = mt.arborescence_marginals(Z, a, b)
                if not torch.equal(got, expected):
                    errors.append((k, r, c))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_tree_polytopes_pickle_and_deepcopy_after_use():
    import copy
    import pickle

    for P, U in (
        (SpanningTree(5), torch.randn(3, 10, dtype=torch.float64)),
        (
            SpanningTree(5, edges=torch.tensor([[0, 1], [1, 2], [2, 3], [3, 4], [0, 4], [1, 3]])),
            torch.randn(3, 6, dtype=torch.float64),
        ),
        (Arborescence(5, root=2, mask=reachable_mask(5, 1)), torch.randn(3, 5, 5, dtype=torch.float64)),
    ):
        X = sstcvx.relax(P, U, 0.5, "exp_family_entropy", solver="specialized")
        H = sstcvx.argmax(P, U, solver="specialized")
        for Q in (pickle.loads(pickle.dumps(P)), copy.deepcopy(P)):
            assert torch.equal(sstcvx.relax(Q, U, 0.5, "exp_family_entropy", solver="specialized"), X)
            assert torch.equal(sstcvx.argmax(Q, U, solver="specialized"), H)
