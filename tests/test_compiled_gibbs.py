"""The compiled CPU kernel of the k-subset Gibbs marginals (polytopes/_compiled_gibbs.py) against the torch
path (``polytopes._compiled.disabled``), brute force and gradcheck."""

import itertools
import math

import pytest
import torch

import sstcvx
from polytopes import KSubset
from polytopes import _compiled_gibbs as compiled_gibbs
from polytopes import ksubset as ksubset_module
from polytopes._compiled import disabled

GibbsMarginals = ksubset_module._GibbsMarginals


def marginals_and_hvp(z, k, g, direct=True):
    """(x, H g) by _GibbsMarginals (direct) or the public k_subset_marginals, on the path in force."""
    zg = z.clone().requires_grad_(True)
    x = GibbsMarginals.apply(zg, k) if direct else ksubset_module.k_subset_marginals(zg, k)
    (hvp,) = torch.autograd.grad(x, zg, g)
    return x.detach(), hvp


def both_paths(z, k, g, direct=True):
    compiled = marginals_and_hvp(z, k, g, direct)
    with disabled():
        reference = marginals_and_hvp(z, k, g, direct)
    return compiled, reference


def brute_force(z, k):
    """Marginals and Gibbs covariances (B, n), (B, n, n) over the listed k-subsets."""
    n = z.shape[-1]
    subsets = torch.tensor(list(itertools.combinations(range(n), k)))
    V = torch.zeros(subsets.shape[0], n, dtype=torch.float64).scatter_(1, subsets, 1.0)
    p = torch.softmax(z @ V.T, -1)
    mean = p @ V
    covariance = torch.einsum("bv,vi,vj->bij", p, V, V) - mean.unsqueeze(-1) * mean.unsqueeze(-2)
    return mean, covariance


@pytest.mark.parametrize("n,k", [(2, 1), (5, 2), (9, 4), (12, 1), (13, 7), (12, 11), (45, 9), (100, 10), (70, 35)])
def test_compiled_path_is_the_torch_path(n, k):
    # 37 rows: one full block of 32 and a partial block (padding lanes)
    generator = torch.Generator().manual_seed(n * 100 + k)
    z = 3 * torch.randn(37, n, dtype=torch.float64, generator=generator)
    g = torch.randn(37, n, dtype=torch.float64, generator=generator)
    (x, hvp), (x_ref, hvp_ref) = both_paths(z, k, g)
    torch.testing.assert_close(x, x_ref, atol=1e-13, rtol=0)
    torch.testing.assert_close(hvp, hvp_ref, atol=1e-13, rtol=0)
    torch.testing.assert_close(x.sum(-1), torch.full((37,), float(k), dtype=torch.float64), atol=1e-12, rtol=0)


@pytest.mark.parametrize("n,k", [(12, 5), (11, 3), (16, 8)])
def test_compiled_path_is_the_brute_force_to_1e12(n, k):
    z = 2 * torch.randn(6, n, dtype=torch.float64)
    z[1] = 0.0  # all tied
    z[2, ::2] = z[2, 1::2] = 0.7  # pairs of ties
    g = torch.randn(6, n, dtype=torch.float64)
    x, hvp = marginals_and_hvp(z, k, g)
    mean, covariance = brute_force(z, k)
    torch.testing.assert_close(x, mean, atol=1e-12, rtol=0)
    torch.testing.assert_close(hvp, (covariance @ g.unsqueeze(-1)).squeeze(-1), atol=1e-12, rtol=0)
    torch.testing.assert_close(x[1], torch.full((n,), k / n, dtype=torch.float64), atol=1e-14, rtol=0)


@pytest.mark.parametrize("scale", [1e-8, 10.0, 40.0, 1e3, 1e6])
def test_extreme_rows_agree_with_the_torch_path(scale):
    # mixed batches: rows that qualify for the linear-space recurrences and rows left to the log-space DP
    # (the same rule on both paths), outliers far below the maximum (the weight floor)
    generator = torch.Generator().manual_seed(7)
    z = torch.randn(40, 30, dtype=torch.float64, generator=generator)
    z[::3] *= scale
    z[1, :5] -= 1e4  # a few entries far below: floored weights
    z[4, 0] += 1e5  # one item far above: k - 1 slots left among the rest
    g = torch.randn(40, 30, dtype=torch.float64, generator=generator)
    for k in (1, 6, 14):
        (x, hvp), (x_ref, hvp_ref) = both_paths(z, k, g)
        torch.testing.assert_close(x, x_ref, atol=1e-12, rtol=0)
        torch.testing.assert_close(hvp, hvp_ref, atol=1e-12 * max(1.0, scale), rtol=0)
        assert torch.isfinite(x).all() and torch.isfinite(hvp).all()


