"""polytopes.KSubset: facts of k-subsets (LML, the projection, the Gibbs-marginal DP); the shared contract is tests/test_contract.py."""

import itertools
import math

import pytest
import torch

import sstcvx
from polytopes import KSubset, Simplex
from polytopes.ksubset import log_elementary_symmetric

REGULARIZERS = ("binary_entropy", "euclidean", "exp_family_entropy")


def relax(P, U, tau, regularizer):
    return sstcvx.relax(P, U, tau, regularizer, solver="specialized")


def brute_force_marginals(P, Z):
    V = P.vertices.to(Z.dtype)
    return torch.softmax(Z @ V.T, -1) @ V


def test_rejects_bad_sizes():
    for n, k in ((5, 0), (5, 5), (5, -1), (1, 1)):
        with pytest.raises(ValueError, match=f"n={n}"):
            KSubset(n, k)
    with pytest.raises(TypeError, match="k"):
        KSubset(5, 2.0)
    with pytest.raises(TypeError, match="n"):
        KSubset(True, 1)


@pytest.mark.parametrize("n,k", [(5, 1), (6, 2), (7, 6)])
def test_vertices_are_the_k_hot_vectors(n, k):
    V = KSubset(n, k).vertices
    assert V.shape == (math.comb(n, k), n) and V.dtype == torch.float64
    assert (V.sum(-1) == k).all() and ((V == 0) | (V == 1)).all()
    assert torch.unique(V, dim=0).shape[0] == V.shape[0]
    assert KSubset(40, 20).vertices is None


def test_lml_satisfies_its_optimality_conditions():
    # x = sigmoid(Z - nu) with one nu per row: logit(x) - Z is constant along the row, and sum x = k
    P = KSubset(9, 4)
    Z = 3 * torch.randn(5, 9, dtype=torch.float64)
    X = relax(P, Z, 1.0, "binary_entropy")
    shift = torch.logit(X) - Z
    torch.testing.assert_close(shift, shift[:, :1].expand_as(shift), atol=1e-9, rtol=0)
    torch.testing.assert_close(X.sum(-1), torch.full((5,), 4.0, dtype=torch.float64), atol=1e-12, rtol=0)


def test_projection_is_nearest_point_on_random_feasible_points():
    # the projection is no farther from Z than any feasible point (here: random convex combinations of vertices)
    P = KSubset(8, 3)
    Z = 2 * torch.randn(4, 8, dtype=torch.float64)
    X = relax(P, Z, 1.0, "euclidean")
    weights = torch.distributions.Dirichlet(torch.ones(P.vertices.shape[0], dtype=torch.float64)).sample((4, 200))
    others = weights @ P.vertices  # (4, 200, 8)
    assert ((others - Z.unsqueeze(1)).norm(dim=-1) >= (X - Z).norm(dim=-1, keepdim=True) - 1e-12).all()


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 9])
def test_log_elementary_symmetric_is_exact(n):
    z = 2 * torch.randn(3, n, dtype=torch.float64)
    for k in range(1, n + 1):
        subsets = torch.tensor(list(itertools.combinations(range(n), k)))
        expected = z[:, subsets].sum(-1).logsumexp(-1)
        torch.testing.assert_close(log_elementary_symmetric(z, k), expected, atol=1e-12, rtol=1e-13)


@pytest.mark.parametrize("n,k", [(6, 2), (7, 3), (8, 4), (13, 4), (16, 5)])
def test_exp_family_entropy_is_the_brute_force_gibbs_marginals(n, k):
    P = KSubset(n, k)
    Z = 3 * torch.randn(5, n, dtype=torch.float64)
    torch.testing.assert_close(relax(P, Z, 1.0, "exp_family_entropy"), brute_force_marginals(P, Z), atol=1e-8, rtol=0)


def test_exp_family_jacobian_is_the_gibbs_covariance():
    P = KSubset(7, 3)
    z = torch.randn(7, dtype=torch.float64)
    J = torch.autograd.functional.jacobian(lambda u: relax(P, u, 1.0, "exp_family_entropy"), z)
    V = P.vertices
    p = torch.softmax(V @ z, -1)
    mean = p @ V
    covariance = V.T @ (p.unsqueeze(-1) * V) - torch.outer(mean, mean)
    torch.testing.assert_close(J, covariance, atol=1e-10, rtol=0)


