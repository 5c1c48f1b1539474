"""polytopes.CorrelatedKSubset: the max-plus argmax, the forward-backward Gibbs marginals and the flow
declaration, against brute force over the vertices, the generic path, autograd and KSubset."""

import math

import pytest
import torch

import sstcvx
from polytopes import CorrelatedKSubset, KSubset
from sstcvx.families import families

SIZES = [(2, 1), (5, 2), (6, 1), (7, 3), (8, 4), (8, 7)]


def relax(P, U, tau, regularizer="exp_family_entropy", solver="specialized"):
    return sstcvx.relax(P, U, tau, regularizer, solver=solver)


def brute_force_marginals(P, Z):
    V = P.vertices.to(Z.dtype)
    return torch.softmax(Z @ V.T, -1) @ V


def brute_force_covariance(P, z):
    V = P.vertices
    p = torch.softmax(V @ z, -1)
    mean = p @ V
    return V.T @ (p.unsqueeze(-1) * V) - torch.outer(mean, mean)


def reference_log_partition(theta, phi, k):
    """log Z by a plain autograd-differentiable recursion over (count, last bit): an independent witness."""
    n = theta.shape[-1]
    minus_inf = torch.tensor(-1e30, dtype=theta.dtype)  # finite "absent", so that autograd has no nan
    # table[c][b]: log weight of the prefixes with c ones ending in bit b
    table = [[torch.zeros(()) if c == 0 else minus_inf, theta[0] if c == 1 else minus_inf] for c in range(k + 1)]
    for i in range(1, n):
        new = []
        for c in range(k + 1):
            zero = torch.logsumexp(torch.stack(table[c]), 0)
            one = (
                theta[i] + torch.logsumexp(torch.stack([table[c - 1][0], table[c - 1][1] + phi[i - 1]]), 0)
                if c
                else minus_inf
            )
            new.append([zero, one])
        table = new
    return torch.logsumexp(torch.stack(table[k]), 0)


def test_rejects_bad_sizes():
    for n, k in ((5, 0), (5, 5), (1, 1), (4, -2)):
        with pytest.raises(ValueError, match=f"n={n}"):
            CorrelatedKSubset(n, k)
    with pytest.raises(TypeError, match="k"):
        CorrelatedKSubset(5, 2.0)
    with pytest.raises(TypeError, match="n"):
        CorrelatedKSubset(True, 1)


@pytest.mark.parametrize("n,k", SIZES)
def test_vertices_are_k_subsets_with_their_adjacent_pairs(n, k):
    P = CorrelatedKSubset(n, k)
    V = P.vertices
    assert P.event_shape == (2 * n - 1,) and V.shape == (math.comb(n, k), 2 * n - 1)
    x, y = V[:, :n], V[:, n:]
    assert torch.equal(x, KSubset(n, k).vertices)
    assert torch.equal(y, x[:, :-1] * x[:, 1:])
    assert CorrelatedKSubset(40, 20).vertices is None


@pytest.mark.parametrize("n,k", SIZES)
def test_argmax_is_the_brute_force_vertex(n, k):
    P = CorrelatedKSubset(n, k)
    U = 2 * torch.randn(64, 2 * n - 1, dtype=torch.float64)
    V = P.vertices
    X = sstcvx.argmax(P, U, solver="specialized")
    assert torch.equal(X, V[(U @ V.T).argmax(-1)])


def test_argmax_ties_go_to_the_lexicographically_largest_maximiser():
    n, k = 7, 3
    P = CorrelatedKSubset(n, k)
    V = P.vertices
    U = torch.randint(-1, 2, (200, 2 * n - 1)).double()  # many exact ties
    X = sstcvx.argmax(P, U, solver="specialized")
    scores = U @ V.T
    best = scores.amax(-1, keepdim=True)
    assert torch.equal((X * U).sum(-1), best.squeeze(-1))
    # V lists the index sets lexicographically, so the largest 0/1 string among the maximisers comes first
    first = torch.where(scores == best, 1, 0).argmax(-1)
    assert torch.equal(X, V[first])
    assert torch.equal(sstcvx.argmax(P, torch.zeros(2 * n - 1)), V[0])


