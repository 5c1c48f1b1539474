"""The canonical linear form of declared polytopes (sstcvx.linear_form)."""

import cvxpy as cp
import pytest
import torch

import sstcvx
from polytopes import KSubset, Permutation


def test_ksubset_form_is_one_row_and_unit_bounds():
    L = KSubset(6, 2).linear_form()
    assert (L.m_eq, L.m_in, L.n_aux) == (1, 0, 0)
    torch.testing.assert_close(L.A, torch.ones(1, 6, dtype=torch.float64))
    torch.testing.assert_close(L.b, torch.tensor([2.0], dtype=torch.float64))
    assert torch.equal(L.lower, torch.zeros(6, dtype=torch.float64))
    assert torch.equal(L.upper, torch.ones(6, dtype=torch.float64))
    assert KSubset(6, 2).linear_form() is not L  # a different polytope object
    P = KSubset(5, 2)
    assert P.linear_form() is P.linear_form()  # cached


def test_matrix_variable_is_flattened_row_major_and_rows_scaled():
    x = cp.Variable((2, 3))
    P = sstcvx.Polytope.from_cvxpy(x, [x >= 0, x <= 1, 3 * x[0, 1] + 3 * x[1, 0] <= 3, cp.sum(x) == 2])
    L = P.linear_form()
    assert L.m_in == 1 and L.m_eq == 1
    expected = torch.zeros(6, dtype=torch.float64)
    expected[1] = expected[3] = 1.0  # (0, 1) and (1, 0) in row-major order
    torch.testing.assert_close(L.G[0], expected)
    torch.testing.assert_close(L.h, torch.tensor([1.0], dtype=torch.float64))


def test_redundant_rows_are_dropped_and_opposite_pairs_merged():
    x = cp.Variable(4)
    cons = [
        x >= 0,
        x <= 1,
        x[:3] + x[1:] <= 1,
        2 * x[0] + 2 * x[1] <= 2,
        cp.sum(x) <= 2,
        cp.sum(x) >= 2,
        x[0] + x[3] <= 2,
        3 * x[2] <= 5,
    ]
    L = sstcvx.Polytope.from_cvxpy(x, cons).linear_form()
    # duplicate (scaled) row, a row implied by the bounds and a loose bound dropped; sum <= 2, sum >= 2 merged
    assert (L.m_eq, L.m_in) == (1, 3)
    torch.testing.assert_close(L.b, torch.tensor([2.0], dtype=torch.float64))
    assert torch.equal(L.upper, torch.ones(4, dtype=torch.float64))


def test_dependent_equalities_dropped_birkhoff():
    L = Permutation(4).linear_form()
    assert (L.m_eq, L.m_in) == (7, 0)  # 2n - 1 independent rows of the 2n
    assert int(torch.linalg.matrix_rank(L.A)) == 7


def test_auxiliary_variables_of_a_vertex_polytope():
    V = torch.tensor([[1.0, 0, 1], [0, 1, 1], [1, 1, 0]])
    P = sstcvx.Polytope.from_vertices(V)
    L = P.linear_form()
    assert L.n == 3 and L.n_aux == 3
    # each vertex satisfies the form with some weights (the columns of w are in CVXPY's order)
    for j in range(3):
        Aw = L.A[:, 3:]
        w = torch.linalg.lstsq(Aw, L.b - L.A[:, :3] @ V[j].double()).solution
        assert float(L.residuals(torch.cat([V[j].double(), w]))) < 1e-9


def test_nonlinear_declaration_raises():
    x = cp.Variable(3)
    P = sstcvx.Polytope.from_cvxpy(x, [x >= 0, cp.norm(x, 2) <= 1])
    with pytest.raises(ValueError, match="not linear"):
        P.linear_form()


def test_to_moves_and_caches():
    L = KSubset(4, 2).linear_form()
    L32 = L.to(dtype=torch.float32)
    assert L32.A.dtype == torch.float32 and L.to(dtype=torch.float32) is L32
    assert L.to(dtype=torch.float64) is L
