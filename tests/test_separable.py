"""Regularizer.separable: user-defined f(x) = sum_i phi(x_i) on the families' scalar-root solvers.

Witnesses: the built-in relaxations that are separable (softmax, sigmoid, the limited
multi-label projection, sparsemax, the capped-simplex projection), closed forms (1.5-entmax,
mirror maps), the cvxpylayers path with the user's CVXPY form, float64 gradcheck, tau -> 0.
"""

from __future__ import annotations

import copy
import math
import pickle

import cvxpy as cp
import pytest
import torch

import polytopes
import sstcvx
from sstcvx import Regularizer
from sstcvx.registry import serves_separable


def xlogx(x):
    return torch.where(x > 0, x * torch.log(x.clamp_min(1e-300)), torch.zeros_like(x))


def entropy_phi(x):
    return xlogx(x)


def tsallis_phi(x):
    # the Tsallis 1.5-entropy of 1.5-entmax: (x^1.5 - x) / (alpha (alpha - 1)) with alpha = 1.5
    return (x.clamp_min(0) ** 1.5 - x) / 0.75


ENTROPY = Regularizer.separable(entropy_phi, domain=(0, math.inf), name="sep_entropy")
BINARY = Regularizer.separable(lambda x: xlogx(x) + xlogx(1 - x), domain=(0, 1), name="sep_binary_entropy")
SQUARE = Regularizer.separable(lambda x: 0.5 * x * x, name="sep_square")
TSALLIS = Regularizer.separable(
    tsallis_phi,
    domain=(0, math.inf),
    name="sep_tsallis_1.5",
    cvxpy=lambda x: (cp.sum(cp.power(x, 1.5)) - cp.sum(x)) / 0.75,
)
MIX = Regularizer.separable(
    lambda x: 0.5 * xlogx(x) + 0.25 * x * x,
    domain=(0, math.inf),
    name="sep_entropy+euclidean",
    cvxpy=lambda x: 0.5 * -cp.sum(cp.entr(x)) + 0.25 * cp.sum_squares(x),
)


def utilities(shape, scale=3.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale


# ----------------------------------------------------------------------------------------------
# the built-in relaxations, reproduced through their separable form
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [0.3, 3.0, 30.0])
def test_entropy_on_simplex_is_softmax(scale):
    Z = utilities((64, 7), scale)
    X = sstcvx.relax(polytopes.Simplex(7), Z, 1.0, ENTROPY)
    torch.testing.assert_close(X, torch.softmax(Z, -1), atol=1e-12, rtol=0)


@pytest.mark.parametrize("scale", [0.3, 3.0, 30.0])
def test_binary_entropy_on_hypercube_and_ksubset(scale):
    Z = utilities((64, 8), scale)
    X = sstcvx.relax(polytopes.Hypercube(8), Z, 1.0, BINARY)
    torch.testing.assert_close(X, torch.sigmoid(Z), atol=1e-13, rtol=0)
    P = polytopes.KSubset(8, 3)
    X = sstcvx.relax(P, Z, 1.0, BINARY)
    torch.testing.assert_close(X, sstcvx.relax(P, Z, 1.0, "binary_entropy"), atol=1e-11, rtol=0)


def test_half_square_is_the_euclidean_projection():
    Z = utilities((64, 6), 2.0)
    for P in (polytopes.Simplex(6), polytopes.KSubset(6, 2), polytopes.Hypercube(6)):
        X = sstcvx.relax(P, Z, 1.0, SQUARE)
        torch.testing.assert_close(X, sstcvx.relax(P, Z, 1.0, "euclidean"), atol=1e-12, rtol=0)


def entmax15_reference(z):
    """1.5-entmax by sorting: x = [z/2 - t]_+^2 with sum 1; for a support of the s largest
    entries, sum_{i<=s} (z_i/2 - t)^2 = 1 is a quadratic in t (its smaller root), and the
    support is the largest s with z_(s)/2 > t_s."""
    y = z / 2
    ys, _ = torch.sort(y, dim=-1, descending=True)
    s = torch.arange(1, z.shape[-1] + 1, dtype=z.dtype)
    m1, m2 = ys.cumsum(-1) / s, (ys * ys).cumsum(-1) / s
    t = m1 - torch.sqrt(((1 - s * (m2 - m1 * m1)) / s).clamp_min(0))
    support = (ys > t).sum(-1, keepdim=True)
    tau = t.gather(-1, support - 1)
    return (y - tau).clamp_min(0) ** 2


