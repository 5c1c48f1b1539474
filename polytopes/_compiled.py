"""The families' compiled CPU kernels: the switch is the core's (:mod:`sstcvx._compiled`, which says
why and when CPU tensors take compiled kernels); this module registers the families' kernel modules
with it and re-exports what the solvers use.

The k-subset Gibbs marginals (``_compiled_gibbs``), Sinkhorn (``_compiled_sinkhorn``) and the Birkhoff
projection (``_compiled_birkhoff``) each have one, imported by the solver inside the function that takes
the compiled path.
"""

from __future__ import annotations

from sstcvx._compiled import disabled, enabled_for, register_kernel_modules

__all__ = ["disabled", "enabled_for"]

register_kernel_modules(
    f"{__package__}._compiled_gibbs", f"{__package__}._compiled_sinkhorn", f"{__package__}._compiled_birkhoff"
)
