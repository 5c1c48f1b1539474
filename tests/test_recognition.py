"""Recognition of known families in CVXPY declarations (sstcvx.recognition): equivalent ways of
writing each family are recognized, near misses are not, and a recognized declaration is solved
by the family's solvers through the coordinate map, in agreement with its own generic path and
with brute force."""

import warnings

import cvxpy as cp
import numpy as np
import pytest
import torch

import sstcvx
from polytopes import KSubset, Simplex
from sstcvx import families as family_registry
from sstcvx.recognition import Match, mismatch, recognize

PERM8 = np.array([3, 7, 0, 5, 1, 6, 2, 4])
PERM12 = np.array([5, 11, 0, 7, 2, 9, 4, 1, 10, 3, 8, 6])
PERM16 = np.array([9, 2, 14, 0, 7, 11, 4, 15, 1, 12, 6, 3, 13, 8, 5, 10])


def declare(x, constraints):
    return sstcvx.Polytope.from_cvxpy(x, constraints)


def v(n, **kw):
    return cp.Variable(n, **kw)


def _simplex():
    def permuted():
        y = v(8)
        return declare(y, [y[PERM8] >= 0, cp.sum(y[PERM8[:5]]) + cp.sum(y[PERM8[5:]]) == 1])

    def matrix():
        X = cp.Variable((2, 4))
        return declare(X, [X >= 0, cp.sum(X) == 1])

    return (
        [
            lambda: (lambda x: declare(x, [x >= 0, cp.sum(x) == 1]))(v(8)),
            lambda: (lambda x: declare(x, [3 * cp.sum(x) == 3, -x <= 0]))(v(8)),  # scaled rows, bounds as rows
            lambda: (lambda x: declare(x, [cp.sum(x) <= 1, -2 * cp.sum(x) <= -2, x >= 0]))(v(8)),  # two inequalities
            lambda: (lambda x: declare(x, [x >= 0, x <= 2, cp.sum(x) == 1, x[0] + x[1] <= 1]))(v(8)),  # redundant
            lambda: (lambda x: declare(x, [cp.sum(x) == 1]))(v(8, nonneg=True)),  # a variable attribute
            permuted,
            matrix,
        ],
        "simplex",
        "Simplex(n=8)",
    )


def _hypercube():
    def elementwise():
        x = v(8)
        return declare(x, [x[i] >= 0 for i in range(8)] + [x[i] <= 1 for i in reversed(range(8))])

    def matrix():
        X = cp.Variable((2, 4))
        return declare(X, [0 <= X, X <= 1])

    return (
        [
            lambda: (lambda x: declare(x, [x >= 0, x <= 1]))(v(8)),
            lambda: (lambda x: declare(x, [-3 * x <= 0, 2 * x <= 2]))(v(8)),
            lambda: (lambda x: declare(x, [x <= 1]))(v(8, nonneg=True)),
            lambda: (lambda x: declare(x, [x >= 0, x <= 1, x[0] + x[1] <= 2, cp.sum(x) >= -1]))(v(8)),  # implied rows
            elementwise,
            matrix,
        ],
        "hypercube",
        "Hypercube(n=8)",
    )


def _ksubset():
    def permuted():
        y = v(8)
        z = y[PERM8]
        return declare(y, [z >= 0, 1 - z >= 0, cp.sum(z) == 3])

    def matrix():
        X = cp.Variable((2, 4))
        return declare(X, [X >= 0, X <= 1, cp.sum(X, axis=0) @ np.ones(4) == 3])

    return (
        [
            lambda: (lambda x: declare(x, [x >= 0, x <= 1, cp.sum(x) == 3]))(v(8)),  # the README's example
            lambda: (lambda x: declare(x, [3 * cp.sum(x) == 9, -x <= 0, 4 * x <= 4]))(v(8)),
            lambda: (lambda x: declare(x, [cp.sum(x) <= 3, cp.sum(x) >= 3, x >= 0, x <= 1]))(v(8)),
            lambda: (lambda x: declare(x, [cp.sum(x) == 3, x[:4] + x[4:] <= 2, cp.sum(x[:2]) <= 2, x >= 0, x <= 1]))(
                v(8)
            ),
            permuted,
            matrix,
        ],
        "ksubset",
        "KSubset(n=8, k=3)",
    )


