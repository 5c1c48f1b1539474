"""benchmarks/device_check.py, the one-command accelerator check, runs and catches a solver that loses the dtype."""

import importlib.util
from pathlib import Path

import torch

import sstcvx
from polytopes import Simplex

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "device_check.py"


def load():
    spec = importlib.util.spec_from_file_location("device_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_run_on_the_cpu_passes(capsys):
    assert load().main(["--quick", "--batch", "4", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "0 failure(s)" in out and "FAIL" not in out and "SpanningTree(n=6)" in out


def test_a_solver_that_returns_the_wrong_dtype_fails(monkeypatch, capsys):
    key = (Simplex, "entropy")
    monkeypatch.setitem(sstcvx.registry._RELAXATIONS, key, lambda P, Z: torch.softmax(Z.double(), -1))
    assert load().main(["--quick", "--batch", "4", "--device", "cpu"]) == 1
    assert "FAIL Simplex(n=10)                entropy" in capsys.readouterr().out