def test_tsallis_on_simplex_is_entmax15():
    """The scaling: 1.5-entmax(z) = argmax_{p in simplex} <z, p> + H_1.5(p) with the Tsallis entropy
    H_a(p) = sum_i (p_i - p_i^a) / (a (a - 1)), i.e. phi(x) = (x^1.5 - x) / 0.75 = (4/3) (x^1.5 - x)
    at tau = 1 (the linear term only shifts nu on the simplex).  The KKT conditions give
    phi'(x) = 2 sqrt(x) - 4/3 = z - nu, so x = [(z - nu')/2]_+^2: entmax's [(alpha - 1) z - t]_+^(1/(alpha - 1)).
    With a temperature, X_tau(U) = entmax15(U / tau)."""
    Z = utilities((128, 9), 2.0)
    X = sstcvx.relax(polytopes.Simplex(9), Z, 1.0, TSALLIS)
    torch.testing.assert_close(X, entmax15_reference(Z), atol=1e-12, rtol=0)
    assert bool((X == 0).any())  # sparse, as entmax
    entmax = pytest.importorskip("entmax")
    torch.testing.assert_close(X, entmax.entmax15(Z, dim=-1), atol=1e-10, rtol=0)
    tau = 0.5
    torch.testing.assert_close(
        sstcvx.relax(polytopes.Simplex(9), Z, tau, TSALLIS), entmax.entmax15(Z / tau, dim=-1), atol=1e-10, rtol=0
    )


def test_mirror_maps_in_closed_form():
    v = torch.linspace(-680, 700, 57, dtype=torch.float64)
    x, D, clamped = ENTROPY.mirror(v)
    torch.testing.assert_close(x, torch.exp(v - 1), rtol=1e-13, atol=0)
    torch.testing.assert_close(D, torch.exp(v - 1), rtol=1e-12, atol=0)
    assert not clamped.any()
    # below phi'(1e-300) the root is within 1e-300 of the end, which is returned (documented)
    x, D, clamped = ENTROPY.mirror(torch.tensor([-700.0], dtype=torch.float64))
    assert float(x) == 0.0 and bool(clamped.all())
    x, D, clamped = SQUARE.mirror(v, lower=torch.tensor(-3.0), upper=torch.tensor(5.0))
    torch.testing.assert_close(x, v.clamp(-3, 5))
    assert torch.equal(D, ((v > -3) & (v < 5)).double())
    x, _, _ = TSALLIS.mirror(v[:, None] / 100)
    torch.testing.assert_close(x[:, 0], ((v / 100 + 4 / 3) / 2).clamp_min(0) ** 2, rtol=1e-13, atol=1e-300)
    # the conjugate value at the maximizer: v x - phi(x) = exp(v - 1) for x log x
    w = torch.linspace(-5, 5, 11, dtype=torch.float64)[None]
    x, _, _ = ENTROPY.mirror(w)
    torch.testing.assert_close(ENTROPY.conjugate(w, x), torch.exp(w - 1).sum(-1))


# ----------------------------------------------------------------------------------------------
# independent formulations: the cvxpylayers path and brute force over vertex lists
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reg", [TSALLIS, MIX], ids=lambda r: r.name)
def test_agrees_with_cvxpylayers_path(reg):
    U = utilities((4, 6), 1.5, seed=1)
    for P in (polytopes.KSubset(6, 2), polytopes.Simplex(6), polytopes.Hypercube(6)):
        fast = sstcvx.relax(P, U, 0.7, reg, solver="specialized")
        generic = sstcvx.relax(P, U, 0.7, reg, solver="cvxpylayers")
        torch.testing.assert_close(fast, generic, atol=1e-6, rtol=0)