def _product_simplex():
    def columns():
        X = cp.Variable((4, 3))  # groups are the columns: permuted coordinates
        return declare(X, [X >= 0, cp.sum(X, axis=0) == 1])

    def flattened():
        y = v(12)
        return declare(y, [y >= 0] + [cp.sum(y[4 * g : 4 * g + 4]) == 1 for g in range(3)])

    def permuted():
        y = v(12)
        X = cp.reshape(y[PERM12], (3, 4), order="C")
        return declare(y, [X >= 0, cp.sum(X, axis=1) == 1])

    def combined():
        # the equalities written as combinations: the total first, then two of the group sums (scaled)
        X = cp.Variable((3, 4))
        return declare(X, [cp.sum(X) == 3, 2 * cp.sum(X[0]) == 2, -cp.sum(X[2]) == -1, -X <= 0, X <= 5])

    return (
        [
            lambda: (lambda X: declare(X, [X >= 0, cp.sum(X, axis=1) == 1]))(cp.Variable((3, 4))),
            lambda: (lambda X: declare(X, [cp.sum(X, axis=1) <= 1, cp.sum(X, axis=1) >= 1, X >= 0]))(
                cp.Variable((3, 4))
            ),
            columns,
            flattened,
            permuted,
            combined,
        ],
        "product_simplex",
        ("ProductSimplex(groups=3, items=4)", "ProductSimplex(groups=4, items=3)"),
    )


def _permutation():
    def flattened():
        y = v(16)
        X = cp.reshape(y, (4, 4), order="C")
        return declare(y, [y >= 0, cp.sum(X, axis=0) == 1, cp.sum(X, axis=1) == 1])

    def permuted():
        y = v(16)
        X = cp.reshape(y[PERM16], (4, 4), order="C")
        return declare(y, [X >= 0, cp.sum(X, axis=1) == 1, cp.sum(X, axis=0) == 1])

    def combined():
        X = cp.Variable((4, 4))
        return declare(
            X,
            [
                cp.sum(X) == 4,
                5 * cp.sum(X[:, 1:], axis=0) == 5,
                cp.sum(X, axis=1) <= 1,
                cp.sum(X, axis=1) >= 1,
                -X <= 0,
                X <= 1,
            ],
        )

    return (
        [
            lambda: (lambda X: declare(X, [X >= 0, cp.sum(X, axis=1) == 1, cp.sum(X, axis=0) == 1]))(
                cp.Variable((4, 4))
            ),
            lambda: (lambda X: declare(X, [cp.sum(X, axis=0) == 1, 2 * cp.sum(X, axis=1) == 2]))(
                cp.Variable((4, 4), nonneg=True)
            ),
            lambda: (lambda X: declare(X, [X.T >= 0, cp.sum(X.T, axis=0) == 1, cp.sum(X.T[:, ::-1], axis=1) == 1]))(
                cp.Variable((4, 4))
            ),
            flattened,
            permuted,
            combined,
        ],
        "permutation",
        "Permutation(n=4)",
    )


CASES = {
    name: case
    for case in (_simplex(), _hypercube(), _ksubset(), _product_simplex(), _permutation())
    for name in [case[1]]
}


@pytest.mark.parametrize(
    "family,i",
    [(name, i) for name in CASES for i in range(len(CASES[name][0]))],
    ids=[f"{name}-{i}" for name in CASES for i in range(len(CASES[name][0]))],
)
def test_equivalent_declarations_are_recognized(family, i):
    builders, expected_family, expected_name = CASES[family]
    P = builders[i]()
    assert P.recognized is not None, f"declaration {i} of {family} not recognized"
    assert P.recognized.family == expected_family
    names = expected_name if isinstance(expected_name, tuple) else (expected_name,)
    assert P.recognized.polytope.name in names
    assert "recognized as" in repr(P)
    # the mapped vertex list is the family's, and every mapped vertex satisfies the declaration
    form = P.linear_form()
    V = P.vertices
    assert V is not None and V.shape[1:] == P.event_shape
    assert float(form.residuals(V.reshape(V.shape[0], -1)).max()) <= 1e-12


