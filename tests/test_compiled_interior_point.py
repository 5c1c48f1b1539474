"""The interior-point iteration's compiled CPU kernels (sstcvx.generic._compiled_interior_point) against the
torch iteration they port (``with polytopes._compiled.disabled():``): solutions, statuses, iteration counts,
vector-Jacobian products and gradcheck on the polytopes the interior-point tests use, and that the kernels
really run where they should (and only there)."""

import math

import cvxpy as cp
import pytest
import torch

import sstcvx
from polytopes import _compiled
from polytopes.spanning_tree import spanning_trees_by_flows
from sstcvx import Regularizer
from sstcvx.generic import _compiled_interior_point as kernels
from sstcvx.generic import interior_point
from sstcvx.generic.dual_newton import STATUS_CONVERGED, STATUS_MAX_ITER, STATUS_NOT_FINITE
from sstcvx.generic.interior_point import InteriorPointRelaxation
from sstcvx.regularizers import get_regularizer


def path(n):
    x = cp.Variable(n)
    return sstcvx.Polytope.from_cvxpy(x, [x >= 0, x <= 1, x[:-1] + x[1:] <= 1], name=f"path({n})", recognize=False)


def knapsack():
    x = cp.Variable(6)
    cons = [x >= 0, x <= 1, cp.sum(x) <= 2, x[0] + x[1] <= 1]
    return sstcvx.Polytope.from_cvxpy(x, cons, name="knapsack(6)", recognize=False)


def chain(n):
    y = cp.Variable(n)
    cons = [y >= 0, y <= 1, cp.sum(y) >= 1] + [y[i + 1] <= y[i] for i in range(n - 1)]
    return sstcvx.Polytope.from_cvxpy(y, cons, name=f"chain({n})", recognize=False)


def half_lines():
    """x >= 0 only below (no upper bound: absent bound pairs) with a packing row."""
    x = cp.Variable(5)
    return sstcvx.Polytope.from_cvxpy(
        x, [x >= 0, cp.sum(x) <= 2, x[0] + 2 * x[1] <= 1], name="half-lines", recognize=False
    )


def with_a_fixed_column():
    """A knapsack whose last coordinate is fixed by its rows (substituted out of the solver's columns)."""
    x = cp.Variable(6)
    cons = [x >= 0, x <= 1, cp.sum(x) <= 2.5, x[0] + x[1] <= 1, x[5] >= 0.5, x[5] <= 0.5]
    return sstcvx.Polytope.from_cvxpy(x, cons, name="fixed column", recognize=False)


def birkhoff(n):
    M = cp.Variable((n, n))
    cons = [M >= 0, cp.sum(M, axis=0) == 1, cp.sum(M, axis=1) == 1]
    return sstcvx.Polytope.from_cvxpy(M, cons, name=f"birkhoff({n})", recognize=False)


def vertex_list():
    V = torch.tensor([[1.0, 0, 0, 1], [0, 1, 1, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0.5, 0.5, 0.5, 0.5]])
    return sstcvx.Polytope.from_vertices(V)


def xlogx(x):
    return torch.where(x > 0, x * torch.log(x.clamp_min(1e-300)), torch.zeros_like(x))


SEPARABLE_BINARY = Regularizer.separable(lambda x: xlogx(x) + xlogx(1 - x), domain=(0, 1), name="kernel test binary")
SEPARABLE_TSALLIS = Regularizer.separable(
    lambda x: (x.clamp_min(0) ** 1.5 - x) / 0.75, domain=(0, math.inf), name="kernel test tsallis"
)

CASES = [
    (lambda: path(6), "binary_entropy"),
    (lambda: path(6), "entropy"),
    (knapsack, "binary_entropy"),
    (lambda: chain(6), "entropy"),
    (half_lines, "entropy"),
    (with_a_fixed_column, "binary_entropy"),
    (lambda: spanning_trees_by_flows(4), "binary_entropy"),
    (lambda: spanning_trees_by_flows(5), "entropy"),
    (vertex_list, "entropy"),
    (knapsack, SEPARABLE_BINARY),
    (lambda: chain(6), SEPARABLE_TSALLIS),
    (lambda: birkhoff(3), SEPARABLE_TSALLIS),
    (lambda: spanning_trees_by_flows(4), SEPARABLE_BINARY),
]
_SOLVERS: dict = {}


