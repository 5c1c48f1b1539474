"""The tabulated phi', phi'' of a user's separable regularizer (sstcvx.generic.derivative_table) and the compiled
interior point's use of it: the table against phi's own derivatives, which tables are refused, and that the
solutions, statuses and gradients are those of the exact iteration (the table moves the path, not the answer),
including where the table is stale, the exact iteration has to restart, or no table exists."""

import math

import cvxpy as cp
import numpy as np
import pytest
import torch
from test_separable import tsallis_phi as tsallis
from test_separable import xlogx

import sstcvx
from polytopes import _compiled
from sstcvx import Regularizer
from sstcvx.generic import _compiled_interior_point as kernels
from sstcvx.generic import derivative_table, interior_point
from sstcvx.generic.dual_newton import STATUS_CONVERGED, STATUS_MAX_ITER
from sstcvx.generic.interior_point import InteriorPointRelaxation


def mix(x):
    return 0.5 * xlogx(x) + 0.25 * x * x


S = Regularizer.separable
# one of each map: no barrier (sine), a barrier at the lower end, at the upper end, at both
TSALLIS = S(tsallis, domain=(0, math.inf), name="table tsallis")
MIX = S(mix, domain=(0, math.inf), name="table mix")
UPPER = S(lambda x: xlogx(-x) + x * x, domain=(-math.inf, 0), name="table upper barrier")
BINARY = S(lambda x: xlogx(x) + xlogx(1 - x), domain=(0, 1), name="table binary")
QUARTIC = S(lambda x: x**4 + 0.01 * x * x, name="table quartic")
# the sine map with a power (x^0.2 at 0)
TSALLIS_12 = S(lambda x: (x.clamp_min(0) ** 1.2 - x) / 0.24, domain=(0, math.inf), name="table tsallis 1.2")
MAPS = {
    TSALLIS: derivative_table.MAP_SINE,
    MIX: derivative_table.MAP_LOWER,
    UPPER: derivative_table.MAP_UPPER,
    BINARY: derivative_table.MAP_SIGMOID,
    QUARTIC: derivative_table.MAP_SINE,
}


def knapsack():
    x = cp.Variable(6)
    cons = [x >= 0, x <= 1, cp.sum(x) <= 2, x[0] + x[1] <= 1]
    return sstcvx.Polytope.from_cvxpy(x, cons, name="table knapsack", recognize=False)


def half_lines():
    """x >= 0 only (the rows bound x above): the table's interval comes from the implied bounds."""
    x = cp.Variable(5)
    return sstcvx.Polytope.from_cvxpy(x, [x >= 0, cp.sum(x) <= 2, x[0] + 2 * x[1] <= 1], name="table half-lines")