def _near_misses():
    x = v(6)
    X = cp.Variable((3, 3))
    Y = cp.Variable((3, 4))
    return {
        # simplex
        "simplex: extra row": lambda: declare(x, [x >= 0, cp.sum(x) == 1, x[0] <= 0.5]),
        "simplex: changed right-hand side": lambda: declare(x, [x >= 0, x <= 1, cp.sum(x) == 1.5]),
        "simplex: missing bound": lambda: declare(x, [x[1:] >= 0, x[0] >= -1, cp.sum(x) == 1]),
        "simplex: auxiliary variables": lambda: (lambda w: declare(x, [x == w, w >= 0, cp.sum(w) == 1]))(v(6)),
        # hypercube
        "hypercube: box 0..2": lambda: declare(x, [x >= 0, x <= 2]),
        "hypercube: extra row": lambda: declare(x, [x >= 0, x <= 1, x[0] + x[1] <= 1]),
        "hypercube: changed right-hand side": lambda: declare(x, [x >= 0, x <= 1, x[0] <= 0.5]),
        "hypercube: missing bound": lambda: declare(x, [x >= 0, x[1:] <= 1, x[0] <= x[1]]),
        # k-subsets
        "ksubset: extra row": lambda: declare(x, [x >= 0, x <= 1, cp.sum(x) == 3, x[0] + x[1] <= 1]),
        "ksubset: changed right-hand side": lambda: declare(x, [x >= 0, x <= 1, cp.sum(x) == 2.5]),
        "ksubset: missing bound": lambda: declare(x, [x >= 0, x[:-1] <= 1, x[-1] <= 2, cp.sum(x) == 3]),
        "ksubset: box 0..2": lambda: declare(x, [x >= 0, x <= 2, cp.sum(x) == 3]),
        # products of simplices
        "product_simplex: extra row": lambda: declare(Y, [Y >= 0, cp.sum(Y, axis=1) == 1, Y[0, 0] + Y[1, 0] <= 1]),
        "product_simplex: changed right-hand side": lambda: declare(
            Y, [Y >= 0, cp.sum(Y[:2], axis=1) == 1, cp.sum(Y[2]) == 2]
        ),
        "product_simplex: missing bound": lambda: declare(
            Y, [Y[1:] >= 0, Y[0, 1:] >= 0, Y[0, 0] >= -1, cp.sum(Y, axis=1) == 1]
        ),
        "product_simplex: overlapping groups": lambda: declare(x, [x >= 0, cp.sum(x[:4]) == 1, cp.sum(x[2:]) == 1]),
        # Birkhoff
        "permutation: extra row": lambda: declare(
            X, [X >= 0, cp.sum(X, axis=0) == 1, cp.sum(X, axis=1) == 1, X[0, 0] + X[1, 1] <= 1]
        ),
        "permutation: changed right-hand side": lambda: declare(
            X, [X >= 0, cp.sum(X, axis=0) == 2, cp.sum(X, axis=1) == 2]
        ),
        "permutation: missing bound": lambda: declare(
            X, [X[1:] >= 0, X[0, 1:] >= 0, X[0, 0] >= -1, cp.sum(X, axis=0) == 1, cp.sum(X, axis=1) == 1]
        ),
        "permutation: box 0..2, a row sum missing": lambda: declare(
            X, [X >= 0, X <= 2, cp.sum(X, axis=0) == 1, cp.sum(X[0]) == 1]
        ),
    }


NEAR_MISSES = _near_misses()


@pytest.mark.parametrize("name", list(NEAR_MISSES))
def test_near_misses_are_not_recognized(name):
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no recognizer may fail on them either
        P = NEAR_MISSES[name]()
    assert P.recognized is None, f"{name}: recognized as {P.recognized}"
    assert "recognized" not in repr(P)
    assert sstcvx.relaxation_solver(P, "euclidean")[1] in ("fast", "generic")  # the declared path, on either backend


