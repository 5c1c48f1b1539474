"""The compiled CPU Birkhoff projection (polytopes/_compiled_birkhoff.py) against the torch path it replaces."""

import numpy as np
import pytest
import torch
from _permutation_inputs import both_paths, descent_directions, gumbel_utilities, violation

import sstcvx
from polytopes import Permutation, _compiled, _compiled_birkhoff
from polytopes import birkhoff as birkhoff_module
from polytopes.birkhoff import birkhoff_projection
from polytopes.permutation import hungarian


def assert_is_the_projection(X, Z, atol):
    """X = argmin_{x doubly stochastic} |x - Z|^2 iff X is doubly stochastic and <Z - X, V - X> <= 0 for
    every permutation matrix V: the largest <Z - X, V> by the Hungarian algorithm (no vertex list)."""
    X, Z = X.detach().double(), Z.double()
    assert (X >= 0).all() and violation(X) <= atol
    W = Z - X
    V = hungarian(W)
    slack = (W * (V - X)).sum((-2, -1))
    assert float(slack.max()) <= atol * (1.0 + float(Z.abs().max())) * Z.shape[-1]


def assert_gradients_agree(X, grad, X_ref, grad_ref, G, atol):
    """The gradients agree where the two supports do; elsewhere (an entry at 0 to rounding: either side is an
    element of the generalised Jacobian) each is the backward on its own support {X > 0}."""
    same = ((X > 0) == (X_ref > 0)).flatten(1).all(-1)
    torch.testing.assert_close(grad[same], grad_ref[same], atol=atol, rtol=0)
    for Xs, grads in ((X, grad), (X_ref, grad_ref)):
        S = torch.gt(Xs.detach(), 0.0).double()
        torch.testing.assert_close(grads[~same], birkhoff_module._support_vjp(S, G)[~same], atol=atol, rtol=0)
    return same


@pytest.mark.parametrize("n", [2, 4, 10, 30])
@pytest.mark.parametrize("batch", [1, 8, 40])
def test_agrees_with_the_torch_path(n, batch):
    Z = gumbel_utilities(batch, n, seed=n + batch)
    G = torch.randn(batch, n, n, dtype=torch.float64)
    (X, grad), (X_ref, grad_ref) = both_paths(birkhoff_projection, Z, G)
    # both stop at marginals within 1e-12 plus rounding, each the exact projection on its support
    torch.testing.assert_close(X, X_ref, atol=1e-12, rtol=0)
    same = assert_gradients_agree(X, grad, X_ref, grad_ref, G, 1e-12)
    assert same.float().mean() >= 0.9  # (supports differ only where an entry is 0 to within the tolerance)
    assert violation(X) <= 1e-12 and grad.abs().max() > 1e-2
    assert_is_the_projection(X, Z, 1e-12)


@pytest.mark.parametrize(
    "scale, tau",
    [(1e-8, 1.0), (1.0, 1e-2), (1.0, 1e-3), (1e3, 1e-3), (30.0, 1.0), (1e3, 1e-1)],
)
def test_extreme_inputs_agree_with_the_torch_path(scale, tau):
    """Nearly uniform Z, and spreads up to ~1e7 (tau small: nearly a vertex, or near-ties at large |Z|)."""
    Z = gumbel_utilities(12, 6, scale=scale, seed=5) / tau
    G = torch.randn(12, 6, 6, dtype=torch.float64)
    (X, grad), (X_ref, grad_ref) = both_paths(birkhoff_projection, Z, G)
    tol = 1e-12 + 16 * 6 * torch.finfo(torch.float64).eps * float(Z.abs().max())
    assert violation(X) <= 2 * tol
    torch.testing.assert_close(X, X_ref, atol=4 * tol, rtol=0)
    assert_is_the_projection(X, Z, 4 * tol)
    assert assert_gradients_agree(X, grad, X_ref, grad_ref, G, 1e-10).sum() >= 10