def test_brute_force_on_the_vertex_list():
    """The same program stated on KSubset(5, 2)'s vertex list (x = V^T w, w in the simplex)."""
    P = polytopes.KSubset(5, 2)
    Pv = sstcvx.Polytope.from_vertices(P.vertices)
    U = utilities((3, 5), 1.0, seed=2)
    torch.testing.assert_close(
        sstcvx.relax(P, U, 0.5, TSALLIS), sstcvx.relax(Pv, U, 0.5, TSALLIS, solver="cvxpylayers"), atol=1e-6, rtol=0
    )


def test_compare_runs_both_paths():
    report = sstcvx.compare(polytopes.KSubset(6, 2), TSALLIS, tau=0.5, batch=4, repeats=1, hard=False)
    (row,) = report.rows
    assert row.reference == "specialized"
    assert row.max_abs_diff is not None and row.max_abs_diff <= 1e-6
    assert row.max_abs_grad_diff is not None and row.max_abs_grad_diff <= 1e-5


def test_small_tau_gives_the_argmax():
    U = utilities((16, 8), 1.0, seed=3)
    P = polytopes.KSubset(8, 3)
    X = sstcvx.relax(P, U, 1e-3, TSALLIS)
    torch.testing.assert_close(X, sstcvx.argmax(P, U), atol=1e-9, rtol=0)  # Tsallis reaches the vertices
    X = sstcvx.relax(P, U, 1e-3, MIX)
    torch.testing.assert_close(X, sstcvx.argmax(P, U), atol=1e-3, rtol=0)


def test_sum_constraint_and_dtype():
    P = polytopes.KSubset(10, 3)
    U = utilities((32, 10), 5.0, seed=4).float()
    X = sstcvx.relax(P, U, 1.0, MIX)
    assert X.dtype == torch.float32 and X.shape == U.shape
    torch.testing.assert_close(X.double().sum(-1), torch.full((32,), 3.0, dtype=torch.float64), atol=1e-5, rtol=0)
    assert bool(((X >= 0) & (X <= 1)).all())


# ----------------------------------------------------------------------------------------------
# exact backward
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reg", [TSALLIS, MIX, BINARY], ids=lambda r: r.name)
@pytest.mark.parametrize("family", ["simplex", "ksubset", "hypercube"])
def test_gradcheck(reg, family):
    P = {"simplex": polytopes.Simplex(5), "ksubset": polytopes.KSubset(5, 2), "hypercube": polytopes.Hypercube(5)}[
        family
    ]
    Z = utilities((3, 5), 1.0, seed=5).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z: sstcvx.relax(P, z, 1.0, reg), (Z,))


def test_backward_matches_cvxpylayers():
    P = polytopes.KSubset(6, 2)
    U = utilities((3, 6), 1.0, seed=6)
    G = utilities((3, 6), 1.0, seed=7)
    grads = []
    for solver in ("specialized", "cvxpylayers"):
        u = U.clone().requires_grad_(True)
        (sstcvx.relax(P, u, 0.5, MIX, solver=solver) * G).sum().backward()
        grads.append(u.grad)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------
# dispatch, construction checks, copies
# ----------------------------------------------------------------------------------------------


def test_dispatch():
    for P in (polytopes.Simplex(4), polytopes.KSubset(4, 2), polytopes.Hypercube(4)):
        assert serves_separable(P)
        assert "separable" not in sstcvx.registry.specialized_regularizers(P)
        assert sstcvx.relaxation_solver(P, TSALLIS)[1] == "specialized"
    P = polytopes.Permutation(3) if hasattr(polytopes, "Permutation") else None
    if P is not None:
        assert not serves_separable(P)
        with pytest.raises(ValueError, match="no specialized solver"):
            sstcvx.relax(P, torch.zeros(3, 3), 1.0, TSALLIS, solver="specialized")


def test_domain_must_meet_the_polytope():
    reg = Regularizer.separable(lambda x: -torch.log(x - 2.0), domain=(2.0, math.inf), name="far")
    with pytest.raises(ValueError, match="no interior"):
        sstcvx.relax(polytopes.KSubset(4, 2), torch.zeros(4), 1.0, reg)


