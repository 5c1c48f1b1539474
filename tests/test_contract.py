"""The contract of every registered polytope family, written once.

Parametrized over ``sstcvx.families.families()`` (the modules of the ``sstcvx.families``
entry-point group: ``polytopes`` and any installed package that declares families) and,
within a family, over every specialized relaxation registered for it
(``sstcvx.registry.specialized_regularizers``) and its hard argmax.  Sizes: the family's
``test_sizes`` (default ``quick_sizes``), smallest first.  Independent witnesses:

* brute force through the vertex list ``P.vertices``, at every size that lists it: the argmax
  is the best vertex for a generic U (no ties); ``exp_family_entropy`` is the softmax-weighted
  mean of the vertices; any other regularizer's X lies in P and satisfies the first-order
  condition <U / tau - grad f(X), v - X> <= 0 at every vertex v, which characterizes the maximizer;
* the generic CVXPY path (``solver="generic"``) on the same U, forward and backward;
* ``torch.autograd.gradcheck`` in float64, in U and in tau;
* the tau limits: tau -> 0 gives the hard argmax; tau -> infinity gives argmin_P f, which is
  the relaxation at U = 0, the generic path's at U = 0 and, for ``exp_family_entropy``, the
  mean of the vertices;
* extreme utilities (|U| up to 1e3, tau from 1e-3 to 1e3, float32 and float64, the smallest
  and the largest size):
  finite values and gradients, no solver warning, X in P, and the hard sample at tau = 1e-3;
* batch shapes (none, one and two batch dimensions, empty batches), dtype and device.

"X in P" is checked three ways: each coordinate within its range over P exactly; <d, X>
within [min_P <d, x>, max_P <d, x>] for the coordinate directions, the all-ones direction,
the sums along each event axis and random directions (the bounds from the argmax oracle,
itself checked against brute force); and, where the CVXPY declaration is built, its
constraints' violation.  The exact witnesses (the generic path, gradcheck, the tau limits)
run at the first size, which must list its vertices and build its declaration.  Nothing here names a family: a new
one is picked up by registering itself (``sstcvx.families.register_family``).
"""

import math
import warnings

import cvxpy as cp
import numpy as np
import pytest
import torch

import sstcvx
from sstcvx.families import families
from sstcvx.registry import find_argmax, specialized_regularizers
from sstcvx.regularizers import get_regularizer

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def generic_atol(tau):
    """Distance from the generic path on these small problems (Clarabel on exponential cones, SCS on
    the second-order cone of ||x||^2 / 2): measured up to 4e-7 at tau >= 0.7 and 4e-6 at tau = 0.1."""
    return 1e-6 * max(1.0, 1.0 / tau)


#: Tolerance of "X in P" by output dtype: of each coordinate's range, and of the other support
#: values and the constraints (sums over up to 100 entries).
COORDINATE_ATOL = {torch.float64: 1e-12, torch.float32: 2.5e-7}
MEMBERSHIP_ATOL = {torch.float64: 1e-9, torch.float32: 1e-5}

_POLYTOPES: dict = {}
_SUPPORTS: dict = {}
_DECLARATIONS: dict = {}


def contract_sizes(family):
    return tuple(family.test_sizes) or tuple(family.quick_sizes)


def polytope(family, n):
    """``family(n)``, built once per session so that vertex lists and generic layers are reused."""
    key = (family.name, n)
    if key not in _POLYTOPES:
        _POLYTOPES[key] = family(n)
    return _POLYTOPES[key]


def _cases():
    family_cases, relaxation_cases = [], []
    for name, family in sorted(families().items()):
        family_cases.append(pytest.param(family, id=name))
        for regularizer in specialized_regularizers(polytope(family, contract_sizes(family)[0])):
            relaxation_cases.append(pytest.param(family, regularizer, id=f"{name}-{regularizer}"))
    return family_cases, relaxation_cases


FAMILIES, RELAXATIONS = _cases()


def flat(X):
    return X.reshape(X.shape[0], -1)


def scores(V, U):
    """<U_b, v_j> for every row b of U and vertex j: (B, m)."""
    return flat(U) @ flat(V).to(U.dtype).T


def relax(P, U, tau, regularizer, solver="specialized"):
    return sstcvx.relax(P, U, tau, regularizer, solver=solver)


def hard(P, U):
    """The argmax by the family's specialized oracle (the generic LP if it registers none)."""
    return sstcvx.argmax(P, U, solver="specialized" if find_argmax(P) is not None else "generic")