def test_tied_and_integer_inputs():
    """Heavily tied Z (constant, 0/1, small integers, permutation matrices): the projection, with the backward
    on its own support {X > 0} (where an entry of Y is 0 to rounding, either side is an element of the
    generalised Jacobian; both paths take X's support as it is rounded)."""
    generator = torch.Generator().manual_seed(7)
    n = 12
    permutations = torch.stack(
        [torch.eye(n, dtype=torch.float64)[torch.randperm(n, generator=generator)] for _ in range(4)]
    )
    for Z in (
        torch.zeros(3, n, n, dtype=torch.float64),
        torch.full((3, n, n), 5.0, dtype=torch.float64),
        3.0 * torch.randint(-3, 4, (16, n, n), generator=generator).double(),
        10.0 * torch.randint(0, 2, (16, n, n), generator=generator).double(),
        permutations,
        100.0 * permutations,
    ):
        G = torch.randn(Z.shape, dtype=torch.float64, generator=generator)
        (X, grad), (X_ref, _) = both_paths(birkhoff_projection, Z, G)
        torch.testing.assert_close(X, X_ref, atol=1e-11, rtol=0)
        assert_is_the_projection(X, Z, 1e-11)
        S = torch.gt(X, 0.0).double()
        torch.testing.assert_close(grad, birkhoff_module._support_vjp(S, G), atol=1e-12, rtol=0)
    torch.testing.assert_close(birkhoff_projection(torch.zeros(2, n, n)), torch.full((2, n, n), 1.0 / n))
    torch.testing.assert_close(birkhoff_projection(100.0 * permutations), permutations, atol=0, rtol=0)


def test_batch_shapes_dtypes_and_leading_dimensions():
    Z = gumbel_utilities(6, 5, seed=2).reshape(2, 3, 5, 5)
    X = birkhoff_projection(Z)
    with _compiled.disabled():
        X_ref = birkhoff_projection(Z)
    assert X.shape == (2, 3, 5, 5)
    torch.testing.assert_close(X, X_ref, atol=1e-12, rtol=0)
    X32 = birkhoff_projection(Z.float())
    assert X32.dtype == torch.float32
    torch.testing.assert_close(X32, X_ref.float(), atol=1e-6, rtol=0)
    assert birkhoff_projection(torch.zeros(0, 4, 4)).shape == (0, 4, 4)
    # through relax, with the tau of the family
    P = Permutation(5)
    U = gumbel_utilities(8, 5, seed=3)
    torch.testing.assert_close(sstcvx.relax(P, U, 0.5, "euclidean"), birkhoff_projection(U / 0.5), atol=1e-14, rtol=0)


def test_gradcheck_through_the_compiled_path():
    Z = gumbel_utilities(3, 4, seed=11).requires_grad_(True)
    assert torch.autograd.gradcheck(birkhoff_projection, (Z,), eps=1e-6, atol=1e-7)


def test_double_backward_takes_the_torch_route():
    Z = gumbel_utilities(4, 5, seed=13)
    G = torch.randn(4, 5, 5, dtype=torch.float64)
    H = torch.randn(4, 5, 5, dtype=torch.float64)
    (X, grad), (_, grad_ref) = both_paths(birkhoff_projection, Z, G)
    # the VJP is linear in G (the map is piecewise linear in Z): differentiating it in G gives the Jacobian
    # (symmetric) applied to H
    Gg = G.clone().requires_grad_(True)
    Zg = Z.clone().requires_grad_(True)
    (first,) = torch.autograd.grad((birkhoff_projection(Zg) * Gg).sum(), Zg, create_graph=True)
    torch.testing.assert_close(first, grad, atol=1e-12, rtol=0)
    (in_g,) = torch.autograd.grad((first * H).sum(), Gg)
    S = torch.gt(X, 0.0).double()
    torch.testing.assert_close(in_g, birkhoff_module._support_vjp(S, H), atol=1e-12, rtol=0)
    torch.testing.assert_close(grad, grad_ref, atol=1e-12, rtol=0)


def test_the_compiled_path_is_taken(monkeypatch):
    """With the kernels replaced by failing stand-ins, relax fails: dispatch does not silently stay on torch."""
    Z = gumbel_utilities(2, 4, seed=1)

    def refuse(*args):
        raise RuntimeError("kernel called")

    monkeypatch.setattr(_compiled_birkhoff, "newton_batch", refuse)
    with pytest.raises(RuntimeError, match="kernel called"):
        sstcvx.relax(Permutation(4), Z, 1.0, "euclidean")
    with _compiled.disabled():
        sstcvx.relax(Permutation(4), Z, 1.0, "euclidean")  # the torch path does not call it
    monkeypatch.undo()
    monkeypatch.setattr(_compiled_birkhoff, "support_vjp_batch", refuse)
    Zg = Z.clone().requires_grad_(True)
    X = sstcvx.relax(Permutation(4), Zg, 1.0, "euclidean")
    with pytest.raises(RuntimeError, match="kernel called"):
        X.sum().backward()