def test_rows_at_the_qualification_boundary():
    # k entries exactly at depth span below the maximum qualify, one ulp deeper do not: both paths alike
    n, k = 30, 6
    span = ksubset_module._linear_span(n, k)
    z = torch.full((3, n), -2 * span, dtype=torch.float64)
    z[:, 0] = 0.0
    z[0, 1:k] = -span
    z[1, 1:k] = -span * (1 + 1e-15)
    z[2, 1:k] = -span / 2
    g = torch.randn(3, n, dtype=torch.float64)
    (x, hvp), (x_ref, hvp_ref) = both_paths(z, k, g)
    torch.testing.assert_close(x, x_ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(hvp, hvp_ref, atol=1e-12, rtol=0)


@pytest.mark.parametrize("shape", [(0, 20), (1, 20), (8, 20), (2, 3, 20)])
def test_batch_shapes_and_float32(shape):
    P = KSubset(20, 7)
    for dtype in (torch.float64, torch.float32):
        U = torch.randn(shape, dtype=dtype)
        X = sstcvx.relax(P, U, 0.7, "exp_family_entropy", solver="specialized")
        assert X.shape == U.shape and X.dtype == dtype
        with disabled():
            reference = sstcvx.relax(P, U, 0.7, "exp_family_entropy", solver="specialized")
        torch.testing.assert_close(X, reference, atol=1e-13 if dtype == torch.float64 else 1e-6, rtol=0)
        Ug = U.clone().requires_grad_(True)
        sstcvx.relax(P, Ug, 0.7, "exp_family_entropy", solver="specialized").sum().backward()  # an expanded gradient
        assert Ug.grad.shape == U.shape and torch.isfinite(Ug.grad).all()
        # sum x = k along every row, so the gradient of sum x is zero
        torch.testing.assert_close(Ug.grad, torch.zeros_like(U), atol=1e-12 if dtype == torch.float64 else 1e-5, rtol=0)


def test_non_contiguous_input_and_gradient():
    z = torch.randn(20, 6, dtype=torch.float64).T  # (6, 20), not contiguous
    g = torch.randn(20, 6, dtype=torch.float64).T
    (x, hvp), (x_ref, hvp_ref) = both_paths(z, 5, g)
    torch.testing.assert_close(x, x_ref, atol=1e-13, rtol=0)
    torch.testing.assert_close(hvp, hvp_ref, atol=1e-13, rtol=0)


def test_gradcheck_through_the_compiled_path():
    # n = 12, k = 5: C(12, 5) 12 > 4096, so the public function does not enumerate; one row log-space
    assert math.comb(12, 5) * 12 > ksubset_module._ENUMERATE_ENTRIES
    P = KSubset(12, 5)
    U = torch.randn(3, 12, dtype=torch.float64)
    U[2] *= 200.0
    U.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda u: sstcvx.relax(P, u, 0.8, "exp_family_entropy"), (U,))
    # double backward falls back to the log-space DP by autograd
    assert torch.autograd.gradgradcheck(
        lambda u: sstcvx.relax(P, u, 0.8, "exp_family_entropy"), (U[:2].detach().requires_grad_(True),)
    )


def test_the_compiled_path_is_taken(monkeypatch):
    P = KSubset(45, 9)
    U = torch.randn(4, 45, dtype=torch.float64, requires_grad=True)
    calls = []

    def counting(name):
        original = getattr(compiled_gibbs, name)

        def wrapper(*args):
            calls.append(name)
            return original(*args)

        return wrapper

    monkeypatch.setattr(compiled_gibbs, "gibbs_forward", counting("gibbs_forward"))
    monkeypatch.setattr(compiled_gibbs, "gibbs_hvp", counting("gibbs_hvp"))
    sstcvx.relax(P, U, 1.0, "exp_family_entropy").square().sum().backward()
    assert calls == ["gibbs_forward", "gibbs_hvp"]
    with disabled():
        sstcvx.relax(P, U, 1.0, "exp_family_entropy").square().sum().backward()
    assert calls == ["gibbs_forward", "gibbs_hvp"]

    def failing(*args):
        raise RuntimeError("kernel called")

    monkeypatch.setattr(compiled_gibbs, "gibbs_forward", failing)
    with pytest.raises(RuntimeError, match="kernel called"):
        sstcvx.relax(P, U, 1.0, "exp_family_entropy")
    # tiny sizes: enumeration at a small batch, the kernel at a large one (on the CPU)
    small = KSubset(10, 3)
    sstcvx.relax(small, torch.randn(2, 10, dtype=torch.float64), 1.0, "exp_family_entropy")
    with pytest.raises(RuntimeError, match="kernel called"):
        sstcvx.relax(small, torch.randn(128, 10, dtype=torch.float64), 1.0, "exp_family_entropy")
    with disabled():
        sstcvx.relax(small, torch.randn(128, 10, dtype=torch.float64), 1.0, "exp_family_entropy")


def test_kernel_state_is_not_the_output():
    # changing the returned marginals in place does not change the backward (the kernel keeps its own state)
    z = torch.randn(3, 30, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 30, dtype=torch.float64)
    x = GibbsMarginals.apply(z, 8)
    (expected,) = torch.autograd.grad(x, z, g, retain_graph=True)
    x.data.mul_(2.0)
    (again,) = torch.autograd.grad(x, z, g)
    torch.testing.assert_close(again, expected, atol=0, rtol=0)