def small_polytope(family):
    P = polytope(family, contract_sizes(family)[0])
    assert P.vertices is not None, f"{family.name}: the first of the contract sizes must list its vertices"
    return P


def top_two_gap(S):
    """Best minus second-best score per row (inf with a single vertex)."""
    if S.shape[-1] < 2:
        return torch.full(S.shape[:-1], math.inf, dtype=S.dtype)
    top = S.topk(2, dim=-1).values
    return top[..., 0] - top[..., 1]


# -- membership in P -----------------------------------------------------------------------------


def support(P):
    """Directions D (k, *event_shape) and min/max of <d, x> over P for each (from the argmax oracle)."""
    key = id(P)
    if key not in _SUPPORTS:
        shape, d = tuple(P.event_shape), math.prod(P.event_shape)
        directions = [torch.eye(d, dtype=torch.float64), torch.ones(1, d, dtype=torch.float64)]
        if len(shape) > 1:  # the sums along each event axis: rows and columns of a matrix event
            index = torch.arange(d).reshape(shape)
            for axis, size in enumerate(shape):
                for i in range(size):
                    row = torch.zeros(d, dtype=torch.float64)
                    row[index.select(axis, i).reshape(-1)] = 1
                    directions.append(row.unsqueeze(0))
        generator = torch.Generator().manual_seed(1)
        directions.append(torch.randn(16, d, generator=generator, dtype=torch.float64))
        D = torch.cat(directions).reshape(-1, *shape)
        upper = (flat(D) * flat(hard(P, D))).sum(-1)
        lower = (flat(D) * flat(hard(P, -D))).sum(-1)
        _SUPPORTS[key] = (D, lower, upper)
    return _SUPPORTS[key]


def _affine_rows(x, constraint):
    """``(A, b, kind)`` with the constraint's expression = A vec(x) + b (C order), or None if not affine."""
    kinds = {
        cp.constraints.Inequality: "<=",
        cp.constraints.NonPos: "<=",
        cp.constraints.Equality: "==",
        cp.constraints.Zero: "==",
    }
    kind = kinds.get(type(constraint))
    if kind is None or not constraint.expr.is_affine():
        return None
    d = math.prod(x.shape)
    columns = []
    for j in range(-1, d):  # the offset at x = 0, then one column per coordinate
        value = np.zeros(d)
        if j >= 0:
            value[j] = 1.0
        x.value = value.reshape(x.shape)
        columns.append(np.asarray(constraint.expr.value, dtype=np.float64).reshape(-1))
    x.value = None
    b = columns[0]
    return torch.from_numpy(np.stack(columns[1:], axis=1) - b[:, None]), torch.from_numpy(b), kind


def declaration(P):
    """P's constraints as ``[(A, b, kind) or constraint]`` with x, or None when P is too large to declare."""
    key = id(P)
    if key not in _DECLARATIONS:
        try:
            x, constraints = P.cvxpy_declaration()
        except ValueError:  # too large to declare: the family names its specialized solver instead
            _DECLARATIONS[key] = None
        else:
            alone = all(v.id == x.id for c in constraints for v in c.variables())
            forms = [(_affine_rows(x, c) if alone else None) or c for c in constraints]
            _DECLARATIONS[key] = (alone, x, forms)
    return _DECLARATIONS[key]


#: The LP solver's feasibility tolerance, allowed when a distance to P is found by an LP.
LP_DISTANCE_TOLERANCE = 1e-8


def declaration_violation(P, X):
    """Largest violation of P's CVXPY constraints by the rows of X; None when not declared."""
    found = declaration(P)
    if found is None:
        return None
    alone, x, forms = found
    rows = flat(X.detach().double().cpu())
    worst = 0.0
    if alone:
        for form in forms:
            if isinstance(form, tuple):  # affine: one matmul for the whole batch
                A, b, kind = form
                E = rows @ A.T + b
                if E.numel():
                    worst = max(worst, float((E.clamp_min(0) if kind == "<=" else E.abs()).max()))
                continue
            for row in rows.numpy():
                x.value = row.reshape(x.shape)
                worst = max(worst, float(np.max(form.violation())))
            x.value = None
        return worst
    # auxiliary variables: the distance (max norm) from the row to P, one LP per row, less the LP
    # solver's own feasibility tolerance (its distances to points of P measured up to 1.6e-9)
    target, t = cp.Parameter(x.shape), cp.Variable()
    problem = cp.Problem(cp.Minimize(t), forms + [cp.abs(x - target) <= t])
    for row in rows.numpy():
        target.value = row.reshape(x.shape)
        problem.solve()
        worst = max(worst, float(t.value) - LP_DISTANCE_TOLERANCE)
    return worst


