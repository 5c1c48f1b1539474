"""The interior-point solver of the fast generic path (sstcvx.generic.interior_point): brute force over
vertex lists, the specialized solvers, cvxpylayers, gradients, extremes, failures and dispatch."""

import itertools
import math

import cvxpy as cp
import pytest
import torch

import sstcvx
from polytopes import KSubset, Simplex
from polytopes.spanning_tree import spanning_trees_by_flows
from sstcvx import generic
from sstcvx.generic import active_set, normal_matrix, primal_reduction
from sstcvx.generic.interior_point import InteriorPointRelaxation
from sstcvx.regularizers import Regularizer, get_regularizer


def independent_sets(n):
    x = cp.Variable(n)
    return sstcvx.Polytope.from_cvxpy(
        x, [x >= 0, x <= 1, x[:-1] + x[1:] <= 1], name=f"IndependentSets(path {n})", recognize=False
    )


def knapsack():
    x = cp.Variable(5)
    return sstcvx.Polytope.from_cvxpy(
        x, [x >= 0, x <= 1, cp.sum(x) <= 2, x[0] + x[1] <= 1], name="Knapsack", recognize=False
    )


def redundant_knapsack():
    """The knapsack with a duplicated, a rescaled and a loose row."""
    x = cp.Variable(5)
    cons = [x >= 0, x <= 1, cp.sum(x) <= 2, 2 * cp.sum(x) <= 4, x[0] + x[1] <= 1, x[0] + x[1] <= 1.5, x <= 3]
    return sstcvx.Polytope.from_cvxpy(x, cons, name="RedundantKnapsack", recognize=False)


def chain(n):
    y = cp.Variable(n)
    cons = [y >= 0, y <= 1, cp.sum(y) >= 1] + [y[i + 1] <= y[i] for i in range(n - 1)]
    return sstcvx.Polytope.from_cvxpy(y, cons, name=f"Chain({n})", recognize=False)


def zero_one_points(P):
    """Brute force: the 0/1 points of a declaration without auxiliary variables (its vertices here)."""
    L = P.linear_form()
    pts = torch.tensor(list(itertools.product([0.0, 1.0], repeat=L.n)), dtype=torch.float64)
    return pts[L.residuals(pts) <= 1e-9]


def spanning_tree_points(n):
    edges = list(itertools.combinations(range(n), 2))
    rows = []
    for subset in itertools.combinations(range(len(edges)), n - 1):
        parent = list(range(n))

        def find(a):
            while parent[a] != a:
                a = parent[a]
            return a

        ok = True
        for e in subset:
            a, b = find(edges[e][0]), find(edges[e][1])
            ok &= a != b
            parent[a] = b
        if ok:
            rows.append([1.0 if e in subset else 0.0 for e in range(len(edges))])
    return torch.tensor(rows, dtype=torch.float64)


