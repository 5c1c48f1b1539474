"""sstcvx.compare: the generic path against specialized solvers, brute force and a second solver."""

import csv
import io
import itertools
import json
import warnings

import cvxpy as cp
import pytest
import torch

import sstcvx
from polytopes.ksubset import KSubset

REQUIRED_KEYS = {"max_abs_diff", "max_abs_grad_diff", "time_generic", "time_specialized", "speedup"}


def k_hot(n, k):
    return torch.tensor([[1.0 if i in c else 0.0 for i in range(n)] for c in itertools.combinations(range(n), k)])


def declared_k_subsets(n, k, name=None):
    x = cp.Variable(n)
    return sstcvx.Polytope.from_cvxpy(
        x, [x >= 0, x <= 1, cp.sum(x) == k], name=name or f"user {k}-of-{n}", recognize=False
    )


@pytest.fixture(scope="module")
def ksubset_report():
    return sstcvx.compare(KSubset(6, 2), ["binary_entropy", "euclidean", "exp_family_entropy"], batch=4, repeats=1)


def test_family_agrees_with_specialized_and_brute_force(ksubset_report):
    report = ksubset_report
    assert [r.regularizer for r in report] == ["binary_entropy", "euclidean", "exp_family_entropy"]
    for r in report:
        assert r.reference == "specialized"
        assert r.failures == 0, r.messages
        assert r.max_abs_diff < 1e-4 and r.mean_abs_diff <= r.max_abs_diff
        assert r.max_abs_grad_diff < 1e-4
        assert r.hard_agreement == 1.0 and r.hard_is_vertex is True
        assert r.batch == r.generic_batch == 4 and r.size == 6
    # exp_family_entropy: the specialized DP and the generic path (a conic problem over the vertex
    # weights) against exact brute force, the worse of the two at the conic solver's tolerance
    assert report[2].brute_force_max_abs_diff < 1e-6
    assert report[0].brute_force_max_abs_diff is None  # no brute force for a CVXPY regularizer here


def test_family_times_and_speedup(ksubset_report):
    for r in ksubset_report:
        for t in (r.time_generic, r.time_generic_backward, r.time_specialized, r.time_reference, r.time_generic_argmax):
            assert t is not None and t > 0
        assert r.time_specialized == r.time_reference
        assert r.speedup == pytest.approx(r.time_generic / r.time_specialized)
    assert ksubset_report[0].build_time_generic > 0


def test_harness_catches_a_wrong_specialized_solver():
    P = declared_k_subsets(5, 2)
    sstcvx.register_relaxation(P, "euclidean")(lambda P, Z: torch.softmax(Z, -1))  # wrong: not the projection
    (row,) = sstcvx.compare(P, "euclidean", batch=3, repeats=0, hard=False)
    assert row.reference == "specialized"
    assert row.max_abs_diff > 0.1


def test_user_polytope_against_brute_force_vertices():
    P = declared_k_subsets(5, 2)
    report = sstcvx.compare(P, ["euclidean", "exp_family_entropy"], batch=3, repeats=0, vertices=k_hot(5, 2))
    euclid, gibbs = report
    assert euclid.reference == "brute_force" and euclid.max_abs_diff < 1e-4 and euclid.failures == 0
    assert euclid.hard_agreement == 1.0 and euclid.hard_is_vertex
    # the generic path cannot compute exp_family_entropy on a declaration without vertices: counted, not raised
    assert gibbs.reference == "brute_force" and gibbs.failures >= 1 and gibbs.max_abs_diff is None
    assert any("exp_family_entropy" in m for m in gibbs.messages)


def test_user_polytope_with_a_wrong_declaration_is_caught_by_brute_force():
    P = declared_k_subsets(5, 2)
    (row,) = sstcvx.compare(P, "euclidean", batch=4, repeats=0, vertices=k_hot(5, 3))  # vertices of another set
    assert row.max_abs_diff > 0.1
    assert row.hard_agreement < 1.0 and row.hard_is_vertex is False


def test_user_polytope_without_vertices_uses_a_second_solver():
    P = declared_k_subsets(5, 2)
    (row,) = sstcvx.compare(P, "entropy", tau=0.5, batch=3, repeats=1, hard=False)
    assert row.reference.startswith("solver:") and row.failures == 0
    assert row.max_abs_diff < 1e-4 and row.time_specialized is None and row.time_reference > 0
    custom = sstcvx.compare(
        P, "entropy", batch=2, repeats=0, hard=False, reference_solver_args={"solve_method": "Clarabel"}
    )
    assert custom[0].reference == "solver:Clarabel"


