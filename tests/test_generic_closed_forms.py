"""The generic CVXPY path against closed forms, brute force and analytic Jacobians."""

import itertools

import cvxpy as cp
import pytest
import torch

import sstcvx
from sstcvx.generic import cache as generic_cache


@pytest.fixture(autouse=True)
def _float64_default():
    """These tests compare against float64 closed forms; restore the default dtype afterwards."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def simplex(n):
    x = cp.Variable(n)
    return sstcvx.Polytope.from_cvxpy(x, [x >= 0, cp.sum(x) == 1], name=f"simplex{n}")


def ksubset(n, k):
    x = cp.Variable(n)
    return sstcvx.Polytope.from_cvxpy(x, [x >= 0, x <= 1, cp.sum(x) == k], name=f"ksubset{n},{k}")


def sparsemax(z):
    """Martins & Astudillo's sparsemax, written from its definition: project z onto the simplex."""
    zs, _ = torch.sort(z, dim=-1, descending=True)
    k = torch.arange(1, z.shape[-1] + 1, dtype=z.dtype)
    cumsum = zs.cumsum(-1)
    support = 1 + k * zs > cumsum
    k_z = support.sum(-1, keepdim=True)
    threshold = (cumsum.gather(-1, k_z - 1) - 1) / k_z
    return (z - threshold).clamp_min(0)


def ksubset_binary_entropy(z, k, iters=200):
    """sigmoid(z - nu) with sum = k, nu by bisection."""
    lo = z.min(-1, keepdim=True).values - 50
    hi = z.max(-1, keepdim=True).values + 50
    for _ in range(iters):
        mid = (lo + hi) / 2
        too_many = torch.sigmoid(z - mid).sum(-1, keepdim=True) > k
        lo = torch.where(too_many, mid, lo)
        hi = torch.where(too_many, hi, mid)
    return torch.sigmoid(z - (lo + hi) / 2)


def test_simplex_entropy_is_softmax():
    P = simplex(6)
    U = torch.randn(5, 6) * 2
    for tau in (0.3, 1.0, 4.0):
        X = sstcvx.relax(P, U, tau, "entropy", solver="cvxpylayers")
        torch.testing.assert_close(X, torch.softmax(U / tau, -1), atol=1e-6, rtol=0)


def test_simplex_euclidean_is_sparsemax():
    P = simplex(7)
    U = torch.randn(6, 7)
    X = sstcvx.relax(P, U, 0.5, "euclidean", solver="cvxpylayers")
    torch.testing.assert_close(X, sparsemax(U / 0.5), atol=1e-6, rtol=0)


def test_ksubset_binary_entropy_is_shifted_sigmoid():
    P = ksubset(8, 3)
    U = torch.randn(4, 8) * 3
    X = sstcvx.relax(P, U, 0.7, "binary_entropy", solver="cvxpylayers")
    torch.testing.assert_close(X, ksubset_binary_entropy(U / 0.7, 3), atol=1e-6, rtol=0)
    torch.testing.assert_close(X.sum(-1), torch.full((4,), 3.0), atol=1e-7, rtol=0)


def test_analytic_jacobian_of_softmax():
    P = simplex(5)
    u = torch.randn(5)
    J = torch.autograd.functional.jacobian(lambda v: sstcvx.relax(P, v, 1.0, "entropy", solver="cvxpylayers"), u)
    s = torch.softmax(u, -1)
    torch.testing.assert_close(J, torch.diag(s) - torch.outer(s, s), atol=1e-5, rtol=0)


def test_analytic_jacobian_of_sparsemax():
    P = simplex(6)
    u = torch.tensor([1.2, 0.9, 0.1, -0.5, 1.0, -2.0])
    J = torch.autograd.functional.jacobian(lambda v: sstcvx.relax(P, v, 1.0, "euclidean", solver="cvxpylayers"), u)
    support = (sparsemax(u) > 0).to(u.dtype)
    expected = torch.diag(support) - torch.outer(support, support) / support.sum()
    torch.testing.assert_close(J, expected, atol=1e-5, rtol=0)