def separated_utilities(B, n, V, seed):
    """Utilities with entries at least 0.2 from 0 and a best vertex at least 0.1 ahead of the next, so
    that X at tau = 1e-3 is that vertex to within exp(-100)."""
    U = torch.randn(4 * B, n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    U = U + 0.2 * torch.sign(U)
    top = (U @ V.T).topk(2, dim=-1).values
    return U[top[:, 0] - top[:, 1] >= 0.1][:B]


def ipm(P, reg):
    return InteriorPointRelaxation(P, get_regularizer(reg))


def tsallis_phi(x):
    return (x.clamp_min(0) ** 1.5 - x) / 0.75


TSALLIS = Regularizer.separable(
    tsallis_phi,
    domain=(0, math.inf),
    name="ipm_tsallis_1.5",
    cvxpy=lambda x: (cp.sum(cp.power(x, 1.5)) - cp.sum(x)) / 0.75,
)


def test_dispatch():
    for P in (independent_sets(4), spanning_trees_by_flows(3)):
        fn, path = sstcvx.relaxation_solver(P, "binary_entropy", solver="fast")
        assert path == "fast" and isinstance(fn, InteriorPointRelaxation)
    x = cp.Variable(4)
    simplex = sstcvx.Polytope.from_cvxpy(x, [x >= 0, cp.sum(x) == 1], recognize=False)
    fn, path = sstcvx.relaxation_solver(simplex, "entropy")
    assert path == "fast" and not isinstance(fn, InteriorPointRelaxation)  # equality rows: Newton on the dual
    fn, path = sstcvx.relaxation_solver(simplex, TSALLIS)
    assert path == "fast" and isinstance(fn, InteriorPointRelaxation)
    fn, path = sstcvx.relaxation_solver(spanning_trees_by_flows(3), "binary_entropy")
    assert path == "fast" and isinstance(fn, InteriorPointRelaxation)


@pytest.mark.parametrize("reg", ["entropy", "binary_entropy", "euclidean"])
@pytest.mark.parametrize("make", [independent_sets, lambda _n: knapsack(), lambda _n: redundant_knapsack()])
def test_small_tau_gives_the_brute_force_argmax(make, reg):
    P = make(5)
    V = zero_one_points(P)
    U = separated_utilities(16, P.event_shape[0], V, seed=1)
    sol = ipm(P, reg).solve(U / 1e-3)
    assert bool((sol.status == 0).all())
    best = V[(U @ V.T).argmax(-1)]
    torch.testing.assert_close(sol.x, best, atol=1e-6, rtol=0)


@pytest.mark.parametrize("reg", ["entropy", "binary_entropy", "euclidean"])
def test_agrees_with_the_vertex_list_declaration(reg):
    """The same polytope declared by inequality rows and by its vertex list (convex weights: auxiliary
    variables) gives the same relaxed point."""
    P = independent_sets(5)
    Q = sstcvx.Polytope.from_vertices(zero_one_points(P))
    U = torch.randn(8, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    a, b = ipm(P, reg).solve(U), ipm(Q, reg).solve(U)
    assert bool((a.status == 0).all()) and bool((b.status == 0).all())
    torch.testing.assert_close(a.x, b.x, atol=1e-8, rtol=0)


@pytest.mark.parametrize("reg", ["binary_entropy", "euclidean"])
def test_agrees_with_the_k_subset_solver(reg):
    x = cp.Variable(8)
    P = sstcvx.Polytope.from_cvxpy(x, [x >= 0, x <= 1, cp.sum(x) == 3], recognize=False)
    U = 3 * torch.randn(32, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    G = torch.randn(32, 8, dtype=torch.float64)
    Z = U.clone().requires_grad_(True)
    X = ipm(P, reg)(Z)
    (g,) = torch.autograd.grad((X * G).sum(), Z)
    Z2 = U.clone().requires_grad_(True)
    Xs = sstcvx.relax(KSubset(8, 3), Z2, 1.0, reg, solver="specialized")
    (gs,) = torch.autograd.grad((Xs * G).sum(), Z2)
    torch.testing.assert_close(X, Xs, atol=1e-8, rtol=0)
    torch.testing.assert_close(g, gs, atol=1e-8, rtol=0)


def test_agrees_with_softmax_and_the_separable_simplex_solver():
    x = cp.Variable(6)
    P = sstcvx.Polytope.from_cvxpy(x, [x >= 0, cp.sum(x) == 1], recognize=False)
    U = 4 * torch.randn(16, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(ipm(P, "entropy")(U), torch.softmax(U, -1), atol=1e-8, rtol=0)
    X = InteriorPointRelaxation(P, TSALLIS)(U)
    Xs = sstcvx.relax(Simplex(6), U, 1.0, TSALLIS, solver="specialized")
    torch.testing.assert_close(X, Xs, atol=1e-8, rtol=0)


@pytest.mark.parametrize(
    "make,reg",
    [
        (lambda: independent_sets(6), "euclidean"),
        (lambda: independent_sets(6), "binary_entropy"),
        (knapsack, "entropy"),
    ],
)
def test_agrees_with_cvxpylayers(make, reg):
    P = make()
    U = 2 * torch.randn(4, P.event_shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    X = sstcvx.relax(P, U, 1.0, reg, solver="fast")
    Xc = sstcvx.relax(P, U, 1.0, reg, solver="cvxpylayers")
    torch.testing.assert_close(X, Xc, atol=1e-6, rtol=0)


@pytest.mark.parametrize("P", [chain(5), knapsack()], ids=lambda P: P.name)
def test_separable_tsallis_agrees_with_cvxpylayers(P):
    U = torch.randn(4, P.event_shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    assert sstcvx.relaxation_solver(P, TSALLIS)[1] == "fast"
    X = sstcvx.relax(P, U, 0.5, TSALLIS)
    Xc = sstcvx.relax(P, U, 0.5, TSALLIS, solver="cvxpylayers")
    torch.testing.assert_close(X, Xc, atol=1e-6, rtol=0)


def test_near_degenerate_bounds_are_resolved(monkeypatch):
    """Coordinates of z close to a bound with a vanishing multiplier (path 30, euclidean, |U| ~ 3): every
    complementarity product, not their mean, must meet the tolerance (the mean left x 2e-6 off)."""
    import sstcvx.generic.interior_point as interior_point

    P = independent_sets(30)
    U = 3 * torch.randn(256, 30, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    X = ipm(P, "euclidean").solve(U).x
    monkeypatch.setattr(interior_point, "MU_TOLERANCE", 1e-17)
    monkeypatch.setattr(interior_point, "TOLERANCE", 1e-14)
    reference = ipm(P, "euclidean").solve(U).x
    assert float((X - reference).abs().max()) < 1e-7


def test_flows_agree_with_the_spanning_tree_vertex_list():
    """Spanning trees of K4 by flows (auxiliary variables) against the same polytope by its 16 trees."""
    P = spanning_trees_by_flows(4)
    Q = sstcvx.Polytope.from_vertices(spanning_tree_points(4))
    U = 5 * torch.randn(8, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    a, b = ipm(P, "binary_entropy").solve(U), ipm(Q, "binary_entropy").solve(U)
    ok = (a.status == 0) & (b.status == 0)
    assert int(ok.sum()) >= 7
    torch.testing.assert_close(a.x[ok], b.x[ok], atol=1e-8, rtol=0)


@pytest.mark.parametrize("compiled", [True, False])
def test_flows_converge_in_few_iterations(compiled, monkeypatch):
    """The proximal weight on the flows follows mu and gets a floor later: a fixed weight took 50-75
    iterations at |z| about 1, no floor let elements at |z| about 30 stall (the compiled kernel's iteration
    and the torch code's)."""
    from sstcvx import _compiled

    if not compiled:
        monkeypatch.setattr(_compiled, "ENABLED", False)
    P = spanning_trees_by_flows(4)
    U = torch.randn(32, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    solver = ipm(P, "binary_entropy")
    sol = solver.solve(U)
    assert bool((sol.status == 0).all())
    assert int(sol.iterations.max()) <= 25
    assert bool((solver.solve(30 * U).status == 0).all())


@pytest.mark.parametrize(
    "make,reg",
    [
        (lambda: independent_sets(4), "binary_entropy"),
        (knapsack, "euclidean"),
        (knapsack, TSALLIS),
        (lambda: spanning_trees_by_flows(3), "binary_entropy"),
    ],
)
def test_gradcheck(make, reg):
    P = make()
    B = 1 if P.linear_form().n_aux else 3
    Z = torch.randn(B, P.event_shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    Z.requires_grad_(True)
    reg = get_regularizer(reg)
    assert torch.autograd.gradcheck(lambda z: sstcvx.relax(P, z, 1.0, reg, solver="fast"), (Z,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("tau", [1e-3, 1e3])
@pytest.mark.parametrize("reg", ["entropy", "binary_entropy", "euclidean"])
def test_extremes(dtype, tau, reg):
    P = independent_sets(5)
    U = 1e3 * separated_utilities(8, 5, zero_one_points(P), seed=9)
    U[0] = 1e-3 * U[0]
    sol = ipm(P, reg).solve((U / tau).to(dtype))
    assert bool((sol.status == 0).all())
    X = sstcvx.relax(P, U.to(dtype), tau, reg, solver="fast")
    assert X.dtype == dtype and bool(torch.isfinite(X).all())
    if tau == 1e-3:  # every element but the first is at its vertex
        V = zero_one_points(P)
        best = V[(U @ V.T).argmax(-1)]
        torch.testing.assert_close(X[1:].double(), best[1:], atol=1e-5, rtol=0)
    else:  # the minimizer of f over P, nearly: compare with the cvxpylayers path
        Xc = sstcvx.relax(P, U[:2], tau, reg, solver="cvxpylayers")
        torch.testing.assert_close(X[:2].double(), Xc, atol=1e-5, rtol=0)


def test_non_converging_element_falls_back_then_is_named(monkeypatch, second_failure_is_named):
    P = chain(4)
    U = torch.randn(3, 4, dtype=torch.float64)
    relaxation = generic.fast_relaxation(P, get_regularizer("entropy"))
    assert isinstance(relaxation, InteriorPointRelaxation)
    monkeypatch.setattr(relaxation, "max_iter", 1)
    with pytest.warns(RuntimeWarning, match="did not converge") as caught:
        X = sstcvx.relax(P, U, 1.0, "entropy", solver="fast")
    # one warning per element re-solved, each naming its element
    named = [
        str(w.message).split("batch element ")[1].split()[0] for w in caught if "did not converge" in str(w.message)
    ]
    assert sorted(named) == ["0", "1", "2"]
    monkeypatch.setattr(relaxation, "max_iter", 200)
    torch.testing.assert_close(X, sstcvx.relax(P, U, 1.0, "entropy", solver="fast"), atol=1e-6, rtol=0)
    monkeypatch.setattr(relaxation, "max_iter", 1)
    second_failure_is_named(P, U, "entropy")


def test_batch_shapes_and_frozen_elements():
    """Elements that converge early are frozen: solving one alone gives the same point as in a batch."""
    P = independent_sets(6)
    U = torch.randn(2, 3, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(10))
    U[0, 0] *= 1e3
    X = sstcvx.relax(P, U, 1.0, "binary_entropy", solver="fast")
    assert X.shape == U.shape
    for i, j in ((0, 0), (1, 2)):
        alone = sstcvx.relax(P, U[i, j][None], 1.0, "binary_entropy", solver="fast")[0]
        torch.testing.assert_close(X[i, j], alone, atol=1e-10, rtol=0)


def plain_tight_solution(monkeypatch, P, U):
    """The Euclidean solution by the interior point alone (no active-set start, no polish) at tight
    tolerances: the reference for the active-set methods."""
    import sstcvx.generic.interior_point as interior_point

    monkeypatch.setattr(interior_point, "POLISH_START", -1.0)
    monkeypatch.setattr(active_set, "START_ROUNDS", -1)
    monkeypatch.setattr(interior_point, "MU_TOLERANCE", 1e-17)
    monkeypatch.setattr(interior_point, "TOLERANCE", 1e-14)
    return ipm(P, "euclidean").solve(U)


@pytest.mark.parametrize("U_scale", [0.5, 1.0, 2.0, 30.0])
def test_polish_agrees_with_the_plain_iteration(monkeypatch, U_scale):
    """The active-set start and polish (Euclidean regularizer) end most elements iterations earlier,
    at the point the iteration without them reaches at tight tolerances."""
    reg = "euclidean"
    import sstcvx.generic.interior_point as interior_point

    P = independent_sets(30)
    U = U_scale * torch.randn(64, 30, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    polished = ipm(P, reg).solve(U)
    monkeypatch.setattr(interior_point, "POLISH_START", -1.0)
    monkeypatch.setattr(active_set, "START_ROUNDS", -1)
    plain = ipm(P, reg).solve(U)
    monkeypatch.setattr(interior_point, "MU_TOLERANCE", 1e-17)
    monkeypatch.setattr(interior_point, "TOLERANCE", 1e-14)
    reference = ipm(P, reg).solve(U)
    assert bool((polished.status == 0).all()) and bool((plain.status == 0).all())
    assert float((polished.x - reference.x).abs().max()) < 1e-9
    assert polished.iterations.float().mean() < plain.iterations.float().mean() - 1


def test_active_set_start_solves_small_euclidean_problems():
    """The Euclidean case starts with an active-set method from the box's solution: on a path of 6 it
    solves every element before the interior point starts, at the cvxpylayers solution."""
    P = independent_sets(6)
    U = 2 * torch.randn(64, 6, generator=torch.Generator().manual_seed(13), dtype=torch.float64)
    sol = ipm(P, "euclidean").solve(U)
    assert bool((sol.status == 0).all()) and float(sol.iterations.float().mean()) < 0.5
    Xc = sstcvx.relax(P, U[:6], 1.0, "euclidean", solver="cvxpylayers")
    torch.testing.assert_close(sol.x[:6], Xc, atol=1e-6, rtol=0)
    V = zero_one_points(P)  # brute force: the projection onto the hull, by a dense QP over the vertex weights
    Q = sstcvx.Polytope.from_vertices(V)
    torch.testing.assert_close(
        sol.x[:6], sstcvx.relax(Q, U[:6], 1.0, "euclidean", solver="cvxpylayers"), atol=1e-6, rtol=0
    )


def test_dual_guess_starts_path_30_near_its_active_set(monkeypatch):
    """The Euclidean start's guess from a few accelerated gradient steps on the projection's dual breaks
    fewer sign conditions than the box's: on a path of 30 at |U| ~ 1 the active-set rounds solve every
    element before the interior point starts with under 2 solves per element in all (3.8 from the box's
    guess), at the point the plain iteration reaches at tight tolerances."""

    P = independent_sets(30)
    U = torch.randn(128, 30, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    solves = []
    once = active_set.solve_held

    def counted(ip, lay, T, *rest):
        solves.append(T.shape[0])
        return once(ip, lay, T, *rest)

    monkeypatch.setattr(active_set, "solve_held", counted)
    sol = ipm(P, "euclidean").solve(U)
    assert bool((sol.status == 0).all()) and bool((sol.iterations == 0).all())
    assert sum(solves) < 2 * U.shape[0] and len(solves) <= 7
    reference = plain_tight_solution(monkeypatch, P, U)
    assert float((sol.x - reference.x).abs().max()) < 1e-9


def test_single_flips_end_cycling_active_set_rounds(monkeypatch):
    """Full sign flips can cycle on an element; from round SINGLE_FLIP_AFTER on an element whose count of
    broken sign conditions is not below its best changes only its most broken pair: on a path of 30 at
    |U| ~ 2, 1 element of 512 is left to the interior point where full flips left 7, and the start's
    points are those of the plain iteration at tight tolerances."""

    P = independent_sets(30)
    U = 2 * torch.randn(512, 30, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    sol = ipm(P, "euclidean").solve(U)
    assert bool((sol.status == 0).all()) and int((sol.iterations > 0).sum()) <= 2
    reference = plain_tight_solution(monkeypatch, P, U)
    assert float((sol.x - reference.x).abs().max()) < 1e-9


def test_dual_guess_leaves_degenerate_elements_to_the_box_guess(monkeypatch):
    """At |U| ~ 10 many elements of a path of 6 end at a vertex where a row and the bounds of all its
    columns are active together; the dual guess holds all of them there (its system is then singular),
    flags the element, and the start takes the box's guess for it: every element is solved before the
    interior point starts, at the cvxpylayers solution.  Where most of the batch is flagged after the
    first step, the guess gives up (the box's guess serves all)."""

    P = independent_sets(6)
    U = 10 * torch.randn(64, 6, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    relaxation = ipm(P, "euclidean")
    ip = relaxation.problem_on("cpu")
    z = U[:, ip.dual.x_free]
    assert active_set.dual_guess(ip, ip.layout, z, active_set.START_DUAL_STEPS) is None
    monkeypatch.setattr(active_set, "START_DUAL_GIVE_UP", 2.0)
    _, degenerate = active_set.dual_guess(ip, ip.layout, z, active_set.START_DUAL_STEPS)  # type: ignore[misc]
    assert 0 < int(degenerate.sum()) < U.shape[0]
    sol = relaxation.solve(U)
    assert bool((sol.status == 0).all()) and bool((sol.iterations == 0).all())
    Xc = sstcvx.relax(P, U[:8], 1.0, "euclidean", solver="cvxpylayers")
    torch.testing.assert_close(sol.x[:8], Xc, atol=1e-6, rtol=0)


def test_gradcheck_with_the_sparse_factorization_and_the_polish():
    """A path of 14 nodes has 13 rows: its normal matrix is factored by levels, and most elements end
    by the polish; the backward reads the active set from the polished state."""
    P = independent_sets(14)
    relaxation = ipm(P, "euclidean")
    assert relaxation.problem_on("cpu").sparse is not None
    Z = torch.randn(2, 14, dtype=torch.float64, generator=torch.Generator().manual_seed(12)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z: sstcvx.relax(P, z, 1.0, "euclidean", solver="fast"), (Z,))
    assert torch.autograd.gradcheck(lambda z: sstcvx.relax(P, z, 0.7, "binary_entropy", solver="fast"), (Z,))


def test_small_batches_take_the_dense_factorization():
    """Where the level-scheduled factorization exists, a batch with B m^3 below DENSE_WORK is factored
    densely (the level loop's fixed cost is larger there); both factors solve the same system."""
    ip = ipm(independent_sets(30), "euclidean").problem_on("cpu")
    assert ip.sparse is not None
    gen = torch.Generator().manual_seed(21)
    for B in (1, 3, 200):
        phi_inv = torch.rand(B, 30, dtype=torch.float64, generator=gen) + 0.1
        extra = torch.rand(B, ip.m, dtype=torch.float64, generator=gen)
        r = torch.randn(B, ip.m, dtype=torch.float64, generator=gen)
        F = normal_matrix.factor(ip, extra, phi_inv)
        assert F[0].dim() == (3 if B * ip.m**3 <= normal_matrix.DENSE_WORK else 2)
        M = (ip.C * phi_inv[:, None, :]) @ ip.C.T + torch.diag_embed(extra)
        x = normal_matrix.solve(ip, F, r)
        torch.testing.assert_close(torch.linalg.solve(M, r), x, atol=1e-10, rtol=1e-10)


def test_active_set_start_solves_a_path_of_30(monkeypatch):
    """With U ~ N(0, 1) the box's guess on a path of 30 is about 4 sign conditions off per element; the
    active-set rounds of the start still solve every element (the interior point does not iterate), at
    the point the iteration without them reaches."""

    P = independent_sets(30)
    U = torch.randn(256, 30, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sol = ipm(P, "euclidean").solve(U)
    assert bool((sol.status == 0).all()) and int(sol.iterations.max()) == 0
    monkeypatch.setattr(active_set, "START_ROUNDS", -1)
    reference = ipm(P, "euclidean").solve(U[:16])
    torch.testing.assert_close(sol.x[:16], reference.x, atol=1e-8, rtol=0)


def coupled_pairs(n):
    """x <= y coordinate by coordinate, both in [0, 1]: auxiliary variables and inequality rows only."""
    x, y = cp.Variable(n), cp.Variable(n)
    return sstcvx.Polytope.from_cvxpy(x, [x >= 0, x <= 1, y >= 0, y <= 1, x <= y], name="CoupledPairs", recognize=False)


def random_state(ip, B, seed):
    """A random interior state laid out as the solver's T, with h = phi'' > 0 and the residuals' inputs."""
    from sstcvx.generic.interior_point import _residuals

    lay = ip.layout
    gen = torch.Generator().manual_seed(seed)
    T = torch.rand(B, lay.width, dtype=torch.float64, generator=gen) + 0.1
    T[:, : lay.N + lay.m_eq] = torch.randn(B, lay.N + lay.m_eq, dtype=torch.float64, generator=gen)
    # multipliers and slacks over several decades, as near the end of an iteration
    T[:, lay.o_y :] *= 10.0 ** torch.randint(-3, 4, (B, 2 * lay.pairs), generator=gen)
    h = torch.rand(B, lay.nx, dtype=torch.float64, generator=gen) + 0.5
    g = torch.randn(B, lay.nx, dtype=torch.float64, generator=gen)
    zs = torch.randn(B, lay.nx, dtype=torch.float64, generator=gen)
    rd, rp, SY, _ = _residuals(ip, lay, T, g, zs)
    return T, h, rd, rp, SY


@pytest.mark.parametrize("make", [lambda: spanning_trees_by_flows(4), lambda: coupled_pairs(7)])
def test_primal_reduction_gives_the_normal_matrix_direction(make):
    """The primal reduction (H = Phi + G^T D G by levels, then the equality Schur complement) solves the
    same Newton system as the normal matrix: predictor and corrector directions agree to rounding."""
    import dataclasses

    from sstcvx.generic import interior_point as m

    ip = ipm(make(), "binary_entropy").ip
    ip = dataclasses.replace(ip, primal=primal_reduction.structure(ip.C, ip.m_eq))
    assert ip.primal is not None and ip.primal.chol.levels <= 3
    lay = ip.layout
    T, h, rd, rp, SY = random_state(ip, 16, 3)
    phi_inv, ratio = m._phi_inverse(lay, T, h, 1e-3)
    Fn = normal_matrix.factor(ip, ratio[0], phi_inv)
    Fp = primal_reduction.factor(ip, ratio[0], phi_inv)
    rc = torch.randn(SY.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) * lay.mask
    for target in (-SY, rc):
        a = m._direction(ip, lay, T, Fn, phi_inv, ratio, rd, rp, target)
        b = m._direction_primal(ip, lay, T, Fp, phi_inv, ratio, rd, rp, target)
        assert bool(torch.isfinite(b).all())
        scale = a.abs().amax(-1, keepdim=True)
        assert float(((a - b).abs() / scale).max()) <= 1e-9


def test_primal_reduction_is_chosen_for_flows_only():
    """The build-time rule: the flows' capacity rows make H block diagonal (2 levels) and M dense; a path's M
    is already factored by levels; the Euclidean regularizer without auxiliary variables polishes."""
    assert ipm(spanning_trees_by_flows(4), "binary_entropy").ip.primal is not None
    assert ipm(spanning_trees_by_flows(3), "euclidean").ip.primal is not None
    assert ipm(independent_sets(30), "binary_entropy").ip.primal is None
    assert ipm(independent_sets(30), "euclidean").ip.primal is None


def test_primal_refinement_that_drops_done_elements_matches_the_full_refinement(monkeypatch):
    """The primal backward's refinement lets an element go once its correction is below REFINE_DONE; its
    vector-Jacobian products match those of every element refined REFINE_STEPS times (REFINE_DONE = 0), at
    |U| where a few elements need every step and some fall back to the normal matrix."""
    P = spanning_trees_by_flows(4)
    R = ipm(P, "binary_entropy")
    gen = torch.Generator().manual_seed(7)
    U = torch.cat([torch.randn(32, 6, generator=gen), 3 * torch.randn(32, 6, generator=gen)]).double()
    W = torch.randn(64, 6, dtype=torch.float64, generator=gen)

    def vjp():
        Z = U.clone().requires_grad_(True)
        return torch.autograd.grad((R(Z) * W).sum(), Z)[0]

    g = vjp()
    monkeypatch.setattr(primal_reduction, "REFINE_DONE", 0.0)
    full = vjp()
    torch.testing.assert_close(g, full, atol=1e-9 * float(full.abs().max()), rtol=0)


@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize("reg", ["binary_entropy", "euclidean"])
def test_primal_reduction_agrees_with_the_normal_matrix(reg, compiled, monkeypatch):
    """Whole solves by both reductions on the flows of K4, and the primal reduction's refined backward
    against central differences (on the flows it is the more accurate one: the normal matrix carries
    Phi^-1 of order 1 / mu on the interior flows and was measured up to 7e-4 off).  Both iterations: the
    compiled kernel's (CPU default, binary entropy) and the torch code's."""
    import dataclasses

    from sstcvx import _compiled

    if not compiled:
        monkeypatch.setattr(_compiled, "ENABLED", False)
    elif reg == "euclidean":
        pytest.skip("the Euclidean regularizer takes the torch iteration")

    P = spanning_trees_by_flows(4)
    chosen, forced = ipm(P, reg), ipm(P, reg)
    assert chosen.problem_on("cpu").primal is not None
    forced._ip_on_device["cpu"] = dataclasses.replace(chosen.problem_on("cpu"), primal=None)
    U = 2 * torch.randn(24, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    a, b = chosen.solve(U), forced.solve(U)
    assert bool((a.status == 0).all()) and bool((b.status == 0).all())
    assert int(a.iterations.max()) <= int(b.iterations.max()) + 3
    # within the solver's precision on a near-degenerate coordinate (about 2e-8, see the module): element 12
    # of this draw has one, where the primal reduction's point is 1.5e-8 from the tight-tolerance solution
    # and the normal matrix's 5e-9
    torch.testing.assert_close(a.x, b.x, atol=2e-8, rtol=0)
    U, W = U[:6], torch.randn(6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    Z = U.clone().requires_grad_(True)
    (g,) = torch.autograd.grad((chosen(Z) * W).sum(), Z)
    eps, fd = 1e-5, torch.zeros_like(U)
    for j in range(6):
        E = torch.zeros_like(U)
        E[:, j] = eps
        fd[:, j] = ((chosen(U + E) - chosen(U - E)) * W).sum(-1) / (2 * eps)
    torch.testing.assert_close(g, fd, atol=1e-5, rtol=0)


def test_primal_reduction_gradcheck():
    P = spanning_trees_by_flows(3)
    assert ipm(P, "binary_entropy").ip.primal is not None
    Z = torch.randn(2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(13)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z: sstcvx.relax(P, z, 1.0, "binary_entropy", solver="fast"), (Z,))


def batched_jacobians(P, reg, Z):
    """dX/dZ per element, (B, n, n), by n vector-Jacobian products of the fast solver on the batch Z (B, n)."""
    Z = Z.clone().requires_grad_(True)
    X = sstcvx.relax(P, Z, 1.0, reg, solver="fast")
    rows = [torch.autograd.grad(X[:, i].sum(), Z, retain_graph=True)[0] for i in range(Z.shape[1])]
    return torch.stack(rows, 1)


@pytest.mark.parametrize("reg", ["binary_entropy", "euclidean", "entropy"])
def test_backward_with_auxiliary_variables_matches_the_rows(reg):
    """A vertex list has auxiliary variables (the vertex weights), most of them interior and not unique at
    the solution: their Phi is about mu / w^2, and without a proximal floor in the backward the
    products were 1e-3 off. Path 6 by its vertices against path 6 by its rows (no auxiliary variable),
    at |U| from 1 to 10."""
    Pi = independent_sets(6)
    Pv = sstcvx.Polytope.from_vertices(zero_one_points(Pi))
    g = torch.Generator().manual_seed(14)
    Z = (
        torch.randn(12, 6, dtype=torch.float64, generator=g)
        * torch.tensor([1.0, 3.0, 10.0]).repeat(4)[:, None].double()
    )
    Jv, Ji = batched_jacobians(Pv, reg, Z), batched_jacobians(Pi, reg, Z)
    assert float((Jv - Ji).abs().max()) < 5e-6


def test_backward_of_two_extended_formulations_agree():
    """K4's spanning trees by their 16 vertices and by flows (the primal reduction): two sets of auxiliary
    variables, the same polytope, the same derivative."""
    Pt = sstcvx.Polytope.from_vertices(spanning_tree_points(4))
    Pf = spanning_trees_by_flows(4)
    Z = 2 * torch.randn(8, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(15))
    assert (
        float((batched_jacobians(Pt, "binary_entropy", Z) - batched_jacobians(Pf, "binary_entropy", Z)).abs().max())
        < 5e-6
    )


def test_flows_at_large_utilities_converge_without_the_fallback():
    """At |z| about 1000 an element of the K4 flows stalled under the primal reduction (200 iterations, then
    the conic fallback); after PRIMAL_ITERATIONS the normal matrix takes over and converges it."""
    P = spanning_trees_by_flows(4)
    relaxation = ipm(P, "binary_entropy")
    assert relaxation.problem_on("cpu").primal is not None
    Z = 1000.0 * torch.randn(64, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    sol = relaxation.solve(Z)
    assert bool((sol.status == 0).all()) and int(sol.iterations.max()) < 60