def cube(x):
    return x**3


def test_construction_errors():
    with pytest.raises(ValueError, match=r"not strictly convex.*phi''"):
        Regularizer.separable(cube, domain=(-1, 1))
    with pytest.raises(ValueError, match="not strictly convex"):
        Regularizer.separable(lambda x: x, domain=(0, 1))
    with pytest.raises(ValueError, match="not finite"):
        Regularizer.separable(torch.log, domain=(-1, 1))
    with pytest.raises(ValueError, match="elementwise"):
        Regularizer.separable(lambda x: x * x * x.sum(), domain=(0, 1))
    with pytest.raises(ValueError, match=r"elementwise|shape"):
        Regularizer.separable(lambda x: (x * x).sum(), domain=(0, 1))
    with pytest.raises(ValueError, match=r"dphi.*disagrees"):
        Regularizer.separable(lambda x: x * x, dphi=lambda x: x)
    with pytest.raises(ValueError, match="inverse_dphi"):
        Regularizer.separable(lambda x: x * x, inverse_dphi=lambda v: v)
    with pytest.raises(ValueError, match="domain"):
        Regularizer.separable(lambda x: x * x, domain=(1, 0))
    with pytest.raises(TypeError, match="domain"):
        Regularizer.separable(lambda x: x * x, domain="positive")
    with pytest.raises(TypeError, match="phi"):
        Regularizer.separable(3.0)
    with pytest.raises(TypeError, match="phi failed"):
        Regularizer.separable(lambda x: x.not_a_method())
    with pytest.raises(NotImplementedError, match="no CVXPY form"):
        ENTROPY.cvxpy(cp.Variable(3))


def test_given_derivatives_and_inverse_are_used():
    reg = Regularizer.separable(
        entropy_phi,
        domain=(0, math.inf),
        dphi=lambda x: torch.log(x) + 1,
        d2phi=lambda x: 1 / x,
        inverse_dphi=lambda v: torch.exp(v - 1),
    )
    Z = utilities((16, 5), 2.0)
    torch.testing.assert_close(
        sstcvx.relax(polytopes.Simplex(5), Z, 1.0, reg), torch.softmax(Z, -1), atol=1e-12, rtol=0
    )


def test_copies_and_pickling():
    clone = copy.deepcopy(TSALLIS)
    assert clone.phi is TSALLIS.phi and clone.domain == TSALLIS.domain and clone.name == TSALLIS.name
    with pytest.raises(pickle.PicklingError, match=r"cvxpy.*lambda|top level"):
        pickle.dumps(TSALLIS)
    top_level = Regularizer.separable(tsallis_phi, domain=(0, math.inf), name="pickled")
    back = pickle.loads(pickle.dumps(top_level))
    Z = utilities((4, 5), 1.0)
    torch.testing.assert_close(
        sstcvx.relax(polytopes.Simplex(5), Z, 1.0, back), entmax15_reference(Z), atol=1e-12, rtol=0
    )


# ----------------------------------------------------------------------------------------------
# declared polytopes: the fast generic solver with the regularizer's mirror map
# ----------------------------------------------------------------------------------------------


def declared_polytopes():
    """Two declarations with inequality rows (no family recognizes them)."""
    x = cp.Variable(5)
    knapsack = sstcvx.Polytope.from_cvxpy(x, [x >= 0, x <= 1, cp.sum(x) <= 2, x[0] + x[1] <= 1], name="knapsack")
    y = cp.Variable(4)
    flow = sstcvx.Polytope.from_cvxpy(
        y, [y >= 0, y[0] + y[1] == 1, y[2] <= y[0], y[3] <= y[1] + 0.5 * y[2]], name="flow"
    )
    return knapsack, flow


@pytest.mark.parametrize("reg", [TSALLIS, MIX], ids=lambda r: r.name)
def test_declared_polytopes_on_the_fast_solver(reg):
    for P in declared_polytopes():
        assert sstcvx.relaxation_solver(P, reg, "fast")[1] == "fast"
        assert sstcvx.relaxation_solver(P, reg)[1] == "fast"  # the interior-point solver
        U = utilities((4, P.event_shape[0]), 1.0, seed=8)
        fast = sstcvx.relax(P, U, 0.5, reg, solver="fast")
        generic = sstcvx.relax(P, U, 0.5, reg, solver="cvxpylayers")
        torch.testing.assert_close(fast, generic, atol=1e-6, rtol=0)