def test_a_redundant_upper_bound_keeps_the_simplex():
    # exactness is about the set: 0 <= x <= 2 with sum x = 1 is the simplex (the bound never binds)
    x = v(6)
    P = declare(x, [x >= 0, x <= 2, cp.sum(x) == 1])
    assert P.recognized is not None and P.recognized.polytope.name == "Simplex(n=6)"


def test_the_certificate_names_what_fails():
    x = v(5)
    form = declare(
        x,
        [x >= 0, x <= 1, cp.sum(x) == 2],
    ).linear_form()
    assert mismatch(form, KSubset(5, 2), range(5)) is None
    assert "bound" in mismatch(form, Simplex(5), range(5)) or "equalit" in mismatch(form, Simplex(5), range(5))
    assert "cuts" in mismatch(form, KSubset(5, 3), range(5)) or "imply" in mismatch(form, KSubset(5, 3), range(5))
    assert "permutation" in mismatch(form, KSubset(5, 2), [0, 0, 1, 2, 3])
    assert "coordinates" in mismatch(form, KSubset(6, 2), range(6))
    assert "upper bound" in mismatch(declare(x, [x >= 0, cp.sum(x) == 2]).linear_form(), KSubset(5, 2), range(5))


# ----------------------------------------------------------------------------------------------
# routing: the family's solvers, through the coordinate map
# ----------------------------------------------------------------------------------------------

# (family, builder index with permuted coordinates, regularizers, tau)
ROUTED = [
    ("simplex", 5, ("entropy", "euclidean", "exp_family_entropy")),
    ("hypercube", 5, ("binary_entropy", "euclidean", "exp_family_entropy")),
    ("ksubset", 4, ("binary_entropy", "euclidean", "exp_family_entropy")),
    ("product_simplex", 4, ("entropy", "euclidean", "exp_family_entropy")),
    ("permutation", 4, ("entropy", "euclidean")),
]


@pytest.mark.parametrize("family,i,regularizers", ROUTED, ids=[r[0] for r in ROUTED])
def test_recognized_declaration_uses_the_family_solvers(family, i, regularizers):
    P = CASES[family][0][i]()
    rec = P.recognized
    Q = rec.polytope
    shape = tuple(P.event_shape)
    U = 2 * torch.randn((3,) + shape, dtype=torch.float64)
    G = torch.randn((3,) + shape, dtype=torch.float64)
    V = P.vertices.reshape(P.vertices.shape[0], -1)
    for reg in regularizers:
        assert sstcvx.relaxation_solver(P, reg)[1] == "specialized"
        assert sstcvx.relaxation_solver(P, reg, solver="generic")[1] in (
            "fast",
            "generic",
        )  # the declared path, on either backend
        # the family's solver on the mapped utilities, mapped back (same ops: equal to rounding)
        Ur = U.clone().requires_grad_(True)
        X = sstcvx.relax(P, Ur, 0.7, reg)
        (vjp,) = torch.autograd.grad((X * G).sum(), Ur)
        Uf = rec.to_family(U).clone().requires_grad_(True)
        Xf = sstcvx.relax(Q, Uf, 0.7, reg, solver="specialized")
        (vjp_f,) = torch.autograd.grad((Xf * rec.to_family(G)).sum(), Uf)
        torch.testing.assert_close(X, rec.from_family(Xf.detach()), atol=1e-14, rtol=0)
        torch.testing.assert_close(vjp, rec.from_family(vjp_f), atol=1e-14, rtol=0)
        if reg == "exp_family_entropy":  # brute force: the Gibbs marginals over the mapped vertex list
            expected = (torch.softmax(U.reshape(3, -1) / 0.7 @ V.T, -1) @ V).reshape(U.shape)
            torch.testing.assert_close(X.detach(), expected, atol=1e-12, rtol=0)
        else:  # the declared generic path on the same utilities, value and VJP
            Ug = U[:2].clone().requires_grad_(True)
            Xg = sstcvx.relax(P, Ug, 0.7, reg, solver="generic")
            (vjp_g,) = torch.autograd.grad((Xg * G[:2]).sum(), Ug)
            torch.testing.assert_close(X[:2].detach(), Xg.detach(), atol=2e-5, rtol=0)
            torch.testing.assert_close(vjp[:2], vjp_g, atol=5e-4, rtol=0)
    # hard samples: the family's argmax mapped back = brute force over the vertex list = generic LP
    hard = sstcvx.argmax(P, U)
    torch.testing.assert_close(hard, rec.from_family(sstcvx.argmax(Q, rec.to_family(U))), atol=0, rtol=0)
    torch.testing.assert_close(hard.reshape(3, -1), V[(U.reshape(3, -1) @ V.T).argmax(-1)], atol=0, rtol=0)
    torch.testing.assert_close(sstcvx.argmax(P, U[:2], solver="generic"), hard[:2], atol=0, rtol=0)
    # straight-through samples run on the family's solvers too
    S = sstcvx.sample(P, U, 0.5, regularizers[0], mode="straight_through", generator=torch.Generator().manual_seed(1))
    assert S.shape == U.shape