def solver(make, reg) -> InteriorPointRelaxation:
    key = (make, reg)
    if key not in _SOLVERS:
        _SOLVERS[key] = InteriorPointRelaxation(make(), get_regularizer(reg))
    return _SOLVERS[key]


def both(relaxation, Z, max_iter=None):
    a = relaxation.solve(Z, max_iter)
    with _compiled.disabled():
        b = relaxation.solve(Z, max_iter)
    return a, b


def takes_the_kernel(relaxation) -> bool:
    return bool(interior_point._kernel_plan(relaxation.problem_on("cpu")))


def utilities(B, n, scale, seed):
    return scale * torch.randn(B, n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("make,reg", CASES)
def test_kernel_agrees_with_the_torch_iteration(make, reg):
    relaxation = solver(make, reg)
    assert takes_the_kernel(relaxation)
    n = relaxation.problem.n
    primal = relaxation.problem_on("cpu").primal is not None
    for tau, scale, seed in ((1e-3, 1.0, 1), (1.0, 3.0, 2), (1e3, 1.0, 3), (1.0, 1e3, 4), (0.1, 30.0, 5)):
        a, b = both(relaxation, utilities(24, n, scale, seed) / tau)
        assert torch.equal(a.status, b.status), (tau, scale, a.status, b.status)
        ok = a.status == STATUS_CONVERGED
        assert int(ok.sum()) >= 20, (tau, scale, a.status)
        torch.testing.assert_close(a.x[ok], b.x[ok], atol=1e-9, rtol=0)
        if not primal:
            # the same arithmetic up to the order of sums: the same iterations
            assert torch.equal(a.iterations, b.iterations), (tau, scale)
        else:
            # the primal reduction's w block is eliminated exactly in the kernel, without the cancellation of the
            # torch factorization of H: directions differ in the last digits, iteration counts by a few (the kernel's
            # fewer where H lost digits)
            assert int((a.iterations - b.iterations).max()) <= 3, (tau, scale, a.iterations - b.iterations)
        torch.testing.assert_close(a.residual[ok], b.residual[ok], atol=1e-10, rtol=0)


@pytest.mark.parametrize("make,reg", [CASES[0], CASES[3], CASES[5], CASES[6], CASES[9], CASES[12]])
def test_vector_jacobian_products_agree(make, reg):
    relaxation = solver(make, reg)
    n = relaxation.problem.n
    Z = utilities(16, n, 2.0, 7).requires_grad_(True)
    G = utilities(16, n, 1.0, 8)
    X = relaxation(Z)
    (g,) = torch.autograd.grad((X * G).sum(), Z)
    with _compiled.disabled():
        Xt = relaxation(Z)
        (gt,) = torch.autograd.grad((Xt * G).sum(), Z)
    torch.testing.assert_close(X, Xt, atol=1e-9, rtol=0)
    torch.testing.assert_close(g, gt, atol=1e-8, rtol=0)


@pytest.mark.parametrize("make,reg", [CASES[2], CASES[7], CASES[10]])
def test_gradcheck_through_the_kernel(make, reg, monkeypatch):
    relaxation = solver(make, reg)
    calls = []
    original = kernels.run
    monkeypatch.setattr(kernels, "run", lambda *a: calls.append(1) or original(*a))
    Z = utilities(2, relaxation.problem.n, 1.5, 9).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z: relaxation(z), (Z,))
    assert calls


@pytest.mark.parametrize("make,reg", [CASES[1], CASES[6], CASES[9]])
def test_unconverged_elements_stop_alike(make, reg):
    """At a cap of 3 iterations, every element stops at the last one with the torch iteration's state."""
    relaxation = solver(make, reg)
    a, b = both(relaxation, utilities(8, relaxation.problem.n, 3.0, 10), max_iter=3)
    assert bool((a.status == STATUS_MAX_ITER).all()) and bool((b.status == STATUS_MAX_ITER).all())
    assert bool((a.iterations == 3).all()) and torch.equal(a.iterations, b.iterations)
    tol = 1e-9 if relaxation.problem_on("cpu").primal is None else 1e-6
    torch.testing.assert_close(a.x, b.x, atol=tol, rtol=0)
    torch.testing.assert_close(a.residual, b.residual, atol=tol, rtol=1e-6)