def utilities(B, n, scale, seed):
    return scale * torch.randn(B, n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def solve(relaxation, Z, table=True, max_iter=None):
    old = interior_point.DERIVATIVE_TABLE
    interior_point.DERIVATIVE_TABLE = table
    try:
        return relaxation.solve(Z, max_iter)
    finally:
        interior_point.DERIVATIVE_TABLE = old


@pytest.mark.parametrize("reg", list(MAPS), ids=lambda r: r.name)
def test_the_table_reproduces_phi_derivatives(reg):
    a, b = {UPPER: (-1.0, 0.0), QUARTIC: (-1.0, 1.0)}.get(reg, (0.0, 1.0))
    table = derivative_table.build(reg, a, b)
    assert table is not None and table.map == MAPS[reg]
    assert table.error <= derivative_table.TOLERANCE
    gen = torch.Generator().manual_seed(0)
    # points all over the interval, and crowding towards both ends
    u = torch.rand(20000, dtype=torch.float64, generator=gen)
    x = torch.cat([a + (b - a) * u, a + (b - a) * u**6, b - (b - a) * u**6]).clamp(a + 1e-12, b - 1e-12)
    g, h = reg.derivatives(x)
    G, H = table.derivatives(x.numpy())
    assert float(((torch.from_numpy(G) - g).abs() / g.abs().clamp_min(1.0)).max()) <= 1e-9
    assert (H > 0).all()
    # phi'' to 1e-5 away from the ends (next to an end that is not a barrier, where phi'' X' -> 0 in the
    # coordinate s, its relative accuracy drops: there the bound's own barrier term dominates the iteration's Phi)
    inner = (x > a + 1e-4 * (b - a)) & (x < b - 1e-4 * (b - a))
    assert float((torch.from_numpy(H) / h - 1)[inner].abs().max()) <= 1e-5
    # h is the derivative of g (the surrogate is a convex function, not two unrelated tables)
    x = (a + (b - a) * torch.rand(2000, dtype=torch.float64, generator=gen)).clamp(a + 1e-3, b - 1e-3).numpy()
    step = 1e-6
    difference = (table.derivatives(x + step)[0] - table.derivatives(x - step)[0]) / (2 * step)
    np.testing.assert_allclose(difference, table.derivatives(x)[1], rtol=1e-5)


def test_the_kernel_reads_the_table_as_its_reference():
    """The compiled lookup (with the sine map's tangent lines beyond ends that are only bounds) against the
    table's numpy arithmetic."""
    cases = ((TSALLIS, (0.0, 1.0)), (QUARTIC, (-1.0, 1.0)), (MIX, (0.0, 2.0)), (BINARY, (0.0, 1.0)))
    for reg, (a, b) in cases + ((tsallis_alpha(1.2), (0.0, 1.0)), (UPPER, (-1.0, 0.0))):
        table = derivative_table.build(reg, a, b)
        cf = np.zeros(20)
        cf[kernels._TAB_A], cf[kernels._TAB_B] = table.a, table.b
        cf[kernels._TAB_S_LO], cf[kernels._TAB_INV_STEP] = table.s_lo, table.inverse_step
        cf[kernels._TAB_SLOPE_A], cf[kernels._TAB_SLOPE_B] = table.slope_a, table.slope_b
        cf[kernels._TAB_POWER] = table.power
        w = b - a
        xs = np.concatenate([np.linspace(a - 0.2 * w, b + 0.2 * w, 301), a + w * np.logspace(-15, -1, 30)])
        G, H = table.derivatives(xs)
        for x, g, h in zip(xs, G, H, strict=True):
            kg, kh, _ = kernels._table_point(x, cf, table.map, table.rows)
            assert kg == pytest.approx(g, rel=1e-14, abs=1e-14) and kh == pytest.approx(h, rel=1e-12), (reg.name, x)
        assert math.isnan(kernels._table_point(math.nan, cf, table.map, table.rows)[0])


def test_the_sine_map_extends_by_tangent_lines_beyond_bounds_only():
    table = derivative_table.build(QUARTIC, -1.0, 1.0)
    g, h = QUARTIC.derivatives(torch.tensor([-1.0, 1.0], dtype=torch.float64))
    assert table.slope_a == pytest.approx(float(h[0]), rel=1e-12) and table.slope_b == pytest.approx(float(h[1]))
    G, H = table.derivatives(np.array([-1.5, 1.5]))
    np.testing.assert_allclose(G, [float(g[0]) - 0.5 * float(h[0]), float(g[1]) + 0.5 * float(h[1])], rtol=1e-9)
    np.testing.assert_allclose(H, [float(h[0]), float(h[1])], rtol=1e-9)
    # at the domain's own end (Tsallis at 0, phi'' infinite) there is no tangent line: x is clamped to it
    table = derivative_table.build(TSALLIS, 0.0, 1.0)
    assert math.isnan(table.slope_a) and math.isfinite(table.slope_b)


def tsallis_alpha(alpha):
    return S(lambda x: (x.clamp_min(0) ** alpha - x) / (alpha * (alpha - 1)), domain=(0, math.inf), name=f"ts{alpha}")


@pytest.mark.parametrize("alpha,power", [(1.2, 2.5), (1.33, 1 / 0.66), (1.5, 1.0), (1.7, 1 / 1.4), (3.0, 1.0)])
def test_the_sine_map_takes_the_power_of_phi_prime_at_its_end(alpha, power):
    """phi' - phi'(0) ~ x^(alpha - 1) at 0 (phi'' infinite for alpha < 2, 0 for alpha = 3): the sine map's power
    makes phi' linear in s there, and the table is as accurate as for x^1.5."""
    reg = tsallis_alpha(alpha)
    table = derivative_table.build(reg, 0.0, 1.0)
    assert table is not None and table.map == derivative_table.MAP_SINE
    assert table.power == pytest.approx(power, rel=1e-6)
    x = torch.cat([torch.linspace(1e-9, 1.0 - 1e-9, 5001, dtype=torch.float64), torch.logspace(-15, -1, 200).double()])
    G, H = table.derivatives(x.numpy())
    assert (H > 0).all()
    g = reg.derivatives(x)[0]
    assert float(((torch.from_numpy(G) - g).abs() / g.abs().clamp_min(1.0)).max()) <= 1e-9


def test_tables_that_would_mislead_are_refused():
    # phi' with a ripple finer than the nodes: convex, but not resolved by the table
    rippled = S(lambda x: 0.5 * x * x - 0.5e-10 * torch.sin(1e5 * x), name="rippled")
    assert derivative_table.build(rippled, 0.0, 1.0) is None
    # an infinite end, or an empty interval
    assert derivative_table.build(TSALLIS, 0.0, math.inf) is None
    assert derivative_table.build(TSALLIS, 1.0, 1.0) is None


@pytest.mark.parametrize("make", [knapsack, half_lines], ids=["knapsack", "half-lines"])
@pytest.mark.parametrize("reg", [TSALLIS, MIX, BINARY, TSALLIS_12], ids=lambda r: r.name)
def test_solutions_are_those_of_the_exact_iteration(make, reg):
    relaxation = InteriorPointRelaxation(make(), reg)
    plan = interior_point._kernel_plan(relaxation.problem_on("cpu"))
    assert derivative_table.table_for(reg, *plan.interval) is not None
    n = relaxation.problem.n
    for scale, seed in ((1e-3, 1), (1.0, 2), (30.0, 3), (1e4, 4)):
        Z = utilities(32, n, scale, seed)
        a = solve(relaxation, Z)
        b = solve(relaxation, Z, table=False)
        with _compiled.disabled():
            c = relaxation.solve(Z)
        assert bool((a.status == STATUS_CONVERGED).all()) and torch.equal(a.status, c.status), scale
        torch.testing.assert_close(a.x, b.x, atol=1e-9, rtol=0)
        torch.testing.assert_close(a.x, c.x, atol=1e-9, rtol=0)
        # no more iterations than the exact iteration takes, give or take the exact steps from the table's point
        assert int((a.iterations - b.iterations).max()) <= 2, (scale, a.iterations - b.iterations)
    # the backward (phi'' at the returned point is the exact one): the same vector-Jacobian products
    Z = utilities(32, n, 1.0, seed=5)
    G = utilities(32, n, 1.0, seed=6)
    grads = []
    for table in (True, False):
        z = Z.clone().requires_grad_(True)
        old = interior_point.DERIVATIVE_TABLE
        interior_point.DERIVATIVE_TABLE = table
        try:
            (relaxation(z) * G).sum().backward()
        finally:
            interior_point.DERIVATIVE_TABLE = old
        grads.append(z.grad)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-7, rtol=1e-6)


