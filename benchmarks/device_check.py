"""Every specialized solver on an accelerator against the same solver on the CPU, in one short run.

    python benchmarks/device_check.py [--device cuda] [--batch 256] [--quick]

For each registered family (:mod:`sstcvx.families`) at its ``device_check_n``, for each specialized
relaxation (and the hard argmax), on one batch of utilities in float64 and float32:

* the relaxed sample X_tau and its vector-Jacobian product with one cotangent are computed
  on ``--device`` and on the CPU, and their largest difference is printed (float64 must
  agree to 1e-9, float32 to 1e-3 relative to the float64 CPU result);
* the result keeps the input's device and dtype;
* forward + backward time per call on the device (synchronized) and on the CPU.

The fast generic solver is checked the same way on a few polytopes declared with CVXPY: Newton
on the dual (equality rows) and the interior-point method (inequality rows, a user-defined
separable regularizer, and a path of 30 whose normal matrix takes the level-scheduled sparse
factorization).
The hard argmax must be identical on both.  Exit status 1 if any check fails, so that a
session lent an accelerator can run it as one command.  An argmax that a family computes on
the CPU by design is checked for agreement and the output device like the others.
With ``--device cpu`` (the default when no accelerator is present) both sides are the
CPU: a smoke run of the script itself.
"""

from __future__ import annotations

import argparse
import math
import sys

import torch

import sstcvx
from sstcvx.families import families
from sstcvx.harness.timing import synchronized_median

TAU = 0.5


def relax_and_vjp(P, U, G, regularizer, solver="specialized"):
    u = U.detach().clone().requires_grad_(True)
    X = sstcvx.relax(P, u, TAU, regularizer, solver=solver)
    (grad,) = torch.autograd.grad((X * G).sum(), u)
    return X.detach(), grad


def check_case(P, regularizer, batch, device, generator, solver="specialized") -> tuple[bool, str]:
    shape = (batch,) + tuple(P.event_shape)
    U64 = torch.randn(shape, dtype=torch.float64, generator=generator)
    G64 = torch.randn(shape, dtype=torch.float64, generator=generator)
    X_ref, g_ref = relax_and_vjp(P, U64, G64, regularizer, solver)
    scale = max(1.0, float(g_ref.abs().max()))
    ok, parts = True, []
    for dtype, tol in ((torch.float64, 1e-9), (torch.float32, 1e-3)):
        U, G = U64.to(device=device, dtype=dtype), G64.to(device=device, dtype=dtype)
        X, g = relax_and_vjp(P, U, G, regularizer, solver)
        same_place = X.device == U.device and X.dtype == dtype and g.device == U.device
        dx = float((X.double().cpu() - X_ref).abs().max())
        dg = float((g.double().cpu() - g_ref).abs().max()) / scale
        good = same_place and dx <= tol and dg <= tol and bool(torch.isfinite(X).all())
        ok &= good
        parts.append(
            f"{str(dtype)[6:]}: |dX| {dx:.1e} |dVJP|/max {dg:.1e}{'' if same_place else ' WRONG DEVICE/DTYPE'}"
        )
    U, G = U64.to(device), G64.to(device)
    t_dev = synchronized_median(lambda: relax_and_vjp(P, U, G, regularizer, solver), device)
    t_cpu = synchronized_median(lambda: relax_and_vjp(P, U64, G64, regularizer, solver), torch.device("cpu"))
    parts.append(f"fwd+bwd {t_dev * 1e3:8.2f} ms on {device.type}, {t_cpu * 1e3:8.2f} ms on cpu")
    return ok, "   ".join(parts)


def check_argmax(P, batch, device, generator) -> tuple[bool, str]:
    U = torch.randn((batch,) + tuple(P.event_shape), dtype=torch.float64, generator=generator)
    X_ref = sstcvx.argmax(P, U, solver="specialized")
    X = sstcvx.argmax(P, U.to(device), solver="specialized")
    ok = X.device == U.to(device).device and torch.equal(X.cpu(), X_ref)
    t_dev = synchronized_median(lambda: sstcvx.argmax(P, U.to(device), solver="specialized"), device)
    return (
        ok,
        f"identical to cpu: {torch.equal(X.cpu(), X_ref)}, device kept: {X.device == U.to(device).device}   {t_dev * 1e3:8.2f} ms",
    )


def declared_cases():
    """Polytopes declared with CVXPY, served by the fast generic solver."""
    import cvxpy as cp

    x = cp.Variable(20)
    ksub = sstcvx.Polytope.from_cvxpy(
        x, [x >= 0, x <= 1, cp.sum(x) == 5], name="declared 5-subsets(20)", recognize=False
    )
    M = cp.Variable((5, 5))
    birkhoff = sstcvx.Polytope.from_cvxpy(
        M, [M >= 0, cp.sum(M, axis=0) == 1, cp.sum(M, axis=1) == 1], name="declared birkhoff(5)", recognize=False
    )
    y = cp.Variable(6)
    path = sstcvx.Polytope.from_cvxpy(
        y, [y >= 0, y <= 1, y[:-1] + y[1:] <= 1], name="independent sets(path 6)", recognize=False
    )
    z = cp.Variable(30)
    long_path = sstcvx.Polytope.from_cvxpy(
        z, [z >= 0, z <= 1, z[:-1] + z[1:] <= 1], name="independent sets(path 30)", recognize=False
    )
    tsallis = sstcvx.Regularizer.separable(_tsallis, domain=(0.0, math.inf), name="tsallis_1.5")
    return [
        (ksub, "binary_entropy"),
        (ksub, "euclidean"),
        (birkhoff, "entropy"),
        (path, "binary_entropy"),
        (path, "euclidean"),
        (path, tsallis),
        # 29 rows: the level-scheduled sparse factorization of the normal matrix
        (long_path, "binary_entropy"),
        (long_path, "euclidean"),
    ]


def _tsallis(x):
    """The Tsallis 1.5-entropy term of 1.5-entmax, elementwise (a user-defined separable regularizer)."""
    return (x.clamp_min(0) ** 1.5 - x) / 0.75


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", default=default, help=f"the device to check (default {default})")
    parser.add_argument("--batch", type=int, default=256, help="batch size (default 256)")
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(0)
    print(
        f"torch {torch.__version__}, device {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
    )
    failures = 0
    for family in families().values():
        P = family(family.quick_device_check_n if args.quick else family.device_check_n)
        for regularizer in sstcvx.registry.specialized_regularizers(P):
            ok, line = check_case(P, regularizer, args.batch, device, generator)
            failures += not ok
            print(f"{'ok  ' if ok else 'FAIL'} {P.name:<28} {regularizer:<19} {line}")
        ok, line = check_argmax(P, args.batch, device, generator)
        failures += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {P.name:<28} {'argmax':<19} {line}")
    # The fast generic solver on declared polytopes (equality rows, inequality rows, matrix variable).
    for P, regularizer in declared_cases():
        ok, line = check_case(P, regularizer, args.batch, device, generator, solver="fast")
        failures += not ok
        name = regularizer if isinstance(regularizer, str) else regularizer.name
        print(f"{'ok  ' if ok else 'FAIL'} {P.name:<28} {name + ' (fast)':<19} {line}")
    print(f"{failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
