"""The compiled CPU Sinkhorn (polytopes/_compiled_sinkhorn.py) against the torch path it replaces."""

import pytest
import torch
from _permutation_inputs import both_paths, forward_backward, gumbel_utilities, violation

import sstcvx
from polytopes import Permutation, _compiled, _compiled_sinkhorn
from polytopes import sinkhorn as sinkhorn_module
from polytopes.sinkhorn import sinkhorn, sinkhorn_vjp


@pytest.mark.parametrize("n", [2, 4, 10, 50])
@pytest.mark.parametrize("batch", [1, 8, 40])
def test_agrees_with_the_torch_path(n, batch):
    Z = gumbel_utilities(batch, n, seed=n + batch)
    G = torch.randn(batch, n, n, dtype=torch.float64)
    (X, grad), (X_ref, grad_ref) = both_paths(sinkhorn, Z, G)
    # both stop at column sums within 1e-12 (each element on its own here): X agrees to that order
    torch.testing.assert_close(X, X_ref, atol=2e-12, rtol=0)
    torch.testing.assert_close(grad, grad_ref, atol=2e-12, rtol=0)
    assert violation(X) <= 1e-12 and grad.abs().max() > 1e-2


def test_one_element_is_the_torch_computation_to_rounding():
    # at batch 1 the two paths take the same sweeps and Newton steps (one ridge either way)
    Z = gumbel_utilities(1, 10, seed=3)
    G = torch.randn(1, 10, 10, dtype=torch.float64)
    (X, grad), (X_ref, grad_ref) = both_paths(sinkhorn, Z, G)
    torch.testing.assert_close(X, X_ref, atol=1e-14, rtol=0)
    torch.testing.assert_close(grad, grad_ref, atol=1e-14, rtol=0)


@pytest.mark.parametrize(
    "case",
    ["tiny", "ties", "constant", "near_permutation", "wide", "mixed", "small_tau"],
)
def test_extreme_and_degenerate_inputs(case):
    n = 6
    generator = torch.Generator().manual_seed(1)
    noise = torch.randn(4, n, n, dtype=torch.float64, generator=generator)
    if case == "tiny":  # X is nearly uniform
        Z = 1e-9 * noise
    elif case == "ties":  # every row the same: X is uniform
        Z = noise[:, :1, :].expand(4, n, n).contiguous()
    elif case == "constant":
        Z = torch.full((4, n, n), 3.5, dtype=torch.float64)
    elif case == "near_permutation":  # spread 63 (the kernel's range ends at 64): X within 1e-13 of a permutation
        Z = 31.5 * torch.eye(n, dtype=torch.float64).expand(4, n, n) + 0.01 * noise
        Z = Z - 31.5 * (1 - torch.eye(n, dtype=torch.float64))
    elif case == "wide":  # spreads far above 64: the torch path's epsilon-scaling for every element
        Z = 1e3 * noise
    elif case == "mixed":  # one wide element in a batch of narrow ones
        Z = noise.clone()
        Z[2] *= 500.0
    else:  # tau = 0.01 on Gumbel utilities
        Z = gumbel_utilities(4, n, seed=5) / 0.01
    G = torch.randn(4, n, n, dtype=torch.float64, generator=generator)
    (X, grad), (X_ref, grad_ref) = both_paths(sinkhorn, Z, G)
    assert violation(X) <= 1e-12
    torch.testing.assert_close(X, X_ref, atol=2e-12, rtol=0)
    torch.testing.assert_close(grad, grad_ref, atol=1e-11, rtol=0)
    if case in ("ties", "constant"):
        torch.testing.assert_close(X, torch.full_like(X, 1.0 / n), atol=1e-15, rtol=0)


def test_elements_left_by_the_kernel_go_to_the_torch_path(monkeypatch):
    """Elements the kernel leaves (non-finite entries here, which the public functions reject; a failed
    factorisation is treated alike) take the torch code as one batch, and its results land in their places
    with its counts added to the report."""
    Z = gumbel_utilities(6, 5, seed=2)
    Z[1, 0, 0] = float("inf")
    Z[4, 2, 3] = float("nan")
    finite = [0, 2, 3, 5]
    with _compiled.disabled():
        reference = sinkhorn(Z[finite])
    calls = []

    def stand_in(Z, tol, max_iter):  # the torch code itself loops on non-finite input: a stand-in
        calls.append(len(Z))
        return torch.full_like(Z, 7.0), 2, 0.5

    monkeypatch.setattr(sinkhorn_module, "_torch_solve", stand_in)
    X, unconverged, worst, _ = sinkhorn_module._compiled_solve(Z, 1e-12, 500)
    assert calls == [2] and unconverged == 2 and worst == 0.5
    assert (X[[1, 4]] == 7.0).all()
    torch.testing.assert_close(X[finite], reference, atol=2e-12, rtol=0)


@pytest.mark.parametrize("shape", [(0, 5, 5), (1, 5, 5), (2, 3, 5, 5), (5, 5)])
def test_batch_shapes(shape):
    Z = torch.randn(shape, dtype=torch.float64)
    X = sinkhorn(Z)
    with _compiled.disabled():
        X_ref = sinkhorn(Z)
    assert X.shape == Z.shape
    torch.testing.assert_close(X, X_ref, atol=2e-12, rtol=0)