def test_recognize_false_keeps_the_declared_path():
    x = v(8)
    P = sstcvx.Polytope.from_cvxpy(x, [x >= 0, x <= 1, cp.sum(x) == 3], recognize=False)
    assert P.recognized is None and "recognized" not in repr(P)
    assert sstcvx.relaxation_solver(P, "binary_entropy")[1] in (
        "fast",
        "generic",
    )  # the declared path, on either backend
    assert sstcvx.registry.find_argmax(P) is None and P.vertices is None
    with pytest.raises(ValueError, match="specialized"):
        sstcvx.relax(P, torch.zeros(8, dtype=torch.float64), 1.0, "binary_entropy", solver="specialized")
    with pytest.raises(TypeError, match="recognize"):
        sstcvx.Polytope.from_cvxpy(x, [x >= 0, x <= 1], recognize="yes")


def test_an_instance_solver_overrides_the_family_and_specialized_lists_both():
    x = v(5)
    P = declare(x, [x >= 0, cp.sum(x) == 1])
    assert {"entropy", "euclidean", "exp_family_entropy"} <= set(sstcvx.registry.specialized_regularizers(P))
    sstcvx.register_relaxation(P, "entropy")(lambda P, Z: torch.full_like(Z, 0.2))
    assert torch.equal(sstcvx.relax(P, torch.zeros(5), 1.0, "entropy"), torch.full((5,), 0.2))


def test_device_dtype_and_batch_shape_are_kept():
    X = cp.Variable((4, 3))
    P = declare(X, [X >= 0, cp.sum(X, axis=0) == 1])  # groups are columns: a permutation
    U = torch.randn(2, 5, 4, 3, dtype=torch.float32)
    for reg in ("entropy", "euclidean"):
        out = sstcvx.relax(P, U, 0.5, reg)
        assert out.shape == U.shape and out.dtype == torch.float32
        torch.testing.assert_close(out.sum(-2), torch.ones(2, 5, 3), atol=1e-5, rtol=0)
    hard = sstcvx.argmax(P, U)
    assert torch.equal(hard, torch.nn.functional.one_hot(U.argmax(-2), 4).transpose(-1, -2).to(U.dtype))


# ----------------------------------------------------------------------------------------------
# families declare their own recognizers
# ----------------------------------------------------------------------------------------------


class AtMostOne(sstcvx.Polytope):
    """conv{0, e_1, ..., e_n} = {x >= 0, sum x <= 1}: a toy family for the registry test."""

    def __init__(self, n):
        super().__init__((n,), name=f"AtMostOne(n={n})")
        self.n = n

    def _declare(self):
        x = cp.Variable(self.n)
        return x, [x >= 0, cp.sum(x) <= 1]

    def _enumerate_vertices(self):
        return torch.cat([torch.zeros(1, self.n), torch.eye(self.n)]).double()