def test_gradcheck_through_the_table_path():
    relaxation = InteriorPointRelaxation(half_lines(), MIX)
    Z = utilities(3, 5, 2.0, seed=5).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z: relaxation(z), (Z,), atol=1e-6)


def counting(phi, domain, name):
    calls = []

    class Counting(type(TSALLIS)):
        def derivatives(self, x):
            calls.append(tuple(x.shape))
            return super().derivatives(x)

    return Counting(phi, domain=domain, name=name), calls


def test_one_evaluation_of_phi_per_solve_once_the_table_exists():
    reg, calls = counting(tsallis, (0, math.inf), "counted tsallis")
    relaxation = InteriorPointRelaxation(knapsack(), reg)
    Z = utilities(64, 6, 2.0, seed=6)
    solve(relaxation, Z)  # builds the table
    calls.clear()
    a = solve(relaxation, Z)
    assert int(a.iterations.max()) > 5 and calls == [(64, 6)]  # the check at the table's solutions, nothing else
    calls.clear()
    b = solve(relaxation, Z, table=False)
    assert len(calls) == int(b.iterations.max()) + 1  # without it: once per iteration
    torch.testing.assert_close(a.x, b.x, atol=1e-9, rtol=0)


class Scaled(type(TSALLIS)):
    """phi(x) = c tsallis(x) with c read at each call: a user's phi that reads state besides x."""

    c = 1.0

    def __init__(self):
        super().__init__(lambda x: Scaled.c * tsallis(x), domain=(0, math.inf), name="scaled tsallis")