def assert_in_P(P, X, what):
    atol = MEMBERSHIP_ATOL[X.dtype]
    D, lower, upper = support(P)
    d = math.prod(P.event_shape)
    Xf = flat(X.detach()).double().cpu()
    # each coordinate within its range over P (the first d directions are the unit vectors), to rounding
    outside = torch.maximum(Xf - upper[:d], lower[:d] - Xf).max().item()
    assert outside <= COORDINATE_ATOL[X.dtype], f"{what}: a coordinate leaves its range over P by {outside:.3g}"
    projections = Xf @ flat(D).T
    excess = torch.maximum(projections - upper, lower - projections).max().item()
    assert excess <= atol, f"{what}: <d, X> leaves [min_P, max_P] by {excess:.3g}"
    violation = declaration_violation(P, X)
    assert violation is None or violation <= atol, (
        f"{what}: the declaration's constraints are violated by {violation:.3g}"
    )


# -- brute force ----------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_argmax_is_the_brute_force_vertex(family):
    checked = 0
    for n in contract_sizes(family):
        P = polytope(family, n)
        V = P.vertices
        if V is None:
            continue
        U = torch.randn(64, *P.event_shape, dtype=torch.float64)
        S = scores(V, U)
        assert (top_two_gap(S) > 1e-9).all()  # a generic U: one best vertex per row
        X = hard(P, U)
        assert torch.equal(X, V[S.argmax(-1)]), f"{P.name}: the argmax is not the best vertex"
        checked += 1
    assert checked, f"{family.name}: no contract size lists its vertices"
    P = small_polytope(family)
    U = torch.randn(4, *P.event_shape, dtype=torch.float64)
    assert torch.equal(sstcvx.argmax(P, U, solver="generic"), hard(P, U))


@pytest.mark.parametrize("family,regularizer", RELAXATIONS)
def test_relaxation_is_the_brute_force_optimum(family, regularizer):
    tau = 0.7
    for n in contract_sizes(family):
        P = polytope(family, n)
        V = P.vertices
        if V is None:
            continue
        Z = torch.randn(8, *P.event_shape, dtype=torch.float64)
        X = relax(P, Z, tau, regularizer)
        if regularizer == "exp_family_entropy":
            gibbs = (torch.softmax(scores(V, Z) / tau, -1) @ flat(V)).reshape(X.shape)
            torch.testing.assert_close(X, gibbs, atol=1e-8, rtol=0)
            continue
        # the first-order condition at every vertex, on the coordinates that vary over P
        x = X.detach().clone().requires_grad_(True)
        (grad_f,) = torch.autograd.grad(get_regularizer(regularizer).value(x, P.event_dim).sum(), x)
        varying = (flat(V) != flat(V)[:1]).any(0)
        torch.testing.assert_close(flat(X)[:, ~varying], flat(V)[:1, ~varying].expand(8, -1), atol=1e-12, rtol=0)
        residual = torch.where(varying, flat(Z) / tau - flat(grad_f), torch.zeros(()).double())
        slack = residual @ flat(V).T - (residual * flat(X)).sum(-1, keepdim=True)
        assert slack.max() <= 1e-8, f"{P.name}, {regularizer}: a vertex improves on X by {slack.max():.3g}"
        assert_in_P(P, X, f"{P.name}, {regularizer}")


# -- the generic path and gradcheck ------------------------------------------------------------------


@pytest.mark.parametrize("family,regularizer", RELAXATIONS)
def test_agrees_with_generic_path(family, regularizer):
    P = small_polytope(family)
    U = 2 * torch.randn(3, *P.event_shape, dtype=torch.float64)
    G = torch.randn_like(U)
    for tau in (0.1, 2.0):
        outputs, grads = [], []
        for solver in ("specialized", "generic"):
            u = U.clone().requires_grad_(True)
            X = relax(P, u, tau, regularizer, solver=solver)
            outputs.append(X.detach())
            grads.append(torch.autograd.grad((X * G).sum(), u)[0])
        torch.testing.assert_close(outputs[0], outputs[1], atol=generic_atol(tau), rtol=0)
        torch.testing.assert_close(grads[0], grads[1], atol=generic_atol(tau) / tau, rtol=0)


@pytest.mark.parametrize("family,regularizer", RELAXATIONS)
def test_gradcheck(family, regularizer):
    P = small_polytope(family)
    U = torch.randn(2, *P.event_shape, dtype=torch.float64, requires_grad=True)
    tau = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda u, t: relax(P, u, t, regularizer), (U, tau))