def test_a_state_that_is_not_finite_is_reported():
    """A user's phi whose derivatives turn NaN: every element stops as not finite on both paths."""

    class Broken(type(SEPARABLE_BINARY)):
        broken = False  # (set once the regularizer's own checks have passed)

        def derivatives(self, x):
            g, h = super().derivatives(x)
            return (g * math.nan if self.broken else g), h

    reg = Broken(lambda x: xlogx(x) + xlogx(1 - x), domain=(0, 1), name="kernel test broken")
    relaxation = InteriorPointRelaxation(knapsack(), reg)
    reg.broken = True
    a, b = both(relaxation, utilities(4, 6, 1.0, 11))
    assert bool((a.status == STATUS_NOT_FINITE).all()) and bool((b.status == STATUS_NOT_FINITE).all())
    assert torch.equal(a.iterations, b.iterations)


def test_batch_shapes_and_dtypes():
    P = knapsack()
    for shape in ((1, 6), (3, 2, 6)):
        for dtype in (torch.float32, torch.float64):
            U = utilities(math.prod(shape[:-1]), 6, 2.0, 12).reshape(shape).to(dtype)
            X = sstcvx.relax(P, U, 0.5, "binary_entropy", solver="fast")
            with _compiled.disabled():
                Xt = sstcvx.relax(P, U, 0.5, "binary_entropy", solver="fast")
            assert X.shape == U.shape and X.dtype == dtype
            torch.testing.assert_close(X, Xt, atol=1e-6 if dtype == torch.float32 else 1e-9, rtol=0)
    assert sstcvx.relax(P, torch.zeros(0, 6), 0.5, "binary_entropy", solver="fast").shape == (0, 6)


def test_the_kernels_run_where_they_serve(monkeypatch):
    """The compiled path is taken on CPU tensors (built-in and user phi), not under disabled(), and never for
    the Euclidean regularizer (its active-set start and polish stay in torch)."""

    def refuse(*args):
        raise RuntimeError("kernel called")

    monkeypatch.setattr(kernels, "iterate", refuse)
    P = knapsack()
    U = utilities(4, 6, 1.0, 13)
    for reg in ("binary_entropy", "entropy", SEPARABLE_BINARY):
        with pytest.raises(RuntimeError, match="kernel called"):
            sstcvx.relax(P, U, 1.0, reg, solver="fast")
        with _compiled.disabled():
            sstcvx.relax(P, U, 1.0, reg, solver="fast")
    sstcvx.relax(P, U, 1.0, "euclidean", solver="fast")
    assert not takes_the_kernel(solver(knapsack, "euclidean"))


def test_large_dense_normal_matrices_stay_in_torch():
    relaxation = InteriorPointRelaxation(path(kernels.DENSE_ROWS + 3), get_regularizer("binary_entropy"))
    ip = relaxation.problem_on("cpu")
    assert ip.primal is None and ip.m > kernels.DENSE_ROWS
    assert not takes_the_kernel(relaxation)
    # a batch whose dense factorizations would cost more than the torch code's
    plan = interior_point._kernel_plan(solver(CASES[0][0], CASES[0][1]).problem_on("cpu"))
    assert plan.serves(8) and not plan.serves(kernels.DENSE_WORK // plan.m**3 + 1)


def test_changed_tolerances_reach_the_kernel(monkeypatch):
    """The kernels read the module's constants at each call (tests tighten them)."""
    relaxation = solver(CASES[2][0], CASES[2][1])
    Z = utilities(8, 6, 3.0, 14)
    loose = relaxation.solve(Z)
    monkeypatch.setattr(interior_point, "MU_TOLERANCE", 1e-3)
    monkeypatch.setattr(interior_point, "TOLERANCE", 1e-3)
    early = relaxation.solve(Z)
    assert int(early.iterations.sum()) < int(loose.iterations.sum())
    with _compiled.disabled():
        reference = relaxation.solve(Z)
    assert torch.equal(early.iterations, reference.iterations)