@pytest.mark.parametrize("n,k", [(6, 2), (7, 3)])
def test_declaration_lp_gives_the_best_vertex(n, k):
    P = CorrelatedKSubset(n, k)
    U = torch.randn(12, 2 * n - 1, dtype=torch.float64)
    V = P.vertices
    assert torch.equal(sstcvx.argmax(P, U, solver="generic"), V[(U @ V.T).argmax(-1)])
    assert P.check(n_directions=4, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("n,k", SIZES)
@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_exp_family_entropy_is_the_brute_force_gibbs_marginals(n, k, scale):
    P = CorrelatedKSubset(n, k)
    Z = scale * torch.randn(5, 2 * n - 1, dtype=torch.float64)
    torch.testing.assert_close(relax(P, Z, 1.0), brute_force_marginals(P, Z), atol=1e-12, rtol=0)


@pytest.mark.parametrize("n,k", [(5, 2), (7, 3), (8, 7)])
def test_exp_family_jacobian_is_the_gibbs_covariance(n, k):
    P = CorrelatedKSubset(n, k)
    z = 1.5 * torch.randn(2 * n - 1, dtype=torch.float64)
    J = torch.autograd.functional.jacobian(lambda u: relax(P, u, 1.0), z)
    torch.testing.assert_close(J, brute_force_covariance(P, z), atol=1e-12, rtol=0)


def test_marginals_and_backward_match_autograd_of_an_independent_recursion():
    # n = 30 has 142506 subsets: too many to list; autograd of a plain recursion is the witness
    n, k = 30, 6
    P = CorrelatedKSubset(n, k)
    z = 2 * torch.randn(2 * n - 1, dtype=torch.float64, requires_grad=True)
    log_z = reference_log_partition(z[:n], z[n:], k)
    (mu,) = torch.autograd.grad(log_z, z, create_graph=True)
    g = torch.randn(2 * n - 1, dtype=torch.float64)
    (hvp,) = torch.autograd.grad(mu, z, g)
    zz = z.detach().requires_grad_(True)
    X = relax(P, zz, 1.0)
    X.backward(g)
    torch.testing.assert_close(X, mu.detach(), atol=1e-12, rtol=0)
    torch.testing.assert_close(zz.grad, hvp, atol=1e-11, rtol=0)


def test_gradcheck():
    P = CorrelatedKSubset(7, 3)
    U = torch.randn(2, 13, dtype=torch.float64, requires_grad=True)
    tau = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda u, t: relax(P, u, t), (U, tau))