def test_a_stale_table_is_noticed_dropped_and_the_answer_stays_exact(monkeypatch):
    monkeypatch.setattr(Scaled, "c", 1.0)
    reg = Scaled()
    relaxation = InteriorPointRelaxation(knapsack(), reg)
    interval = interior_point._kernel_plan(relaxation.problem_on("cpu")).interval
    Z = utilities(16, 6, 2.0, seed=7)
    solve(relaxation, Z)
    assert derivative_table.table_for(reg, *interval) is not None
    for stale in range(1, derivative_table.STALE_LIMIT + 1):
        Scaled.c = 1.0 + stale  # the cached table is now phi' of another c
        a = solve(relaxation, Z)
        b = solve(relaxation, Z, table=False)
        assert bool((a.status == STATUS_CONVERGED).all())
        torch.testing.assert_close(a.x, b.x, atol=1e-9, rtol=0)
        assert derivative_table._TABLES[reg]["stale"] == stale
        # the next call builds the table of the phi of now
        torch.testing.assert_close(solve(relaxation, Z).x, b.x, atol=1e-9, rtol=0)
    # a phi that keeps changing gets no more tables
    assert derivative_table.table_for(reg, *interval) is None


def test_elements_the_exact_steps_do_not_end_restart_from_the_start(monkeypatch):
    """With a single exact iteration allowed after a stale table, elements restart the exact iteration from
    their start: the same solutions and iteration counts as without a table."""
    monkeypatch.setattr(Scaled, "c", 1.0)
    monkeypatch.setattr(interior_point, "EXACT_ITERATIONS", 1)
    reg = Scaled()
    relaxation = InteriorPointRelaxation(knapsack(), reg)
    Z = utilities(16, 6, 2.0, seed=8)
    solve(relaxation, Z)
    Scaled.c = 3.0
    a = solve(relaxation, Z)
    b = solve(relaxation, Z, table=False)
    assert torch.equal(a.status, b.status) and torch.equal(a.iterations, b.iterations)
    torch.testing.assert_close(a.x, b.x, atol=1e-12, rtol=0)


def test_max_iter_keeps_its_meaning():
    relaxation = InteriorPointRelaxation(knapsack(), TSALLIS)
    Z = utilities(8, 6, 2.0, seed=9)
    for max_iter in (3, 25):
        a = solve(relaxation, Z, max_iter=max_iter)
        b = solve(relaxation, Z, table=False, max_iter=max_iter)
        assert torch.equal(a.status, b.status) and int(a.iterations.max()) <= max_iter
    assert bool((solve(relaxation, Z, max_iter=3).status == STATUS_MAX_ITER).any())


def test_no_table_where_the_rows_bound_x_only_together():
    """A square turned by 45 degrees: bounded, but interval propagation bounds no coordinate (every row holds two
    unbounded ones), so the table has no interval and phi' is evaluated at every iteration."""
    x = cp.Variable(2)
    rows = [x[0] + x[1] <= 1, x[0] + x[1] >= -1, x[0] - x[1] <= 1, x[0] - x[1] >= -1]
    square = sstcvx.Polytope.from_cvxpy(x, rows, name="turned square", recognize=False)
    relaxation = InteriorPointRelaxation(square, S(lambda x: 0.5 * x * x, name="table square"))
    plan = interior_point._kernel_plan(relaxation.problem_on("cpu"))
    assert plan and plan.interval == (-math.inf, math.inf)
    Z = utilities(8, 2, 1.0, seed=10)
    with _compiled.disabled():
        reference = relaxation.solve(Z)
    solution = relaxation.solve(Z)
    assert bool((solution.status == STATUS_CONVERGED).all())
    torch.testing.assert_close(solution.x, reference.x, atol=1e-9, rtol=0)
