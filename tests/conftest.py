import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def second_failure_is_named(monkeypatch):
    """A check for the fast generic path's failure contract, second half: with the conic fallback made
    to fail too (Clarabel, one iteration), ``relax(P, U, 1, regularizer, solver="fast")`` raises a
    SolverError naming batch element 0 and the solver. The caller has already made the fast solver
    stop short (its ``max_iter`` monkeypatched)."""
    import sstcvx
    from sstcvx import generic

    def check(P, U, regularizer):
        bad = {"solve_method": "Clarabel", "max_iter": 1}
        monkeypatch.setattr(generic.settings, "FALLBACK_SOLVER_ARGS", dict(bad))
        with pytest.raises(sstcvx.SolverError, match="batch element 0 did not converge") as info:
            sstcvx.relax(P, U, 1.0, regularizer, solver="fast", solver_args=bad)
        assert info.value.element == 0 and info.value.solver == "fast"

    return check