def test_gradgradcheck_exp_family_and_lml():
    P = KSubset(5, 2)
    U = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    for regularizer in ("binary_entropy", "exp_family_entropy"):
        assert torch.autograd.gradgradcheck(lambda u: relax(P, u, 0.5, regularizer), (U,))


@pytest.mark.parametrize("regularizer", REGULARIZERS)
def test_large_tau_gives_the_barycentre(regularizer):
    # argmin of f over P: the barycentre k/n for all three regularizers
    U = torch.randn(8, 7, dtype=torch.float64)
    torch.testing.assert_close(relax(KSubset(7, 3), U, 1e7, regularizer), torch.full_like(U, 3 / 7), atol=1e-6, rtol=0)


@pytest.mark.parametrize("regularizer", ["euclidean", "exp_family_entropy"])
def test_one_subsets_are_the_simplex(regularizer):
    U = 2 * torch.randn(6, 9, dtype=torch.float64)
    torch.testing.assert_close(
        relax(KSubset(9, 1), U, 0.8, regularizer), relax(Simplex(9), U, 0.8, regularizer), atol=1e-12, rtol=0
    )


def test_exp_family_dp_stays_exact_at_large_spread():
    # a spread of 2e6 (tau = 1e-3 with |theta| = 1e3): brute force (a stable softmax over the 15 vertices) agrees
    P = KSubset(6, 2)
    z = torch.tensor([[1e6, 0.3, 0.0, -1e6, 5e5, -2e5], [3.0, -1e6, 1e6, 2.0, 0.5, -3e5]], dtype=torch.float64)
    torch.testing.assert_close(relax(P, z, 1.0, "exp_family_entropy"), brute_force_marginals(P, z), atol=1e-12, rtol=0)
    # one sure item and a near-tie for the second slot: the tie splits as a logistic of the gap; log-space
    # sums such as 1e6 + 0.3 round at eps * 1e6 = 1e-10, which bounds the error at this spread
    z = torch.tensor([[1e6, 0.3, 0.0, -1e6, -5e5, -2e5]], dtype=torch.float64)
    p = 1 / (1 + math.exp(-0.3))
    tie = torch.tensor([[1.0, p, 1 - p, 0.0, 0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(relax(P, z, 1.0, "exp_family_entropy"), tie, atol=1e-9, rtol=0)


# ---------------------------------------------------------------------------------------------
# the Gibbs-marginal message passes (k_subset_marginals), called directly so that small n take
# the tree DP and not the enumeration
# ---------------------------------------------------------------------------------------------


def tree_marginals(z, k):
    from polytopes.ksubset import _GibbsMarginals

    return _GibbsMarginals.apply(z, k)


@pytest.mark.parametrize("n", [2, 3, 5, 8, 11, 16, 17])
def test_tree_dp_is_the_brute_force_to_1e12(n):
    z = 3 * torch.randn(4, n, dtype=torch.float64)
    for k in range(1, n):
        subsets = torch.tensor(list(itertools.combinations(range(n), k)))
        V = torch.zeros(subsets.shape[0], n, dtype=torch.float64).scatter_(1, subsets, 1.0)
        brute = torch.softmax(z @ V.T, -1) @ V
        torch.testing.assert_close(tree_marginals(z, k), brute, atol=1e-12, rtol=0)


@pytest.mark.parametrize("n,k", [(6, 2), (9, 4), (12, 1), (13, 7)])
def test_tree_dp_backward_is_the_gibbs_covariance_to_1e12(n, k):
    # rows 0-1 moderate (linear-space passes), row 2 at a spread of 2e3 (the log-space rows), mixed in one batch
    z = torch.randn(3, n, dtype=torch.float64)
    z[2] *= 1e3
    g = torch.randn(3, n, dtype=torch.float64)
    zg = z.clone().requires_grad_(True)
    X = tree_marginals(zg, k)
    (hvp,) = torch.autograd.grad(X, zg, g)
    V = KSubset(n, k).vertices
    p = torch.softmax(z @ V.T, -1)
    mean = p @ V
    covariance = torch.einsum("bv,vi,vj->bij", p, V, V) - mean.unsqueeze(-1) * mean.unsqueeze(-2)
    torch.testing.assert_close(X.detach(), mean, atol=1e-12, rtol=0)
    torch.testing.assert_close(hvp, (covariance @ g.unsqueeze(-1)).squeeze(-1), atol=1e-12, rtol=0)


def test_tree_dp_gradcheck_and_gradgradcheck():
    z = torch.randn(2, 9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda u: tree_marginals(u, 3), (z,))
    assert torch.autograd.gradgradcheck(lambda u: tree_marginals(u, 3), (z,))


def test_tree_dp_at_extreme_utilities_matches_the_log_space_dp():
    # |U| ~ 1e3 at tau 1e-3: every row takes the log-space DP; tau = 1 with |U| ~ 3: every row the linear one
    from polytopes.ksubset import _log_space_marginals

    for scale in (1e6, 3.0, 30.0):
        z = scale * torch.randn(8, 40, dtype=torch.float64)
        reference = _log_space_marginals(z.clone().requires_grad_(True), 7, False)
        torch.testing.assert_close(tree_marginals(z, 7), reference, atol=1e-10 if scale > 1e3 else 1e-12, rtol=0)


@pytest.mark.parametrize("scale", [0.1, 1.0, 10.0, 1e4])
def test_capped_simplex_newton_finds_the_exact_support_of_the_sorted_method(scale):
    from polytopes.ksubset import _capped_simplex_newton, _capped_simplex_sorted

    z = scale * torch.randn(64, 50, dtype=torch.float64)
    z[:8] = z[:8].round()  # ties and breakpoints landing on integers
    for k in (1, 7, 25, 49):
        result = _capped_simplex_newton(z, k)
        assert result is not None
        (x, free), (x_sorted, free_sorted) = result, _capped_simplex_sorted(z, k)
        # the same support (not merely close values), up to entries exactly at a bound (degenerate: x the same)
        interior = (x_sorted > 1e-9) & (x_sorted < 1 - 1e-9)
        assert torch.equal(free | ~interior & free_sorted, free_sorted | ~interior & free)
        assert (free >= interior).all() and (free_sorted >= interior).all()
        torch.testing.assert_close(x, x_sorted, atol=1e-12 * max(1.0, scale), rtol=0)
        torch.testing.assert_close(x.sum(-1), torch.full((64,), float(k), dtype=torch.float64), atol=1e-9, rtol=0)


@pytest.mark.parametrize("scale", [0.1, 1.0, 10.0, 1e4])
def test_capped_simplex_fast_newton_is_the_sorted_method_or_defers(scale):
    # generic input: the cheap steps settle on the exact projection; integer-valued rows (roots on
    # breakpoints) may defer (None) to the exact-candidate steps, and the public projection is exact either way
    from polytopes.ksubset import _capped_simplex_fast_newton, _capped_simplex_sorted, capped_simplex_projection

    z = scale * torch.randn(64, 50, dtype=torch.float64)
    for k in (1, 7, 25, 49):
        result = _capped_simplex_fast_newton(z, k)
        assert result is not None
        x_sorted, free_sorted = _capped_simplex_sorted(z, k)
        torch.testing.assert_close(result[0], x_sorted, atol=1e-12 * max(1.0, scale), rtol=0)
        # the same support up to entries within rounding of a bound (degenerate: x the same)
        interior = (x_sorted > 1e-9) & (x_sorted < 1 - 1e-9)
        assert torch.equal(result[1] & interior, free_sorted & interior) and (result[1] >= interior).all()
    z[:8] = z[:8].round()
    for k in (1, 7, 25, 49):
        x = capped_simplex_projection(z, k)
        torch.testing.assert_close(x, _capped_simplex_sorted(z, k)[0], atol=1e-12 * max(1.0, scale), rtol=0)


@pytest.mark.parametrize("n,k", [(40, 30), (41, 21), (60, 59)])
def test_exp_family_complements_for_large_k(n, k):
    # k > n / 2 goes through the complements (n - k degrees): same marginals and covariance as the direct passes
    from polytopes.ksubset import _GibbsMarginals, k_subset_marginals

    z = 2 * torch.randn(3, n, dtype=torch.float64)
    g = torch.randn(3, n, dtype=torch.float64)
    zg, zd = z.clone().requires_grad_(True), z.clone().requires_grad_(True)
    X, direct = k_subset_marginals(zg, k), _GibbsMarginals.apply(zd, k)
    torch.testing.assert_close(X, direct, atol=1e-12, rtol=0)
    torch.testing.assert_close(X.sum(-1), torch.full((3,), float(k), dtype=torch.float64), atol=1e-11, rtol=0)
    (hvp,) = torch.autograd.grad(X, zg, g)
    (reference,) = torch.autograd.grad(direct, zd, g)
    torch.testing.assert_close(hvp, reference, atol=1e-12, rtol=0)