def test_float32_and_non_contiguous_inputs():
    Z = torch.randn(3, 7, 7, dtype=torch.float64)
    X = sinkhorn(Z.float())
    assert X.dtype == torch.float32
    with _compiled.disabled():
        torch.testing.assert_close(X, sinkhorn(Z.float()), atol=1e-6, rtol=0)
        X_ref = sinkhorn(Z.mT)
    torch.testing.assert_close(sinkhorn(Z.mT), X_ref, atol=2e-12, rtol=0)  # a transposed view
    torch.testing.assert_close(sinkhorn(Z.mT), sinkhorn(Z).mT, atol=2e-12, rtol=0)


def test_gradcheck_and_gradgradcheck_through_the_compiled_path():
    Z = gumbel_utilities(2, 4, seed=7).requires_grad_(True)
    assert torch.autograd.gradcheck(sinkhorn, (Z,))
    # double backward: the adjoint is recorded by autograd (the torch route), around the compiled forward
    assert torch.autograd.gradgradcheck(lambda z: sinkhorn(z / 0.7), (Z,))
    G = torch.randn(2, 4, 4, dtype=torch.float64)
    _, grad = forward_backward(sinkhorn, Z.detach(), G, create_graph=True)
    with _compiled.disabled():
        _, grad_ref = forward_backward(sinkhorn, Z.detach(), G, create_graph=True)
    torch.testing.assert_close(grad, grad_ref, atol=2e-12, rtol=0)


def test_general_vjp_agrees_with_the_torch_code():
    """sinkhorn_vjp with row sums other than 1 and on a disconnected 0/1 support (the Birkhoff projection's use)."""
    generator = torch.Generator().manual_seed(4)
    X = torch.rand(5, 6, 6, dtype=torch.float64, generator=generator)
    S = torch.block_diag(torch.ones(2, 2), torch.ones(3, 3), torch.ones(1, 1)).double().expand(5, 6, 6)
    G = torch.randn(5, 6, 6, dtype=torch.float64, generator=generator)
    for M in (X, S):
        for unit_rows in (False, True):
            ours = sinkhorn_vjp(M, G, unit_rows)
            with _compiled.disabled():
                reference = sinkhorn_vjp(M, G, unit_rows)
            torch.testing.assert_close(ours, reference, atol=1e-12, rtol=1e-12)
            assert ours.abs().max() > 1e-2


def test_the_compiled_path_is_taken(monkeypatch):
    """Dispatch: CPU float64 batches call the kernels, the torch path does not, large n stays on torch."""
    calls = []

    def counting(name):
        kernel = getattr(_compiled_sinkhorn, name)
        monkeypatch.setattr(_compiled_sinkhorn, name, lambda *args: calls.append(name) or kernel(*args))

    counting("sinkhorn_forward")
    counting("sinkhorn_adjoint")
    P = Permutation(5)
    U = torch.randn(3, 5, 5, dtype=torch.float64, requires_grad=True)
    sstcvx.relax(P, U, 1.0, "entropy", solver="specialized").sum().backward()
    assert calls == ["sinkhorn_forward", "sinkhorn_adjoint"]
    calls.clear()
    with _compiled.disabled():
        sstcvx.relax(P, U, 1.0, "entropy", solver="specialized").sum().backward()
    assert calls == []
    monkeypatch.setattr(sinkhorn_module, "_COMPILED_MAX_N", 4)
    sinkhorn(U.detach())
    assert calls == []

    def broken(*args):
        raise RuntimeError("kernel called")

    monkeypatch.setattr(_compiled_sinkhorn, "sinkhorn_forward", broken)
    monkeypatch.setattr(sinkhorn_module, "_COMPILED_MAX_N", 128)
    with pytest.raises(RuntimeError, match="kernel called"):
        sstcvx.relax(P, U, 1.0, "entropy", solver="specialized")


def test_budget_warning_counts_the_same_elements():
    Z = gumbel_utilities(8, 6, scale=3.0, seed=9)
    with pytest.warns(RuntimeWarning, match="8 of 8 batch elements did not reach"):
        X = sinkhorn(Z, max_iter=1)
    with _compiled.disabled(), pytest.warns(RuntimeWarning, match="8 of 8 batch elements did not reach"):
        X_ref = sinkhorn(Z, max_iter=1)
    torch.testing.assert_close(X, X_ref, atol=1e-3, rtol=0)  # one Newton step each (ridges differ slightly)
    assert torch.isfinite(X).all()


def test_wide_spreads_are_solved_in_the_kernel(monkeypatch):
    """Spreads above 64 (small tau) take the kernel's epsilon-scaling, not the torch code; X is a valid fixed point."""

    def not_called(*args):
        raise AssertionError("the torch path was taken")

    Z = torch.cat([gumbel_utilities(3, 7, seed=11) / 0.01, 1e3 * torch.randn(3, 7, 7, dtype=torch.float64)])
    G = torch.randn(6, 7, 7, dtype=torch.float64)
    with _compiled.disabled():
        X_ref, grad_ref = forward_backward(sinkhorn, Z, G)
    monkeypatch.setattr(sinkhorn_module, "_torch_solve", not_called)
    X, grad = forward_backward(sinkhorn, Z, G)
    assert violation(X) <= 1e-12
    torch.testing.assert_close(X, X_ref, atol=2e-12, rtol=0)
    torch.testing.assert_close(grad, grad_ref, atol=1e-11, rtol=0)
    with pytest.warns(RuntimeWarning, match="6 of 6 batch elements did not reach"):
        sinkhorn(Z, max_iter=2)