def test_gradcheck_generic_entropy_small():
    # Finite differences divide the solver error (~1e-8) by eps: eps=1e-3 keeps that near 1e-4,
    # the analytic-Jacobian tests above are the tight check.
    P = simplex(3)
    U = torch.randn(2, 3, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda u: sstcvx.relax(P, u, 1.0, "entropy", solver="cvxpylayers"), (U,), eps=1e-3, atol=1e-3, rtol=1e-2
    )


def test_gradient_wrt_tau():
    P = simplex(4)
    U = torch.randn(4)
    tau = torch.tensor(0.8, requires_grad=True)
    w = torch.randn(4)
    (sstcvx.relax(P, U, tau, "entropy", solver="cvxpylayers") * w).sum().backward()
    tau_ref = tau.detach().clone().requires_grad_()
    (torch.softmax(U / tau_ref, -1) * w).sum().backward()
    torch.testing.assert_close(tau.grad, tau_ref.grad, atol=1e-5, rtol=0)


def test_from_vertices_matches_brute_force():
    vertices = torch.tensor([list(b) for b in itertools.product([0.0, 1.0], repeat=4) if sum(b) == 2])
    P = sstcvx.Polytope.from_vertices(vertices)
    U = torch.randn(10, 4)
    brute = vertices[(U @ vertices.T).argmax(-1)]
    torch.testing.assert_close(sstcvx.argmax(P, U), brute)
    torch.testing.assert_close(sstcvx.argmax(P, U, solver="cvxpylayers"), brute)
    Z = U / 0.5
    gibbs = torch.softmax(Z @ vertices.T, -1) @ vertices
    torch.testing.assert_close(sstcvx.relax(P, U, 0.5, "exp_family_entropy"), gibbs, atol=1e-12, rtol=0)
    # from_vertices has a CVXPY form: the generic path on its convex hull equals the k-subset closed form
    X = sstcvx.relax(P, U, 0.5, "binary_entropy", solver="cvxpylayers")
    torch.testing.assert_close(X, ksubset_binary_entropy(Z, 2), atol=1e-5, rtol=0)


def test_from_vertices_matrix_event():
    perms = torch.stack([torch.eye(3)[list(p)] for p in itertools.permutations(range(3))])
    P = sstcvx.Polytope.from_vertices(perms)
    assert P.event_shape == (3, 3)
    U = torch.randn(4, 3, 3)
    brute = perms[torch.einsum("bij,mij->bm", U, perms).argmax(-1)]
    torch.testing.assert_close(sstcvx.argmax(P, U, solver="cvxpylayers"), brute)
    X = sstcvx.relax(P, U, 1.0, "entropy", solver="cvxpylayers")
    torch.testing.assert_close(X.sum(-1), torch.ones(4, 3), atol=1e-6, rtol=0)
    torch.testing.assert_close(X.sum(-2), torch.ones(4, 3), atol=1e-6, rtol=0)


def test_exp_family_entropy_on_simplex_vertices_is_softmax():
    P = sstcvx.Polytope.from_vertices(torch.eye(5))
    U = torch.randn(3, 5)
    torch.testing.assert_close(sstcvx.relax(P, U, 0.4, "exp_family_entropy"), torch.softmax(U / 0.4, -1))


def test_hard_sample_is_exact_vertex():
    P = ksubset(8, 3)
    X = sstcvx.argmax(P, torch.randn(20, 8), solver="cvxpylayers")
    assert set(X.unique().tolist()) <= {0.0, 1.0}
    assert (X.sum(-1) == 3).all()
    assert not torch.signbit(X).any()  # no negative zeros from snapping


def test_tau_to_zero_gives_argmax():
    P = ksubset(6, 2)
    U = torch.randn(5, 6)
    hard = sstcvx.argmax(P, U, solver="cvxpylayers")
    soft = sstcvx.relax(P, U, 1e-2, "euclidean", solver="cvxpylayers")
    torch.testing.assert_close(soft, hard, atol=1e-5, rtol=0)


