"""The level-scheduled sparse Cholesky factorization of the interior-point method
(sstcvx.generic.sparse_cholesky): against a dense solve on several patterns, the depth of its
nested-dissection order, and the choice between it and the dense factorization."""

import math

import pytest
import torch

from sstcvx.generic.sparse_cholesky import PIVOT_FLOOR, SparseCholesky, nested_dissection, worth_it


def path_pattern(m):
    band = torch.eye(m) + torch.diag(torch.ones(m - 1), 1) + torch.diag(torch.ones(m - 1), -1)
    return band > 0


def grid_pattern(side):
    m = side * side
    nz = torch.eye(m, dtype=torch.bool)
    for i in range(side):
        for j in range(side):
            a = i * side + j
            if i + 1 < side:
                nz[a, a + side] = nz[a + side, a] = True
            if j + 1 < side:
                nz[a, a + 1] = nz[a + 1, a] = True
    return nz


def random_pattern(m, density, seed):
    g = torch.Generator().manual_seed(seed)
    nz = torch.rand(m, m, generator=g) < density
    return nz | nz.T | torch.eye(m, dtype=torch.bool)


def spd_batch(nz, B, seed):
    g = torch.Generator().manual_seed(seed)
    m = nz.shape[0]
    A = torch.randn(B, m, m, dtype=torch.float64, generator=g) * nz
    A = A + A.mT
    return A + (A.abs().sum(-1).amax() + 1.0) * torch.eye(m, dtype=torch.float64)


def factor(chol, nz, A):
    """The factor of the batch A (B, m, m) through the public interface (batch last)."""
    r, c = nz.nonzero(as_tuple=True)
    keep, where = chol.lower_positions(r, c)
    F = torch.zeros(chol.nnz + chol.m, A.shape[0], dtype=A.dtype)
    F[where] = A[:, r, c].T[keep]
    return chol.factor(F)


@pytest.mark.parametrize(
    "nz", [path_pattern(29), path_pattern(2), grid_pattern(6), random_pattern(15, 0.15, 0), random_pattern(40, 0.05, 1)]
)
def test_solves_like_a_dense_solve(nz):
    chol = SparseCholesky(nz)
    A = spd_batch(nz, 5, seed=2)
    b = torch.randn(5, nz.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    x = chol.solve(factor(chol, nz, A), b.T).T
    torch.testing.assert_close(x, torch.linalg.solve(A, b), atol=1e-12, rtol=0)


def test_nested_dissection_of_a_path_is_shallow():
    """A path of m rows: the natural order's elimination tree has height m, nested dissection about log2 m."""
    for m in (7, 31, 100):
        chol = SparseCholesky(path_pattern(m))
        assert chol.levels <= math.ceil(math.log2(m + 1)) + 1
        assert chol.nnz <= 2 * m + m  # a path's fill stays linear
    order = nested_dissection([{1}, {0, 2}, {1}])
    assert sorted(order) == [0, 1, 2] and order[-1] == 1  # the separator is eliminated last


def test_worth_it_only_for_shallow_trees():
    assert worth_it(SparseCholesky(path_pattern(29)))
    assert not worth_it(SparseCholesky(path_pattern(6)))  # a dense LAPACK call is cheaper
    assert not worth_it(SparseCholesky(torch.ones(20, 20, dtype=torch.bool)))  # a full matrix: one long chain


def test_singular_matrix_gives_a_finite_factor():
    """A rank-deficient matrix (dependent active rows) keeps a finite factor: pivots are floored."""
    nz = path_pattern(13)
    A = spd_batch(nz, 2, seed=4)
    A[:, 0, :] = A[:, 1, :]
    A[:, :, 0] = A[:, :, 1]
    chol = SparseCholesky(nz)
    F = factor(chol, nz, A)
    assert bool(torch.isfinite(F).all()) and float(F[chol.nnz :].amax()) <= 1 / PIVOT_FLOOR