# -- limits and extreme inputs --------------------------------------------------------------------


@pytest.mark.parametrize("family,regularizer", RELAXATIONS)
def test_tau_limits(family, regularizer):
    P = small_polytope(family)
    V = P.vertices
    # U favours a random vertex v* of the 0/1 set by at least 0.9 per coordinate where a vertex differs
    best = V[torch.randint(V.shape[0], (8,))]
    U = 2 * best - 1 + 0.2 * (torch.rand(best.shape, dtype=torch.float64) - 0.5)
    S = scores(V, U)
    assert torch.equal(V[S.argmax(-1)], best) and top_two_gap(S).min() > 0.5
    torch.testing.assert_close(hard(P, U), best, atol=0, rtol=0)
    torch.testing.assert_close(relax(P, U, 1e-3, regularizer), best, atol=1e-12, rtol=0)
    # tau -> infinity: argmin_P f, the relaxation at U = 0
    centre = relax(P, torch.zeros(1, *P.event_shape, dtype=torch.float64), 1.0, regularizer)
    torch.testing.assert_close(relax(P, U, 1e7, regularizer), centre.expand_as(U), atol=1e-6, rtol=0)
    generic = relax(P, torch.zeros_like(centre), 1.0, regularizer, solver="generic")
    torch.testing.assert_close(centre, generic, atol=generic_atol(1.0), rtol=0)
    if regularizer == "exp_family_entropy":  # the uniform distribution over the vertices
        torch.testing.assert_close(centre[0], V.mean(0), atol=1e-12, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("family,regularizer", RELAXATIONS)
def test_robust_to_extreme_utilities(family, regularizer, dtype):
    sizes = contract_sizes(family)
    for n in sorted({sizes[0], sizes[-1]}):  # the smallest and the largest
        P = polytope(family, n)
        for tau in (1e-3, 1.0, 1e3):  # U / tau from 1e6 down to 1e-3 in magnitude
            what = f"{P.name}, {regularizer}, tau={tau}, {dtype}"
            theta = (1e3 * torch.randn(6, *P.event_shape, dtype=torch.float64)).to(dtype).requires_grad_(True)
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # a solver that misses its tolerance warns
                X = sstcvx.sample(
                    P, theta, tau, regularizer, solver="specialized", generator=torch.Generator().manual_seed(n)
                )
            (X * torch.randn_like(X)).sum().backward()
            assert X.dtype == dtype and torch.isfinite(X).all(), what
            assert torch.isfinite(theta.grad).all(), what
            assert_in_P(P, X, what)
        # |theta| ~ 1e3 decides the best vertex by far more than tau = 1e-3: the hard sample, same noise
        soft = sstcvx.sample(
            P, theta.detach(), 1e-3, regularizer, solver="specialized", generator=torch.Generator().manual_seed(7)
        )
        vertex = sstcvx.sample(P, theta.detach(), mode="hard", generator=torch.Generator().manual_seed(7))
        assert_in_P(P, vertex, f"{P.name}, hard sample, {dtype}")
        torch.testing.assert_close(soft, vertex, atol=1e-6, rtol=0)


# -- shapes, dtype, device ------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("family", FAMILIES)
def test_batch_shape_dtype_and_device_preserved(family, dtype, device):
    P = small_polytope(family)
    solvers = {"argmax": lambda U: hard(P, U)}
    for regularizer in specialized_regularizers(P):
        solvers[regularizer] = lambda U, r=regularizer: relax(P, U, 0.5, r)
    for batch in [(), (3,), (2, 3), (0,), (2, 0)]:
        U = torch.randn(*batch, *P.event_shape, dtype=dtype).to(device).requires_grad_(True)
        for name, solve in solvers.items():
            X = solve(U)
            assert X.shape == U.shape and X.dtype == dtype and X.device == U.device, (name, batch)
            # the same elements give the same values, whatever the batch's shape
            rows = solve(U.detach().reshape(-1, *P.event_shape))
            assert torch.equal(X.detach(), rows.reshape(U.shape)), (name, batch)
            if dtype == torch.float32:  # as accurate as float32 allows: the float64 values, rounded
                exact = solve(U.detach().double())
                torch.testing.assert_close(X.double(), exact, atol=0 if name == "argmax" else 1e-6, rtol=0)
            if name != "argmax":
                (grad,) = torch.autograd.grad(X.sum(), U)
                assert grad.shape == U.shape and grad.dtype == dtype and grad.device == U.device, (name, batch)
