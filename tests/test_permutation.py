"""polytopes.Permutation: facts of Sinkhorn, the Birkhoff projection and the Hungarian argmax; the shared contract is tests/test_contract.py."""

import math

import pytest
import torch
from _permutation_inputs import descent_directions, gumbel_utilities

import sstcvx
from polytopes import Permutation
from polytopes.permutation import birkhoff_projection, hungarian, sinkhorn


def marginal_violation(X):
    X = X.double()
    return max((X.sum(-1) - 1).abs().max().item(), (X.sum(-2) - 1).abs().max().item())


def unrolled_sinkhorn(Z, sweeps):
    """Test-only reference: plain log-domain Sinkhorn, differentiated by autograd through every sweep."""
    a = torch.zeros(Z.shape[:-1], dtype=Z.dtype)
    b = torch.zeros_like(a)
    for _ in range(sweeps):
        a = -torch.logsumexp(Z + b.unsqueeze(-2), -1)
        b = -torch.logsumexp(Z + a.unsqueeze(-1), -2)
    return torch.exp(Z + a.unsqueeze(-1) + b.unsqueeze(-2))


def test_rejects_bad_arguments():
    for n in (1, 0, -3):
        with pytest.raises(ValueError, match="n"):
            Permutation(n)
    for n in (2.0, True, "3"):
        with pytest.raises(TypeError, match="n"):
            Permutation(n)
    with pytest.raises(ValueError, match="Z"):
        sinkhorn(torch.zeros(3, 4))
    with pytest.raises(TypeError, match="Z"):
        sinkhorn(torch.zeros(3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="Z"):
        sinkhorn(torch.tensor([[0.0, float("nan")], [0.0, 0.0]]))
    with pytest.raises(ValueError, match="tol"):
        sinkhorn(torch.zeros(3, 3), tol=0.0)
    with pytest.raises(ValueError, match="max_iter"):
        sinkhorn(torch.zeros(3, 3), max_iter=0)
    with pytest.raises(ValueError, match="U"):
        hungarian(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="U"):
        hungarian(torch.tensor([[0.0, float("inf")], [0.0, 0.0]]))


@pytest.mark.parametrize("n", [2, 3, 5, 6])
def test_vertices_are_the_permutation_matrices(n):
    V = Permutation(n).vertices
    assert V.shape == (math.factorial(n), n, n) and V.dtype == torch.float64
    assert ((V == 0) | (V == 1)).all() and (V.sum(-1) == 1).all() and (V.sum(-2) == 1).all()
    assert torch.unique(V.reshape(V.shape[0], -1), dim=0).shape[0] == V.shape[0]
    assert Permutation(7).vertices is None


def test_declaration_is_the_birkhoff_polytope():
    P = Permutation(4)
    x, constraints = P.cvxpy_declaration()
    assert x.shape == (4, 4) and len(constraints) == 3
    assert P.check(n_directions=4)  # LP vertices in random directions are integral


def test_satisfies_the_optimality_conditions():
    # X = exp(Z + a 1^T + 1 b^T): log X - Z is a sum of a row and a column term (zero double-centring),
    # and X is doubly stochastic
    Z = 3 * torch.randn(5, 6, 6, dtype=torch.float64)
    X = sinkhorn(Z)
    R = X.log() - Z
    centred = R - R.mean(-1, keepdim=True) - R.mean(-2, keepdim=True) + R.mean((-2, -1), keepdim=True)
    assert centred.abs().max() < 1e-10
    assert marginal_violation(X) < 1e-12


def test_gradgradcheck():
    U = torch.randn(1, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda u: sinkhorn(u / 0.7), (U,))


@pytest.mark.parametrize("scale", [0.5, 3.0])
def test_vjp_matches_autograd_through_unrolled_sinkhorn(scale):
    Z = (scale * torch.randn(4, 5, 5, dtype=torch.float64)).requires_grad_(True)
    G = torch.randn(4, 5, 5, dtype=torch.float64)
    X = sinkhorn(Z)
    (ours,) = torch.autograd.grad((G * X).sum(), Z)
    X_ref = unrolled_sinkhorn(Z, 2000)
    (reference,) = torch.autograd.grad((G * X_ref).sum(), Z)
    torch.testing.assert_close(X, X_ref, atol=1e-10, rtol=0)
    torch.testing.assert_close(ours, reference, atol=1e-9, rtol=0)
    assert ours.abs().max() > 1e-2  # the comparison is not between two zeros


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch", [(), (3,), (2, 3)])
def test_module_functions_keep_batch_shape_and_dtype(batch, dtype):
    U = torch.randn(*batch, 4, 4, dtype=dtype)
    for X in (hungarian(U), sinkhorn(U)):
        assert X.shape == U.shape and X.dtype == dtype and X.device == U.device
    if batch:
        assert torch.equal(hungarian(U), hungarian(U.reshape(-1, 4, 4)).reshape(U.shape))


def test_nearly_tied_vertices_at_a_huge_spread():
    # identity and the swap of items 0 and 1 differ by 1 in score inside a spread of 3e6; on the 2 x 2 block
    # the fixed point has X00 X11 / (X01 X10) = exp(Z00 + Z11 - Z01 - Z10) = e, so X00 = sigmoid(1/2).  Getting
    # this to 1e-9 needs rounding relative to O(1), not to |Z| = 1e6 (where one ulp is 1e-10).
    Z = torch.full((3, 3), -1e6, dtype=torch.float64)
    Z[0, 0] = Z[1, 1] = 1e6
    Z[0, 1] = Z[1, 0] = 1e6 - 0.5
    Z[2, 2] = 2e6
    p = 1 / (1 + math.exp(-0.5))
    expected = torch.tensor([[p, 1 - p, 0.0], [1 - p, p, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(sinkhorn(Z), expected, atol=1e-9, rtol=0)


def test_warns_when_the_iteration_budget_is_too_small():
    Z = 1e4 * torch.randn(2, 6, 6, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="max_iter"):
        sinkhorn(Z, max_iter=2)


def test_exp_family_entropy_by_enumeration_on_auto_and_by_the_conic_path_on_generic():
    """No specialized solver (the marginals need a permanent): auto enumerates the n! vertices
    exactly, generic solves the entropy problem over the vertex weights with CVXPY."""
    P = Permutation(4)
    assert sstcvx.relaxation_solver(P, "exp_family_entropy")[1] == "enumeration"
    with pytest.raises(ValueError, match="no specialized solver"):
        sstcvx.relax(P, torch.randn(4, 4), 0.5, "exp_family_entropy", solver="specialized")
    U = torch.randn(3, 4, 4, dtype=torch.float64)
    V = P.vertices.reshape(-1, 16)
    brute = (torch.softmax(U.reshape(3, 16) / 0.5 @ V.T, -1) @ V).reshape(3, 4, 4)
    torch.testing.assert_close(sstcvx.relax(P, U, 0.5, "exp_family_entropy"), brute, atol=1e-12, rtol=0)
    generic = sstcvx.relax(P, U, 0.5, "exp_family_entropy", solver="generic")
    torch.testing.assert_close(generic, brute, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------
# euclidean: the projection onto the Birkhoff polytope
# ---------------------------------------------------------------------------------------------


def project(P, U, tau):
    return sstcvx.relax(P, U, tau, "euclidean")


@pytest.mark.parametrize("n", [3, 5])
def test_projection_is_exact_against_every_vertex(n):
    """X = proj_P(Z) iff <Z - X, V - X> <= 0 for every vertex V: brute force over the n! permutations."""
    P = Permutation(n)
    Z = 2 * torch.randn(8, n, n, dtype=torch.float64)
    X = birkhoff_projection(Z)
    V = P.vertices
    slack = torch.einsum("bij,mij->bm", Z - X, V) - ((Z - X) * X).sum((-2, -1)).unsqueeze(-1)
    assert slack.max() < 1e-10
    assert (X >= 0).all() and marginal_violation(X) < 1e-11
    assert (X == 0).any()  # a projection, not a smoothing: exact zeros


def test_projection_jacobian_is_an_orthogonal_projection():
    # symmetric and idempotent
    P = Permutation(4)
    U = torch.randn(4, 4, dtype=torch.float64)
    J = torch.autograd.functional.jacobian(lambda u: project(P, u, 1.0), U).reshape(16, 16)
    torch.testing.assert_close(J, J.T, atol=1e-10, rtol=0)
    torch.testing.assert_close(J @ J, J, atol=1e-10, rtol=0)


@pytest.mark.parametrize("regularizer", ["entropy", "euclidean"])
def test_large_tau_gives_the_barycentre(regularizer):
    # argmin of f over the Birkhoff polytope: the uniform matrix 1/n for the entropy and ||x||^2 alike
    U = torch.randn(8, 5, 5, dtype=torch.float64)
    atol = 1e-7 if regularizer == "entropy" else 1e-6  # the projection moves by (U / tau) minus its means
    torch.testing.assert_close(
        sstcvx.relax(Permutation(5), U, 1e7, regularizer), torch.full_like(U, 1 / 5), atol=atol, rtol=0
    )


@pytest.mark.parametrize("n", [4, 10])
def test_projection_newton_path_agrees_with_the_staged_solver(n):
    """The full-dual Newton path (spread <= 32) against the staged reduced-dual solver, batch 40 (compacted)."""
    from polytopes import birkhoff

    Z = gumbel_utilities(40, n)
    X, unconverged, violation = birkhoff._birkhoff_forward(Z, 1e-12, 200)
    reference, _, _ = birkhoff._birkhoff_staged(Z, 1e-14, 400)
    assert unconverged == 0 and violation < 1e-12
    assert (X >= 0).all() and marginal_violation(X) < 1e-12
    torch.testing.assert_close(X, reference, atol=1e-12, rtol=0)
    # elements the Newton path does not finish within its budget go to the staged solver
    birkhoff_budget = birkhoff._NEWTON_MAX_ITER
    try:
        birkhoff._NEWTON_MAX_ITER = 1
        X_left, unconverged, _ = birkhoff._birkhoff_forward(Z, 1e-12, 200)
    finally:
        birkhoff._NEWTON_MAX_ITER = birkhoff_budget
    assert unconverged == 0  # the staged solver stops at column sums within 1e-12, so X within about that
    torch.testing.assert_close(X_left, reference, atol=3e-12, rtol=0)


def test_projection_newton_path_finishes_tied_and_integer_inputs():
    """Heavily tied Z (0/1 and small integers, n = 20): the full-dual Newton path alone reaches the tolerance.

    Its ridge is tiny near the solution (so that the step that finds the support lands on it); far from
    it (residual above 1) it keeps a Levenberg-Marquardt damping, without which elements here stall.
    """
    from polytopes import birkhoff

    generator = torch.Generator().manual_seed(7)
    n = 20
    for Z in (
        3.0 * torch.randint(-3, 4, (48, n, n), generator=generator).double(),
        10.0 * torch.randint(0, 2, (48, n, n), generator=generator).double(),
    ):
        tol = 1e-12 + 16 * n * torch.finfo(torch.float64).eps * Z.abs().amax((-2, -1))
        X, err, _ = birkhoff._birkhoff_newton(Z, tol, birkhoff._NEWTON_MAX_ITER)
        assert bool((err <= tol).all()) and marginal_violation(X) < 1e-11


def test_projection_newton_path_lands_where_rounding_level_entries_join_blocks():
    """Two inputs whose solution's support has entries of Y at 0 (to rounding) joining two blocks: counted out at
    alternate steps, they made the residual fall only 8x per step (16 steps); counted in, a few steps."""
    from polytopes import birkhoff

    generator = torch.Generator().manual_seed(1)
    theta = torch.randn(512, 10, 10, dtype=torch.float64, generator=generator)
    Z = (theta - torch.log(-torch.log(torch.rand(512, 10, 10, dtype=torch.float64, generator=generator))))[[229, 249]]
    tol = torch.full((1,), 1e-12, dtype=torch.float64)
    for i in range(2):
        X, err, steps = birkhoff._birkhoff_newton(Z[i : i + 1], tol, birkhoff._NEWTON_MAX_ITER)
        assert err.item() <= 1e-12 and steps <= 9
        reference = birkhoff._birkhoff_staged(Z[i : i + 1], 1e-14, 500)[0]
        torch.testing.assert_close(X, reference, atol=1e-12, rtol=0)


def test_projection_support_adjoint_is_the_general_adjoint():
    """The projection's backward (_support_vjp) against sinkhorn_vjp on the support, connected or not."""
    from polytopes import birkhoff
    from polytopes.sinkhorn import sinkhorn_vjp

    generator = torch.Generator().manual_seed(4)
    for scale, n in ((0.3, 5), (2.0, 10), (100.0, 6)):  # dense, sparse, and near-permutation supports
        S = (birkhoff_projection(scale * torch.randn(16, n, n, dtype=torch.float64, generator=generator)) > 0).double()
        G = torch.randn(16, n, n, dtype=torch.float64, generator=generator)
        torch.testing.assert_close(birkhoff._support_vjp(S, G), sinkhorn_vjp(S, G), atol=1e-12, rtol=0)


def test_projection_exact_line_search_minimises_along_the_direction():
    """_exact_step's t against a dense grid of phi(t) = 1/2 |max(Y - t D, 0)|^2 + t sum(du + dv) on [0, 1]."""
    from polytopes import birkhoff

    Y, du, dv = descent_directions(6, 5, seed=3)
    t = birkhoff._exact_step(Y, du, dv).flatten()
    grid = torch.linspace(0.0, 1.0, 20001, dtype=torch.float64)
    D = (du + dv).unsqueeze(1)  # (6, 1, 5, 5)
    phi = 0.5 * (Y.unsqueeze(1) - grid.view(1, -1, 1, 1) * D).clamp_min(0.0).square().sum((-2, -1))
    phi = phi + grid * (du.sum((-2, -1)) + dv.sum((-2, -1))).unsqueeze(-1)
    best = grid[phi.argmin(-1)]
    assert (t > 0).all()
    torch.testing.assert_close(t, best, atol=1e-4, rtol=0)


def test_sinkhorn_batch_compaction_and_factorisation_fallback(monkeypatch):
    """Setting converged elements aside (batch >= 32) changes no element; a failed factorisation falls back."""
    from polytopes import sinkhorn as sinkhorn_module
    from sstcvx import _compiled

    # the torch path's compaction and fallback (the CPU kernel's: tests/test_compiled_sinkhorn.py)
    monkeypatch.setattr(_compiled, "ENABLED", False)

    Z = gumbel_utilities(48, 6, seed=1)
    X = sinkhorn(Z)
    alone = torch.cat([sinkhorn(Z[i : i + 1]) for i in range(len(Z))])
    torch.testing.assert_close(X, alone, atol=1e-12, rtol=0)
    factor, calls = torch.linalg.cholesky_ex, []

    def failing_once(H):
        calls.append(1)
        L, info = factor(H)
        return (L * float("nan"), info) if len(calls) == 2 else (L, info)

    monkeypatch.setattr(torch.linalg, "cholesky_ex", failing_once)
    X_fallback, unconverged, _ = sinkhorn_module._sinkhorn_forward(Z, 1e-12, 500)
    assert len(calls) > 2 and unconverged == 0
    torch.testing.assert_close(X_fallback, X, atol=1e-11, rtol=0)


def test_sinkhorn_row_layout_products_agree_with_the_column_layout(monkeypatch):
    """From n = _ROW_LAYOUT_N the sweeps and the adjoint take products as row vectors: same X and dL/dZ."""
    from polytopes import sinkhorn as sinkhorn_module

    Z = gumbel_utilities(3, 24, seed=5)
    G = torch.randn(3, 24, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    K = torch.exp(Z - Z.amax(-1, keepdim=True))
    rows = sinkhorn_module._linear_sweeps(K, 4)
    X = sinkhorn(Z)
    adjoint = sinkhorn_module._sinkhorn_adjoint(X, G)
    monkeypatch.setattr(sinkhorn_module, "_ROW_LAYOUT_N", 10**6)
    torch.testing.assert_close(rows, sinkhorn_module._linear_sweeps(K, 4), atol=0, rtol=1e-12)
    torch.testing.assert_close(adjoint, sinkhorn_module._sinkhorn_adjoint(X, G), atol=1e-13, rtol=0)
    torch.testing.assert_close(adjoint, sinkhorn_module.sinkhorn_vjp(X, G), atol=1e-12, rtol=0)
    assert adjoint.abs().max() > 1e-2


def test_projection_arguments_and_budget():
    with pytest.raises(ValueError, match="tol"):
        birkhoff_projection(torch.zeros(3, 3), tol=0.0)
    with pytest.raises(ValueError, match="Z: expected finite"):
        birkhoff_projection(torch.full((3, 3), float("nan")))
    with pytest.warns(RuntimeWarning, match="max_iter"):
        birkhoff_projection(1e4 * torch.randn(2, 6, 6, dtype=torch.float64), max_iter=1)
    assert birkhoff_projection(torch.zeros(0, 3, 3)).shape == (0, 3, 3)


# ---------------------------------------------------------------------------------------------
# the batched auction against SciPy
# ---------------------------------------------------------------------------------------------


def assignment_value(U, X):
    return (U * X).sum((-2, -1))


@pytest.mark.parametrize("kind", ["real", "integer", "ties"])
@pytest.mark.parametrize("n", [2, 3, 7, 16])
def test_auction_is_optimal_against_scipy(kind, n):
    from polytopes.permutation import auction_assignment

    generator = torch.Generator().manual_seed(n)
    if kind == "real":
        U = 1e3 * torch.randn(32, n, n, dtype=torch.float64, generator=generator)
    elif kind == "integer":
        U = torch.randint(-50, 50, (32, n, n), generator=generator).double()
    else:  # many optimal assignments: compare values, and that the result is a permutation
        U = torch.randint(0, 2, (32, n, n), generator=generator).double()
    X, reference = auction_assignment(U), hungarian(U)
    assert ((X == 0) | (X == 1)).all() and (X.sum(-1) == 1).all() and (X.sum(-2) == 1).all()
    assert torch.equal(assignment_value(U, X), assignment_value(U, reference))
    if kind == "real":  # the optimum is unique almost surely
        assert torch.equal(X, reference)


def test_auction_certificate_rejects_a_suboptimal_assignment_and_falls_back():
    from polytopes.permutation import _certified, max_weight_assignment

    U = torch.randn(6, 5, 5, dtype=torch.float64)
    best = hungarian(U).argmax(-1)
    worst = hungarian(-U).argmax(-1)
    assert _certified(U, best).all() and not _certified(U, worst).any()
    # a budget of one bidding round cannot finish: SciPy answers instead
    from polytopes.permutation import auction_assignment

    assert torch.equal(auction_assignment(U, max_rounds=1), hungarian(U))
    assert torch.equal(max_weight_assignment(U, method="auction"), hungarian(U))
    with pytest.raises(ValueError, match="method"):
        max_weight_assignment(U, method="greedy")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_auction_runs_on_the_device():
    from polytopes.permutation import max_weight_assignment

    U = torch.randn(16, 8, 8, device="cuda", dtype=torch.float64)
    X = max_weight_assignment(U)
    assert X.device == U.device
    assert torch.equal(X.cpu(), hungarian(U.cpu()))