def test_declared_polytope_gradcheck():
    P = declared_polytopes()[0]
    Z = utilities((2, 5), 1.0, seed=9).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z: sstcvx.relax(P, z, 1.0, TSALLIS, solver="fast"), (Z,), atol=1e-6)
    without_cvxpy = Regularizer.separable(tsallis_phi, domain=(0, math.inf), name="no cvxpy form")
    assert sstcvx.relaxation_solver(P, without_cvxpy)[1] == "fast"  # the only path that serves it


def test_the_interior_point_evaluates_phi_once_per_iteration(monkeypatch):
    """The cost claim on declared polytopes without the table of phi' (tests/test_derivative_table.py: with it,
    one evaluation per solve): one evaluation of (phi', phi'') at the start and one per iteration of the
    slowest element, none more at the solution (the backward's phi'' is each element's own from the
    iteration where it stopped)."""
    from sstcvx.generic import interior_point
    from sstcvx.generic.interior_point import InteriorPointRelaxation

    monkeypatch.setattr(interior_point, "DERIVATIVE_TABLE", False)

    counted = []

    class Counting(type(TSALLIS)):
        def derivatives(self, x):
            counted.append(x.shape[0])
            return super().derivatives(x)

    reg = Counting(tsallis_phi, domain=(0, math.inf), name="counting tsallis")
    P = declared_polytopes()[0]
    layer = InteriorPointRelaxation(P, reg)
    counted.clear()
    sol = layer.solve(utilities((64, 5), 2.0, seed=10))
    assert int(sol.status.max()) == 0 and int(sol.iterations.min()) < int(sol.iterations.max())
    assert len(counted) == int(sol.iterations.max()) + 1, (len(counted), sol.iterations.max())
    assert counted[0] == 64 and min(counted) < 64  # converged elements leave the batch


def test_declared_polytope_gradcheck_with_elements_stopping_apart():
    """The backward takes phi'' where each element stopped: elements that converge at different
    iterations (utilities from 0.1 to 10) each get their own, checked by gradcheck in float64."""
    from sstcvx.generic.interior_point import InteriorPointRelaxation

    P = declared_polytopes()[0]
    Z = utilities((6, 5), 1.0, seed=11) * torch.tensor([0.1, 0.3, 1.0, 3.0, 6.0, 10.0], dtype=torch.float64)[:, None]
    iterations = InteriorPointRelaxation(P, MIX).solve(Z).iterations
    assert len(set(iterations.tolist())) > 2, iterations
    Z.requires_grad_(True)
    for reg in (TSALLIS, MIX):
        assert torch.autograd.gradcheck(lambda z: sstcvx.relax(P, z, 1.0, reg, solver="fast"), (Z,), atol=1e-6)


def test_recognized_declaration_uses_the_family_solver():
    x = cp.Variable(6)
    P = sstcvx.Polytope.from_cvxpy(x, [x >= 0, x <= 1, cp.sum(x) == 2])
    if getattr(P, "recognized", None) is None:
        pytest.skip("this declaration is not recognized as a k-subset")
    assert sstcvx.relaxation_solver(P, TSALLIS)[1] == "specialized"
    U = utilities((4, 6), 1.0, seed=10)
    torch.testing.assert_close(
        sstcvx.relax(P, U, 0.5, TSALLIS), sstcvx.relax(polytopes.KSubset(6, 2), U, 0.5, TSALLIS), atol=1e-12, rtol=0
    )


# ----------------------------------------------------------------------------------------------
# the joint Newton iteration of sum_relaxation against the nested solver (an independent route:
# exact inverses of phi' inside a scalar root on nu)
# ----------------------------------------------------------------------------------------------


def neg_log(x):
    return -torch.log(x)


def quartic(x):
    return x**4 + 0.01 * x * x