def test_elements_left_by_the_kernel_take_the_staged_solver(monkeypatch):
    """Elements out of the kernel's budget go to the staged torch solver, and a failed budget still warns."""
    Z = gumbel_utilities(10, 8, seed=17)
    reference = birkhoff_module._birkhoff_staged(Z, 1e-14, 400)[0]
    X, unconverged, violation_ = birkhoff_module._birkhoff_forward(Z, 1e-12, 200)
    assert unconverged == 0 and violation_ <= 1e-12
    torch.testing.assert_close(X, reference, atol=1e-12, rtol=0)
    calls = []
    staged = birkhoff_module._birkhoff_staged

    def counted(Z, tol, max_iter):
        calls.append(len(Z))
        return staged(Z, tol, max_iter)

    monkeypatch.setattr(birkhoff_module, "_birkhoff_staged", counted)
    monkeypatch.setattr(birkhoff_module, "_NEWTON_MAX_ITER", 2)
    X_left, unconverged, _ = birkhoff_module._birkhoff_forward(Z, 1e-12, 200)
    assert unconverged == 0 and calls and 0 < calls[0] <= 10
    torch.testing.assert_close(X_left, reference, atol=3e-12, rtol=0)
    with pytest.warns(RuntimeWarning, match="max_iter"):
        birkhoff_projection(1e4 * torch.randn(2, 6, 6, dtype=torch.float64), max_iter=1)


def test_a_failed_backward_factorisation_falls_back(monkeypatch):
    """An element whose factorisation the kernel reports failed takes sinkhorn_vjp (as _support_vjp does)."""
    Z = gumbel_utilities(3, 6, seed=19)
    G = torch.randn(3, 6, 6, dtype=torch.float64)
    S = torch.gt(birkhoff_projection(Z), 0.0).double()
    kernel = _compiled_birkhoff.support_vjp_batch

    def failing_first(S, G, ridge, out, failed):
        kernel(S, G, ridge, out, failed)
        out[0] = np.nan
        failed[0] = 1
        return int(failed.sum())

    monkeypatch.setattr(_compiled_birkhoff, "support_vjp_batch", failing_first)
    torch.testing.assert_close(
        birkhoff_module._compiled_vjp(S, G), birkhoff_module._support_vjp(S, G), atol=1e-12, rtol=0
    )


def test_exact_line_step_agrees_with_the_torch_search():
    """The kernel's exact step (breakpoints in (0, 1] only) against the torch one (all n^2, from -infinity)."""
    Y, du, dv = descent_directions(20, 5, seed=3)
    expected = birkhoff_module._exact_step(Y, du, dv).flatten()
    work = [np.empty(25) for _ in range(3)]
    got = [_compiled_birkhoff._exact_step(y.numpy(), d.numpy(), *work) for y, d in zip(Y, du + dv)]
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), expected, atol=1e-12, rtol=0)
    assert (expected > 0).all() and (expected < 1).any()


def test_large_spreads_are_solved_by_the_kernel_with_continuation(monkeypatch):
    """tau small (spreads 1e3 to 1e7): the kernel's continuation finishes every element (none is handed to the
    staged torch solver), each the projection, agreeing with the staged solver."""
    Z = torch.cat(
        [gumbel_utilities(8, 7, scale=1.0, seed=23) / 1e-3, gumbel_utilities(8, 7, scale=1e3, seed=29) / 1e-3]
    )
    reference = birkhoff_module._birkhoff_staged(Z, 1e-12, 400)[0]

    def refuse(*args):
        raise AssertionError("handed to the staged torch solver")

    monkeypatch.setattr(birkhoff_module, "_birkhoff_staged", refuse)
    X, unconverged, violation_ = birkhoff_module._birkhoff_forward(Z, 1e-12, 200)
    tol = 1e-12 + 16 * 7 * torch.finfo(torch.float64).eps * float(Z.abs().max())
    assert unconverged == 0 and violation_ <= tol
    torch.testing.assert_close(X, reference, atol=4 * tol, rtol=0)
    assert_is_the_projection(X, Z, 4 * tol)