def test_user_regularizer_matches_builtin():
    P = simplex(5)
    U = torch.randn(3, 5)
    half_sq = sstcvx.Regularizer.from_cvxpy(lambda x: 0.5 * cp.sum_squares(x), name="half_sq")
    torch.testing.assert_close(
        sstcvx.relax(P, U, 0.5, half_sq), sstcvx.relax(P, U, 0.5, "euclidean", solver="cvxpylayers"), atol=1e-6, rtol=0
    )


def test_layer_is_built_once_and_reused():
    P = simplex(4)
    sstcvx.relax(P, torch.randn(2, 4), 1.0, "entropy", solver="cvxpylayers")
    cached = generic_cache.entries(P)
    sstcvx.relax(P, torch.randn(7, 3, 4), 0.1, "entropy", solver="cvxpylayers")
    assert generic_cache.entries(P) == cached and ("relax", "builtin", "entropy") in cached


def test_implausible_derivative_is_recomputed():
    """A case where diffcp's derivative from Clarabel's solution was off by 3e4 (one element)."""
    g = torch.Generator().manual_seed(0)
    theta = torch.randn((16, 10), generator=g)
    U = theta + sstcvx.noise.get_noise("gumbel").sample(theta.shape, dtype=torch.float64, generator=g)
    G = torch.randn(U.shape, generator=g)
    P = simplex(10)
    u = U.clone().requires_grad_()
    X = sstcvx.relax(P, u, 0.3, "entropy", solver="cvxpylayers")
    with pytest.warns(RuntimeWarning, match="derivative of batch element 10 was implausible"):
        (vjp,) = torch.autograd.grad((X * G).sum(), u)
    u2 = U.clone().requires_grad_()
    (expected,) = torch.autograd.grad((torch.softmax(u2 / 0.3, -1) * G).sum(), u2)
    torch.testing.assert_close(vjp, expected, atol=1e-3, rtol=0)


def test_euclidean_defaults_to_scs_and_is_accurate():
    P = ksubset(10, 3)
    U = torch.randn(16, 10) * 2
    X = sstcvx.relax(P, U, 0.5, "euclidean", solver="cvxpylayers")
    reference = sstcvx.relax(P, U, 0.5, "euclidean", solver="cvxpylayers", solver_args=sstcvx.generic.CLARABEL_ARGS)
    torch.testing.assert_close(X, reference, atol=1e-5, rtol=0)  # both solvers agree
    torch.testing.assert_close(X.sum(-1), torch.full((16,), 3.0), atol=1e-8, rtol=0)


def test_exp_family_entropy_generic_path_is_a_conic_problem_over_the_vertex_weights():
    """A*(x) = min {sum l log l : l in the simplex, V^T l = x}: the generic path solves the entropy
    relaxation over the vertex weights by CVXPY and maps back; it equals the Gibbs marginals, and
    its Jacobian the Gibbs covariance / tau (the E.F. Jacobian is a covariance)."""
    V = torch.tensor([list(b) for b in itertools.product([0.0, 1.0], repeat=5) if sum(b) == 2])
    P = sstcvx.Polytope.from_vertices(V)
    relaxation, path = sstcvx.relaxation_solver(P, "exp_family_entropy", solver="cvxpylayers")
    assert path == "generic" and relaxation.lifted is not None and relaxation.lifted.layer is not None
    tau = 0.6
    U = torch.randn(4, 5, requires_grad=True)
    G = torch.randn(4, 5)
    X = sstcvx.relax(P, U, tau, "exp_family_entropy", solver="cvxpylayers")
    p = torch.softmax(U.detach() / tau @ V.T, -1)
    mean = p @ V
    torch.testing.assert_close(X, mean, atol=1e-6, rtol=0)
    (grad,) = torch.autograd.grad((X * G).sum(), U)
    covariance = torch.einsum("bm,mi,mj->bij", p, V, V) - mean[:, :, None] * mean[:, None, :]
    torch.testing.assert_close(grad, torch.einsum("bij,bj->bi", covariance, G) / tau, atol=1e-5, rtol=0)
