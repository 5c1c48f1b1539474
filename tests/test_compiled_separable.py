"""The compiled start of the joint sum iteration (sstcvx/_compiled_separable.py) against its torch reference.

The kernel runs the table part of :func:`sstcvx.separable._joint_sum` (the start in nu, the root of the
table's sum, the fine table's step) per row; the exact joint steps that follow are shared.  Witnesses: the
torch path (``with sstcvx._compiled.disabled():``) on the k-subset and simplex families for phis with every
kind of table (no barrier, a barrier at 0, at 1, at both ends, with and without a fine table), on random,
extreme and tied inputs, batch shapes and float32; gradcheck through the compiled path; and that the kernel
is really called.
"""

from __future__ import annotations

import math

import pytest
import torch

import polytopes
import sstcvx
from sstcvx import Regularizer, _compiled, separable


def xlogx(x):
    return torch.where(x > 0, x * torch.log(x.clamp_min(1e-300)), torch.zeros_like(x))


PHIS = {
    # finite slope at both ends of [0, 1], phi'' infinite at 0: the sine-map table, double roots
    "tsallis": Regularizer.separable(lambda x: (x.clamp_min(0) ** 1.5 - x) / 0.75, domain=(0, math.inf), name="c_ts"),
    # a barrier at 0: the coarse table is not exact, the fine one is
    "mix": Regularizer.separable(lambda x: 0.5 * xlogx(x) + 0.25 * x * x, domain=(0, math.inf), name="c_mix"),
    # barriers at both ends
    "binary": Regularizer.separable(lambda x: xlogx(x) + xlogx(1 - x), domain=(0, 1), name="c_binary"),
    # a barrier at 1 only
    "upper": Regularizer.separable(lambda x: xlogx(1 - x) + x * x, domain=(-math.inf, 1), name="c_upper"),
    # no barrier, phi' linear: clamps at both ends
    "square": Regularizer.separable(lambda x: 0.5 * x * x, name="c_square"),
}
FAMILIES = [polytopes.KSubset(10, 3), polytopes.KSubset(20, 5), polytopes.Simplex(8)]


def inputs(n, seed):
    """Rows of every kind: random at three scales, huge (|U| up to 1e3, used with tau = 1e-3), ties, a constant row."""
    gen = torch.Generator().manual_seed(seed)
    rows = [torch.randn(12, n, generator=gen, dtype=torch.float64) * scale for scale in (0.01, 1.0, 30.0)]
    huge = torch.randn(6, n, generator=gen, dtype=torch.float64) * 1e3
    ties = torch.randn(6, n, generator=gen, dtype=torch.float64)
    ties[:, 1:4] = ties[:, :1]
    ties[3:, :] = ties[3:, :1].round()
    rows += [huge.clamp(-1e3, 1e3), ties, torch.zeros(1, n, dtype=torch.float64)]
    return torch.cat(rows)


def both_paths(P, U, tau, reg, G):
    """X and the gradient of <G, X> in U, compiled and torch."""
    results = []
    for compiled_on in (True, False):
        u = U.detach().clone().requires_grad_(True)
        if compiled_on:
            X = sstcvx.relax(P, u, tau, reg)
        else:
            with _compiled.disabled():
                X = sstcvx.relax(P, u, tau, reg)
        (X * G).sum().backward()
        results.append((X.detach(), u.grad))
    return results


def assert_agree(compiled, reference, tol=1e-12):
    scale = max(1.0, float(reference.abs().max())) if reference.numel() else 1.0
    assert compiled.shape == reference.shape and compiled.dtype == reference.dtype
    torch.testing.assert_close(compiled, reference, atol=tol * scale, rtol=0)


@pytest.mark.parametrize("name", list(PHIS))
def test_compiled_matches_torch(name):
    reg = PHIS[name]
    for i, P in enumerate(FAMILIES):
        n = P.event_shape[0]
        U = inputs(n, seed=i)
        G = torch.randn(U.shape, generator=torch.Generator().manual_seed(100 + i), dtype=torch.float64)
        for tau in (1.0, 1e-3):
            (X, grad), (X_ref, grad_ref) = both_paths(P, U, tau, reg, G)
            assert_agree(X, X_ref)
            assert_agree(grad, grad_ref)
            torch.testing.assert_close(X.sum(-1), X_ref.sum(-1), atol=1e-12, rtol=0)


@pytest.mark.parametrize("name", ["tsallis", "mix", "binary", "upper"])
def test_the_kernel_start_matches_the_torch_start(name):
    """The start itself (before the exact steps): x, nu, the active set and the bracket agree to the table's
    precision (the kernel's stopping rules are per row, the torch code's over the batch)."""
    reg = PHIS[name]
    for n, total in ((10, 3.0), (8, 1.0)):
        info = separable._interval_info(reg, 0.0, 1.0, total, n)
        assert info.table is not None
        eps = torch.finfo(torch.float64).eps
        use_log = total > 0 and info.barrier_a
        tol_sum = 16.0 * n * eps * max(1.0, total)
        z = inputs(n, seed=7) * 3.0
        nu, x, at_a, at_b, lo, hi = separable._compiled_start(
            info, z, total, use_log, max(tol_sum, n * info.table_error)
        )
        nu_ref, x_ref, at_a_ref, at_b_ref, lo_ref, hi_ref = separable._table_start(
            info, z, total, 0.0, 1.0, use_log, tol_sum
        )
        torch.testing.assert_close(lo, lo_ref, atol=0, rtol=0)
        torch.testing.assert_close(hi, hi_ref, atol=0, rtol=0)
        torch.testing.assert_close(x, x_ref, atol=1e-6, rtol=0)
        # nu where it is well determined: near a vertex (every coordinate nearly at an end) a wide range of nu
        # gives the same x, and the batch's stopping rule moves the torch code's within that range
        slope = info.surrogate(z - nu_ref)[1].sum(-1, keepdim=True)
        well = slope >= 1e-2
        assert int(well.sum()) >= z.shape[0] // 2
        torch.testing.assert_close(nu[well], nu_ref[well], atol=1e-6, rtol=0)
        # the active sets agree except for coordinates within the table's precision of an end's slope
        v = z - nu_ref
        near = ((v - info.ga).abs() < 1e-5) | ((v - info.gb).abs() < 1e-5)
        assert bool(((at_a == at_a_ref) | near).all()) and bool(((at_b == at_b_ref) | near).all())
        # where the start is within its tolerance of the total for the torch code, so it is for the kernel
        good = (x_ref.sum(-1) - total).abs() <= 1e-6
        assert bool(((x.sum(-1) - total).abs()[good] <= 1e-6).all())