JOINT_CASES = {
    "x log x": ENTROPY,  # barrier at 0, finite slope at 1
    "binary entropy": BINARY,  # barriers at both ends
    "-log x": Regularizer.separable(neg_log, domain=(0, math.inf), name="sep_neg_log"),  # barrier, phi' -> 0
    "x^1.5": TSALLIS,  # finite slope, phi'' infinite at 0 (a square root)
    "mix": MIX,
    "x^2 / 2": SQUARE,  # no barrier, clamps at both ends
    "x^4": Regularizer.separable(quartic, name="sep_quartic"),  # phi' flat near 0
}


@pytest.mark.parametrize("name", list(JOINT_CASES))
def test_joint_iteration_matches_the_nested_solver(name):
    from sstcvx.separable import _solve_sum, _sum_root

    reg = JOINT_CASES[name]
    gen = torch.Generator().manual_seed(11)
    for scale in (0.01, 1.0, 30.0):  # from nearly uniform to nearly a vertex (tau -> 0)
        for n, total in ((7, 1.0), (7, 3.0), (7, 6.0)):
            z = torch.randn(24, n, generator=gen, dtype=torch.float64) * scale
            x, D = _solve_sum(reg, z, total, 0.0, 1.0)
            _, x_ref, D_ref = _sum_root(reg, z, total, 0.0, 1.0)
            torch.testing.assert_close(x, x_ref, atol=1e-11, rtol=0)
            torch.testing.assert_close(x.sum(-1), torch.full((24,), total, dtype=torch.float64), atol=1e-12, rtol=0)
            # D = 1 / phi''(x) off the bounds; a coordinate within rounding of an end may be called clamped
            # by one solver and free by the other
            inside = (x_ref > 1e-9) & (x_ref < 1 - 1e-9)
            torch.testing.assert_close(D[inside], D_ref[inside], rtol=1e-9, atol=1e-12)


def test_joint_iteration_with_extreme_utilities():
    """Entries of |z| up to 700 (exp(z) at the edge of float64) and rows with equal entries."""
    from sstcvx.separable import _solve_sum, _sum_root

    z = torch.tensor(
        [[700.0, -700.0, 0.0, 1.0, 2.0], [0.0, 0.0, 0.0, 0.0, 0.0], [1e-9, 0.0, -1e-9, 5.0, 5.0]],
        dtype=torch.float64,
    )
    for reg in (ENTROPY, TSALLIS, MIX, BINARY):
        x, _ = _solve_sum(reg, z, 2.0, 0.0, 1.0)
        _, x_ref, _ = _sum_root(reg, z, 2.0, 0.0, 1.0)
        torch.testing.assert_close(x, x_ref, atol=1e-11, rtol=0)


def test_unconverged_rows_go_to_the_nested_solver(monkeypatch):
    """With one joint step allowed, the rows left unconverged are solved by the nested solver: the same result.

    x^4 + 0.01 x^2, whose table is not exact (the Tsallis entropy's is, and the mix gets a fine one: their rows
    converge at the first step)."""
    from sstcvx import separable

    reg = JOINT_CASES["x^4"]
    Z = utilities((32, 6), 3.0, seed=12)
    P = polytopes.KSubset(6, 2)
    reference = sstcvx.relax(P, Z, 1.0, reg)
    calls = []
    nested = separable._sum_root

    def counting(*args, **kwargs):
        calls.append(args[1].shape[0])
        return nested(*args, **kwargs)

    monkeypatch.setattr(separable, "JOINT_ITER", 1)
    monkeypatch.setattr(separable, "_sum_root", counting)
    X = sstcvx.relax(P, Z, 1.0, reg)
    assert calls and 0 < calls[0] <= 32
    torch.testing.assert_close(X, reference, atol=1e-11, rtol=0)


