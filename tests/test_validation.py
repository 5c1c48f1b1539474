"""Validation once per public call, and the switch that turns it off (validate_args)."""

import pytest
import torch

import sstcvx
from polytopes import KSubset, Simplex
from sstcvx import validation


@pytest.fixture
def counted(monkeypatch):
    """Count the calls of each check made through the modules that use them."""
    calls = {}

    def counting(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] = calls.get(name, 0) + 1
            return fn(*args, **kwargs)

        return wrapper

    import sstcvx.sampling as sampling

    for name in ("check_polytope", "check_utility", "check_tau", "check_solver", "all_finite"):
        monkeypatch.setattr(sampling, name, counting(name, getattr(validation, name)))
    return calls


@pytest.mark.parametrize("mode", ["relaxed", "hard", "straight_through"])
def test_sample_checks_each_argument_once(counted, mode):
    P = KSubset(6, 2)
    sstcvx.sample(P, torch.randn(4, 6), 0.5, "binary_entropy", mode=mode)
    assert counted.get("check_polytope") == 1
    assert counted.get("check_utility") == 1
    assert counted.get("check_tau", 0) == (0 if mode == "hard" else 1)
    # the solver name is canonicalised once by sample, once more by the relaxation lookup
    assert counted.get("check_solver", 0) <= 2
    # one finiteness test of the input (U / tau; for hard samples theta's, inside check_utility)
    # and one per solver output
    expected = {"relaxed": 2, "hard": 1, "straight_through": 3}[mode]
    assert counted.get("all_finite") == expected


@pytest.mark.parametrize("mode", ["relaxed", "hard", "straight_through"])
def test_no_validation_makes_no_finiteness_test(counted, mode):
    P = Simplex(5)
    X = sstcvx.sample(P, torch.randn(3, 5), 0.5, "entropy", mode=mode, validate_args=False)
    assert X.shape == (3, 5)
    assert counted.get("all_finite", 0) == 0 and counted.get("check_utility", 0) == 0


def test_global_switch_and_per_call_override():
    P = Simplex(4)
    bad = torch.tensor([[0.0, float("nan"), 1.0, 2.0]])
    with pytest.raises(ValueError, match="U: expected finite values"):
        sstcvx.relax(P, bad)
    sstcvx.set_validate_args(False)
    try:
        assert torch.isnan(sstcvx.relax(P, bad)).all()  # not checked: NaN in, NaN out
        with pytest.raises(ValueError, match="U: expected finite values"):
            sstcvx.relax(P, bad, validate_args=True)
    finally:
        sstcvx.set_validate_args(True)
    with pytest.raises(TypeError, match="validate_args"):
        sstcvx.relax(P, torch.zeros(1, 4), validate_args="yes")
    with pytest.raises(TypeError, match="value"):
        sstcvx.set_validate_args(1)


def test_results_do_not_depend_on_validation():
    P = KSubset(7, 3)
    theta = torch.randn(2, 3, 7, dtype=torch.float64)
    for mode in ("relaxed", "hard", "straight_through"):
        on = sstcvx.sample(P, theta, 0.3, "euclidean", mode=mode, generator=torch.Generator().manual_seed(1))
        off = sstcvx.sample(
            P, theta, 0.3, "euclidean", mode=mode, generator=torch.Generator().manual_seed(1), validate_args=False
        )
        assert torch.equal(on, off)


def test_distributions_validate_at_construction_only():
    P = Simplex(4)
    with pytest.raises(ValueError, match="theta"):
        sstcvx.RelaxedStochasticArgmax(P, torch.tensor([0.0, float("inf"), 0.0, 0.0]))
    d = sstcvx.StraightThroughStochasticArgmax(P, torch.zeros(4), tau=torch.tensor(0.5), validate_args=False)
    assert d.rsample((3,)).shape == (3, 4)