def test_double_backward_raises_instead_of_being_wrong():
    P = CorrelatedKSubset(5, 2)
    U = torch.randn(9, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(relax(P, U, 1.0).sum(), U, create_graph=True)
    with pytest.raises(RuntimeError):
        g.sum().backward()


def test_without_pair_utilities_it_is_a_k_subset():
    n, k = 12, 4
    theta = 2 * torch.randn(6, n, dtype=torch.float64)
    U = torch.cat([theta, torch.zeros(6, n - 1, dtype=torch.float64)], -1)
    P = CorrelatedKSubset(n, k)
    X = relax(P, U, 0.8)
    torch.testing.assert_close(X[:, :n], relax(KSubset(n, k), theta, 0.8), atol=1e-12, rtol=0)
    assert torch.equal(sstcvx.argmax(P, U)[:, :n], sstcvx.argmax(KSubset(n, k), theta))


def test_pair_utilities_pull_the_subset_together():
    # equal unary utilities: a strong pair reward makes the k items one contiguous block
    n, k = 10, 4
    P = CorrelatedKSubset(n, k)
    U = torch.cat([torch.zeros(n), torch.full((n - 1,), 5.0)]).double()
    X = relax(P, U, 0.2)
    assert X[n:].sum() > k - 1 - 1e-3  # k - 1 adjacent pairs: a block
    assert torch.equal(sstcvx.argmax(P, U)[:n], torch.tensor([1.0] * k + [0.0] * (n - k), dtype=torch.float64))


def test_generic_exp_family_entropy_agrees():
    # the generic path solves the same problem as an entropy relaxation over the vertex weights
    P = CorrelatedKSubset(6, 2)
    U = 2 * torch.randn(3, 11, dtype=torch.float64, requires_grad=True)
    fast = relax(P, U, 0.7)
    slow = relax(P, U, 0.7, solver="generic")
    torch.testing.assert_close(fast, slow, atol=1e-6, rtol=0)
    G = torch.randn_like(fast)
    (g_fast,) = torch.autograd.grad(fast, U, G)
    (g_slow,) = torch.autograd.grad(slow, U, G)
    torch.testing.assert_close(g_fast, g_slow, atol=1e-5, rtol=0)


@pytest.mark.parametrize("regularizer", ["binary_entropy", "euclidean"])
def test_generic_path_on_the_declaration_agrees_with_the_vertex_formulation(regularizer):
    # no specialized solver: the flow declaration and the convex hull of the listed vertices must give
    # the same relaxed point (two independent formulations of P)
    P = CorrelatedKSubset(6, 3)
    hull = sstcvx.Polytope.from_vertices(P.vertices)
    U = 2 * torch.randn(3, 11, dtype=torch.float64)
    X = relax(P, U, 0.7, regularizer, solver="generic")
    torch.testing.assert_close(X, relax(hull, U, 0.7, regularizer, solver="generic"), atol=2e-5, rtol=0)
    torch.testing.assert_close(X[:, :6].sum(-1), torch.full((3,), 3.0, dtype=torch.float64), atol=1e-6, rtol=0)


@pytest.mark.parametrize("n,k", [(7, 3), (9, 2)])
def test_tau_limits(n, k):
    P = CorrelatedKSubset(n, k)
    U = torch.rand(8, 2 * n - 1).argsort(-1).double() * 0.1  # distinct values: a unique best vertex with a margin
    torch.testing.assert_close(relax(P, U, 1e-3), sstcvx.argmax(P, U), atol=1e-12, rtol=0)
    # tau -> infinity: the uniform law on the k-subsets
    barycentre = torch.cat([torch.full((n,), k / n), torch.full((n - 1,), k * (k - 1) / (n * (n - 1)))]).double()
    torch.testing.assert_close(relax(P, U, 1e7), barycentre.expand_as(U), atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_robust_to_extreme_utilities(dtype):
    n, k = 40, 7
    P = CorrelatedKSubset(n, k)
    for tau in (1e-3, 1.0, 1e3):
        U = (1e3 * torch.randn(6, 2 * n - 1, dtype=dtype)).requires_grad_(True)
        X = relax(P, U, tau)
        (X * torch.randn_like(X)).sum().backward()
        assert torch.isfinite(X).all() and torch.isfinite(U.grad).all()
        assert (X >= 0).all() and (X <= 1).all()
        x, y = X[:, :n].double(), X[:, n:].double()
        assert (y <= torch.minimum(x[:, :-1], x[:, 1:]) + 1e-6).all()
        tolerance = 1e-6 if dtype == torch.float64 else 1e-5
        torch.testing.assert_close(x.sum(-1), torch.full((6,), float(k), dtype=torch.float64), atol=tolerance, rtol=0)
    hard = sstcvx.argmax(P, U.detach())
    torch.testing.assert_close(relax(P, U.detach(), 1e-3), hard, atol=1e-6, rtol=0)


def test_large_spread_agrees_with_brute_force():
    P = CorrelatedKSubset(7, 3)
    Z = 1e6 * torch.randn(4, 13, dtype=torch.float64)
    Z[:, 1] = Z[:, 0] + 0.3  # a near tie on top of the huge scale
    torch.testing.assert_close(relax(P, Z, 1.0), brute_force_marginals(P, Z), atol=1e-9, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch", [(), (3,), (2, 3)])
def test_batch_shape_and_dtype_preserved(batch, dtype):
    P = CorrelatedKSubset(5, 2)
    U = torch.randn(*batch, 9, dtype=dtype)
    for X in (relax(P, U, 0.5), sstcvx.argmax(P, U)):
        assert X.shape == U.shape and X.dtype == dtype and X.device == U.device
    if batch:
        flat = relax(P, U.reshape(-1, 9), 0.5).reshape(U.shape)
        torch.testing.assert_close(relax(P, U, 0.5), flat, atol=0, rtol=0)


def test_registered_for_the_tooling():
    family = families()["correlated_ksubset"]
    P = family(10)
    assert isinstance(P, CorrelatedKSubset) and (P.n, P.k) == (10, 3)
    assert family(6, 2).k == 2
    assert sstcvx.registry.specialized_regularizers(P) == ["exp_family_entropy"]


def test_compare_checks_the_declaration_and_the_specialized_solver():
    # what `sstcvx compare correlated_ksubset` runs: the flow declaration against brute force over the
    # vertices (no specialized euclidean solver), the generic exp_family_entropy against the DP
    report = sstcvx.compare(CorrelatedKSubset(5, 2), ["euclidean", "exp_family_entropy"], batch=2, repeats=0)
    assert [r.reference for r in report] == ["brute_force", "specialized"]
    for r in report:
        assert r.failures == 0 and r.max_abs_diff < 1e-5 and r.hard_agreement == 1.0, r.key
