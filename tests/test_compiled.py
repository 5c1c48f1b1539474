"""The switch between the compiled CPU kernels and the torch implementations (sstcvx/_compiled.py, and
the families' registration in polytopes/_compiled.py)."""

import warnings

import pytest
import torch

import sstcvx
from polytopes import KSubset
from sstcvx import _compiled


def test_cpu_tensors_take_the_kernels_unless_disabled():
    cpu = torch.zeros(2, dtype=torch.float64)
    assert _compiled.enabled_for(cpu)
    with _compiled.disabled():
        assert not _compiled.enabled_for(cpu)
    assert _compiled.enabled_for(cpu)
    assert not _compiled.enabled_for(torch.zeros(2, device="meta"))


def test_unavailable_kernels_warn_once_and_leave_the_torch_path(monkeypatch):
    """A kernel module that cannot be imported (as where numba has no writable cache folder) turns
    the compiled path off with one warning; the results are the torch implementation's."""
    P = KSubset(45, 9)
    U = torch.randn(16, 45, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with _compiled.disabled():
        expected = sstcvx.relax(P, U, 1.0, "exp_family_entropy")
    monkeypatch.setattr(_compiled, "KERNEL_MODULES", [*_compiled.KERNEL_MODULES, "polytopes._compiled_no_such_module"])
    monkeypatch.setattr(_compiled, "_available", None)
    with pytest.warns(RuntimeWarning, match="compiled CPU kernels are unavailable"):
        assert not _compiled.enabled_for(U)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: no second warning
        X = sstcvx.relax(P, U, 1.0, "exp_family_entropy")
    torch.testing.assert_close(X, expected, rtol=0, atol=0)


def test_the_families_kernel_modules_are_registered_with_the_core_switch():
    import polytopes._compiled as families

    assert families.enabled_for is _compiled.enabled_for and families.disabled is _compiled.disabled
    for name in ("gibbs", "sinkhorn", "birkhoff"):
        assert f"polytopes._compiled_{name}" in _compiled.KERNEL_MODULES
    assert "sstcvx.generic._compiled_interior_point" in _compiled.KERNEL_MODULES