def test_vertex_polytope_and_user_regularizer():
    P = sstcvx.Polytope.from_vertices(k_hot(4, 2))
    reg = sstcvx.Regularizer.from_cvxpy(lambda x: cp.sum_squares(x), name="my_l2")
    report = sstcvx.compare(P, ["exp_family_entropy", reg], batch=2, repeats=0)
    assert report[0].reference == "specialized" and report[0].max_abs_diff < 1e-6  # enumeration vs the conic solve
    assert report[1].regularizer == "my_l2" and report[1].reference.startswith("solver:")
    assert report[1].max_abs_diff < 1e-4 and report[1].hard_agreement == 1.0


def test_failures_and_warnings_are_counted_not_raised():
    P = declared_k_subsets(4, 2)

    def broken(P, Z):
        raise RuntimeError("boom")

    def noisy(P, Z):
        warnings.warn("tolerance not reached", RuntimeWarning, stacklevel=2)
        return Z.clamp(0, 1)

    sstcvx.register_relaxation(P, "binary_entropy")(broken)
    sstcvx.register_relaxation(P, "euclidean")(noisy)
    failing, warning = sstcvx.compare(P, ["binary_entropy", "euclidean"], batch=2, repeats=0, hard=False)
    assert failing.failures >= 1 and failing.max_abs_diff is None
    assert any("boom" in m for m in failing.messages)
    assert warning.warnings >= 1 and any("tolerance not reached" in m for m in warning.messages)


def test_several_temperatures_and_a_capped_generic_batch():
    report = sstcvx.compare(
        KSubset(5, 2), "euclidean", tau=[0.1, 1.0], batch=5, max_generic_batch=2, repeats=1, hard=False
    )
    assert [r.tau for r in report] == [0.1, 1.0]
    for r in report:
        assert r.batch == 5 and r.generic_batch == 2 and r.max_abs_diff < 1e-4
        assert r.speedup == pytest.approx((r.time_generic / 2) / (r.time_reference / 5))


def test_given_utilities_are_used():
    U = torch.tensor([[3.0, 2.0, -1.0, 0.0]], dtype=torch.float64)
    (row,) = sstcvx.compare(KSubset(4, 2), "euclidean", U=U, tau=0.01, repeats=0)
    assert row.batch == 1 and row.hard_agreement == 1.0 and row.max_abs_diff < 1e-4


def test_json_round_trip_and_keys(ksubset_report, tmp_path):
    text = ksubset_report.to_json()
    data = json.loads(text)
    assert len(data["configurations"]) == 3
    for values in data["configurations"].values():
        assert REQUIRED_KEYS <= set(values)
    assert sstcvx.harness.report.ComparisonReport.from_json(text) == ksubset_report
    path = tmp_path / "report.json"
    ksubset_report.to_json(path)
    assert sstcvx.harness.report.ComparisonReport.from_json(path) == ksubset_report
    twice = ksubset_report + ksubset_report  # repeated configurations keep distinct keys
    assert len(json.loads(twice.to_json())["configurations"]) == 6
    assert sstcvx.harness.report.ComparisonReport.from_json(twice.to_json()) == twice


def test_csv_and_table(ksubset_report, tmp_path):
    rows = list(csv.DictReader(io.StringIO(ksubset_report.to_csv(tmp_path / "r.csv"))))
    assert len(rows) == 3 and REQUIRED_KEYS <= set(rows[0])
    assert float(rows[1]["max_abs_diff"]) == pytest.approx(ksubset_report[1].max_abs_diff)
    assert (tmp_path / "r.csv").read_text().count("\n") == 4
    table = str(ksubset_report)
    assert "KSubset(n=6, k=2)" in table and "max|dX|" in table and "speedup" in table
    assert len((ksubset_report + ksubset_report).rows) == 6


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"tau": 0.0}, "tau"),
        ({"tau": [1.0, -1.0]}, "tau"),
        ({"reference": "oracle"}, "reference"),
        ({"repeats": -1}, "repeats"),
        ({"batch": 0}, "batch"),
        ({"U": torch.zeros(2, 3)}, "U"),
        ({"regularizer": "nonsense"}, "regularizer"),
        ({"regularizer": "entropy", "reference": "brute_force"}, "brute_force"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    P = declared_k_subsets(4, 2)
    kwargs = {"regularizer": "euclidean", **kwargs}
    with pytest.raises(ValueError, match=match):
        sstcvx.compare(P, **kwargs)


def test_specialized_reference_requires_a_solver():
    with pytest.raises(ValueError, match="no specialized solver"):
        sstcvx.compare(declared_k_subsets(4, 2), "euclidean", reference="specialized")
    with pytest.raises(TypeError, match="Polytope"):
        sstcvx.compare("ksubset", "euclidean")