@pytest.fixture
def toy_family():
    registered = []

    def add(recognize):
        family = family_registry.Family(
            name=f"toy_{len(registered)}",
            make=lambda n, k: AtMostOne(n),
            regularizers=("euclidean",),
            n=4,
            sizes=(4,),
            quick_sizes=(4,),
            max_generic_n=4,
            device_check_n=4,
            quick_device_check_n=4,
            recognize=recognize,
        )
        family_registry.register_family(family)
        registered.append(family.name)

    yield add
    for name in registered:
        family_registry._FAMILIES.pop(name, None)


def test_a_new_family_is_recognized_through_its_registration(toy_family):
    def recognize_at_most_one(form):
        if form.m_eq or form.m_in != 1 or not bool((form.G[0] == 1).all()):
            return None
        return Match(AtMostOne(form.n), range(form.n))

    toy_family(recognize_at_most_one)
    x = v(5)
    for constraints in ([x >= 0, cp.sum(x) <= 1], [-x <= 0, 4 * cp.sum(x) <= 4, x <= 1]):
        P = declare(x, constraints)
        assert P.recognized is not None and P.recognized.family.startswith("toy_")
        # its vertex list (no registered argmax) is the LP oracle and the brute-force relaxation
        U = torch.randn(4, 5, dtype=torch.float64)
        Vq = P.vertices
        torch.testing.assert_close(sstcvx.argmax(P, U), Vq[(U @ Vq.T).argmax(-1)])
    assert declare(x, [x >= 0, cp.sum(x) <= 2]).recognized is None  # the right-hand side differs


def test_a_wrong_or_broken_recognizer_cannot_cause_a_false_match(toy_family):
    toy_family(lambda form: Match(AtMostOne(form.n), range(form.n)))  # proposes itself for everything
    x = v(4)
    assert declare(x, [x >= 0, x <= 2]).recognized is None  # certified false

    def broken(form):
        raise RuntimeError("boom")

    toy_family(broken)
    with pytest.warns(RuntimeWarning, match="boom"):
        P = declare(x, [x >= 0, cp.sum(x) <= 2])
    assert P.recognized is None
    assert declare(x, [x >= 0, x <= 1]).recognized.family == "hypercube"  # the others still work


def test_non_linear_declarations_are_not_recognized():
    x = v(3)
    P = declare(x, [cp.norm(x, 2) <= 1])
    assert P.recognized is None and recognize(P) is None


def test_the_core_does_not_import_the_families():
    import inspect

    import sstcvx.recognition

    source = inspect.getsource(sstcvx.recognition)
    assert "import polytopes" not in source and "from polytopes" not in source


def test_an_implied_row_sum_keeps_the_birkhoff_polytope():
    # with every column sum and all but one row sum, the last row sum is implied: still Birkhoff
    X = cp.Variable((3, 3))
    P = declare(X, [X >= 0, cp.sum(X, axis=0) == 1, cp.sum(X[:2], axis=1) == 1])
    assert P.recognized is not None and P.recognized.polytope.name == "Permutation(n=3)"


def test_compare_command_on_a_recognized_declaration(tmp_path, capsys):
    from sstcvx.harness.cli import main

    path = tmp_path / "declared.py"
    path.write_text(
        "import cvxpy as cp\nimport sstcvx\n\n"
        "def make(n=5):\n"
        "    x = cp.Variable(n)\n"
        "    return sstcvx.Polytope.from_cvxpy(x, [x >= 0, x <= 1, cp.sum(x) == 2], name='declared')\n"
    )
    assert main(["compare", f"{path}:make", "--batch", "2", "--repeats", "0", "--fail-above", "1e-4"]) == 0
    out = capsys.readouterr().out
    assert "recognized as KSubset(n=5, k=2)" in out
    # the family's regularizers, each compared with the declared generic path through the family's solver
    for reg in ("binary_entropy", "euclidean", "exp_family_entropy"):
        assert any(reg in line and "specialized" in line for line in out.splitlines()), reg