def test_without_a_table_the_start_from_c_serves(monkeypatch):
    """A phi' the table cannot resolve (here: a grid too small) leaves the joint iteration its plain start."""
    from sstcvx import separable

    monkeypatch.setattr(separable, "TABLE_SIZE", 4)
    reg = Regularizer.separable(tsallis_phi, domain=(0, math.inf), name="no table")
    Z = utilities((16, 6), 2.0, seed=13)
    info = separable._interval_info(reg, 0.0, 1.0, 2.0, 6)
    assert info.table is None
    X = separable.sum_relaxation(reg, Z, 2.0, 0.0, 1.0)
    torch.testing.assert_close(X, separable._sum_root(reg, Z, 2.0, 0.0, 1.0)[1], atol=1e-11, rtol=0)


def test_the_joint_iteration_evaluates_phi_a_few_times():
    """The cost claim: a handful of evaluations of (phi', phi'') per batch, not hundreds."""
    counted = []

    class Counting(type(MIX)):
        def derivatives(self, x):
            counted.append(x.shape)
            return super().derivatives(x)

    reg = Counting(MIX.phi, domain=(0, math.inf), name="counting mix")
    Z = utilities((256, 10), 2.0, seed=14)
    sstcvx.relax(polytopes.KSubset(10, 3), Z, 1.0, reg)
    counted.clear()
    sstcvx.relax(polytopes.KSubset(10, 3), Z, 1.0, reg)  # the interval's table is cached by now
    # the fine table makes the start exact to rounding: one evaluation (the check), two if a row needs a step
    assert len(counted) <= 2, len(counted)


def test_the_tables_are_exact_where_the_start_should_pass_the_first_check():
    """x^1.5's table is exact (x is quadratic in v), the mix's coarse one is not (1e-10) but its fine one is."""
    from sstcvx import separable

    eps = torch.finfo(torch.float64).eps
    tsallis = separable._interval_info(TSALLIS, 0.0, 1.0, 3.0, 10)
    assert tsallis.table_error <= separable.EXACT_TABLE * eps and tsallis.fine is None
    mix = separable._interval_info(MIX, 0.0, 1.0, 3.0, 10)
    assert 1e-12 < mix.table_error < 1e-8 and mix.fine is not None
    # the fine table, at the exact root: nu and x unchanged to rounding
    z = utilities((64, 10), 2.0, seed=16)
    nu, x_ref, _ = separable._sum_root(MIX, z, 3.0, 0.0, 1.0)
    nu_fine, x_fine = mix.refine(z, 3.0, nu, x_ref, True)
    torch.testing.assert_close(x_fine, x_ref, atol=1e-13, rtol=0)  # the nested solver: to its tolerance
    torch.testing.assert_close(nu_fine, nu, atol=1e-12, rtol=0)


def test_the_water_filling_start_is_exact_for_x_log_x():
    """Towards one barrier the start in nu solves the exponential model with caps; for x log x on [0, 1] that
    model is the mirror map itself."""
    from sstcvx import separable

    z = torch.cat([utilities((32, 8), scale, seed=17) for scale in (0.1, 1.0, 10.0)])
    for total in (1.0, 3.0):
        info = separable._interval_info(ENTROPY, 0.0, 1.0, total, 8)
        nu_ref, _, _ = separable._sum_root(ENTROPY, z, total, 0.0, 1.0)
        torch.testing.assert_close(separable._barrier_start(info, z, total), nu_ref, atol=1e-10, rtol=0)


@pytest.mark.parametrize("name", list(JOINT_CASES))
def test_box_newton_matches_the_safeguarded_inverse(name):
    """The hypercube's Newton steps from the table against mirror_map (the safeguarded inverse)."""
    from sstcvx.separable import _solve_box, mirror_map

    reg = JOINT_CASES[name]
    z = torch.cat([utilities((16, 7), scale, seed=15) for scale in (0.01, 1.0, 30.0)])
    x, D = _solve_box(reg, z, 0.0, 1.0)
    x_ref, D_ref, _ = mirror_map(reg, z, z.new_tensor(0.0), z.new_tensor(1.0))
    torch.testing.assert_close(x, x_ref, atol=1e-12, rtol=0)
    inside = (x_ref > 1e-9) & (x_ref < 1 - 1e-9)
    torch.testing.assert_close(D[inside], D_ref[inside], rtol=1e-9, atol=1e-12)