def test_batch_shapes_and_float32():
    P = polytopes.KSubset(10, 3)
    reg = PHIS["mix"]
    gen = torch.Generator().manual_seed(3)
    for shape in ((0, 10), (1, 10), (7, 10), (2, 3, 10)):
        U = torch.randn(shape, generator=gen, dtype=torch.float64) * 2.0
        X = sstcvx.relax(P, U, 0.5, reg)
        with _compiled.disabled():
            X_ref = sstcvx.relax(P, U, 0.5, reg)
        assert X.shape == U.shape
        assert_agree(X, X_ref)
    U32 = torch.randn(7, 10, generator=gen) * 2.0
    X32 = sstcvx.relax(P, U32, 0.5, reg)
    with _compiled.disabled():
        X32_ref = sstcvx.relax(P, U32, 0.5, reg)
    assert X32.dtype == torch.float32
    torch.testing.assert_close(X32, X32_ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(X32.sum(-1), torch.full((7,), 3.0), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["mix", "tsallis", "upper"])
def test_gradcheck_through_the_compiled_path(name):
    reg = PHIS[name]
    for P in (polytopes.KSubset(6, 2), polytopes.Simplex(5)):
        n = P.event_shape[0]
        U = torch.randn(3, n, generator=torch.Generator().manual_seed(5), dtype=torch.float64).requires_grad_(True)
        assert torch.autograd.gradcheck(lambda u, P=P: sstcvx.relax(P, u, 0.7, reg), (U,), eps=1e-6, atol=1e-7)


def test_the_kernel_is_taken(monkeypatch):
    """CPU tensors take the kernel (the test fails if dispatch silently stays on torch), disabled() does not."""
    from sstcvx import _compiled_separable

    assert "sstcvx._compiled_separable" in _compiled.KERNEL_MODULES  # its import is checked with the others

    def broken(*args):
        raise RuntimeError("the compiled start was called")

    monkeypatch.setattr(_compiled_separable, "table_start", broken)
    P = polytopes.KSubset(10, 3)
    U = torch.randn(4, 10, dtype=torch.float64)
    for reg in PHIS.values():
        with pytest.raises(RuntimeError, match="compiled start"):
            sstcvx.relax(P, U, 1.0, reg)
        with _compiled.disabled():
            sstcvx.relax(P, U, 1.0, reg)
    # the simplex goes through the same code
    with pytest.raises(RuntimeError, match="compiled start"):
        sstcvx.relax(polytopes.Simplex(8), torch.randn(2, 8, dtype=torch.float64), 1.0, PHIS["mix"])


def test_the_hypercube_does_not_use_it(monkeypatch):
    """The box solver has no sum: unaffected by the kernel."""
    from sstcvx import _compiled_separable

    def broken(*args):
        raise RuntimeError("the compiled start was called")

    monkeypatch.setattr(_compiled_separable, "table_start", broken)
    U = torch.randn(4, 10, dtype=torch.float64)
    X = sstcvx.relax(polytopes.Hypercube(10), U, 1.0, PHIS["mix"])
    with _compiled.disabled():
        X_ref = sstcvx.relax(polytopes.Hypercube(10), U, 1.0, PHIS["mix"])
    torch.testing.assert_close(X, X_ref, atol=0, rtol=0)


@pytest.mark.parametrize("name", ["mix", "tsallis", "binary"])
def test_the_compiled_start_needs_as_few_evaluations(name):
    """The start is as good as the torch code's: the joint steps after it evaluate (phi', phi'') as often (one
    evaluation, the check, where the table or its fine one is exact; two where a row needs a step)."""
    counted = []
    base = PHIS[name]

    class Counting(type(base)):
        def derivatives(self, x):
            counted.append(x.shape)
            return super().derivatives(x)

    reg = Counting(base.phi, domain=base.domain, name="counting " + name)
    Z = torch.randn(256, 10, generator=torch.Generator().manual_seed(14), dtype=torch.float64) * 2.0
    P = polytopes.KSubset(10, 3)
    sstcvx.relax(P, Z, 1.0, reg)  # the interval's tables
    counts = []
    for compiled_on in (True, False):
        counted.clear()
        if compiled_on:
            sstcvx.relax(P, Z, 1.0, reg)
        else:
            with _compiled.disabled():
                sstcvx.relax(P, Z, 1.0, reg)
        counts.append(len(counted))
    assert counts[0] <= counts[1] <= 3, counts
