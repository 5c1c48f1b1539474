"""The fast generic solver against the cvxpylayers path and the specialized solvers, on declared polytopes.

    python benchmarks/generic_fast.py [--quick] [--threads T] [--wall]
    python benchmarks/generic_fast.py --moreau [--quick]   # needs the `moreau` extra
    python benchmarks/generic_fast.py --only "subsets,birkhoff" [--moreau] [--quick]

``--only A,B``: only the cases whose "polytope regularizer" contains one of the substrings
(and no scale case).  ``--moreau`` also prints how far Moreau's points are outside P (the
largest violation of a bound or row of the linear form): a time is only a comparison where that
is near 0.

For each declared polytope and regularizer: forward + backward time per instance at batch
``B`` (256; 64 with --quick) of the fast torch solver, of cvxpylayers/diffcp (timed on a
smaller batch, since it solves element by element) and of the specialized solver where one
exists, interleaved in one process; the ratios; and the largest differences of X_tau and of
a vector-Jacobian product.  Then the scale case: 1,000 variables and 100 inequality rows at
batch 64 (time, Newton steps, peak resident memory).  Timings are process CPU time on a
shared machine: read the ratios, not the absolute figures.
"""

from __future__ import annotations

import resource
import sys
import warnings
from pathlib import Path

import cvxpy as cp
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _timing import benchmark_arguments, fmt, interleaved

import sstcvx
from polytopes import KSubset, Permutation
from polytopes.spanning_tree import spanning_trees_by_flows
from sstcvx.generic import fast_relaxation


def declared_ksubset(n, k):
    x = cp.Variable(n)
    return sstcvx.Polytope.from_cvxpy(
        x, [x >= 0, x <= 1, cp.sum(x) == k], name=f"{k}-subsets({n})", recognize=False
    ), KSubset(n, k)


def one_per_group(groups, size):
    x = cp.Variable((groups, size))
    P = sstcvx.Polytope.from_cvxpy(
        x, [x >= 0, cp.sum(x, axis=1) == 1], name=f"one-per-group({groups}x{size})", recognize=False
    )
    Q = sstcvx.Polytope.from_cvxpy(
        x, [x >= 0, cp.sum(x, axis=1) == 1], name="one-per-group (registered softmax)", recognize=False
    )
    sstcvx.register_relaxation(Q, "entropy")(lambda _P, Z: torch.softmax(Z, -1))
    return P, Q


def path_independent_sets(n):
    x = cp.Variable(n)
    return sstcvx.Polytope.from_cvxpy(
        x, [x >= 0, x <= 1, x[:-1] + x[1:] <= 1], name=f"independent-sets(path {n})", recognize=False
    )


def declared_birkhoff(n):
    M = cp.Variable((n, n))
    cons = [M >= 0, cp.sum(M, axis=0) == 1, cp.sum(M, axis=1) == 1]
    return sstcvx.Polytope.from_cvxpy(M, cons, name=f"birkhoff({n})", recognize=False), Permutation(n)


def cases():
    P, S = declared_ksubset(20, 5)
    yield P, "binary_entropy", S
    yield P, "euclidean", S
    P, S = one_per_group(3, 4)
    yield P, "entropy", S
    for n in (6, 30):
        P = path_independent_sets(n)
        yield P, "euclidean", None
        yield P, "binary_entropy", None
    P, S = declared_birkhoff(5)
    yield P, "entropy", S
    yield spanning_trees_by_flows(4, name="spanning-trees(K4, flows)"), "binary_entropy", None


def forward_backward(P, U, G, reg, solver):
    U = U.detach().requires_grad_(True)
    X = sstcvx.relax(P, U, 1.0, reg, solver=solver)
    (g,) = torch.autograd.grad((X * G).sum(), U)
    return X.detach(), g


_MOREAU = {}


def moreau_forward_backward(P, U, G, reg):
    """Moreau through cvxpylayers (backend "MOREAU", its default settings), built once per case."""
    from cvxpylayers.torch import CvxpyLayer

    key = (id(P), reg)
    if key not in _MOREAU:
        x, constraints = P.cvxpy_declaration()
        u = cp.Parameter(x.shape)
        f = sstcvx.regularizers.get_regularizer(reg).cvxpy(x)
        problem = cp.Problem(cp.Maximize(cp.sum(cp.multiply(u, x)) - f), constraints)
        _MOREAU[key] = CvxpyLayer(problem, parameters=[u], variables=[x], solver="MOREAU")
    U = U.detach().requires_grad_(True)
    (X,) = _MOREAU[key](U)
    (g,) = torch.autograd.grad((X * G).sum(), U)
    return X.detach(), g


def moreau_main(args):
    B = 64 if args.quick else 256
    torch.manual_seed(0)
    print(f"forward+backward per instance at batch {B}: the fast solver against Moreau 0.4.1 through cvxpylayers (CPU)")
    print(
        f"{'polytope':<30} {'regularizer':<15} | {'fast':>11} | {'moreau':>11} | {'moreau/fast':>11} | {'|dX|':>8} | "
        f"{'Moreau off P by':>15}"
    )
    for P, reg, _S in cases():
        if not selected(P, reg):
            continue
        U = torch.randn(B, *P.event_shape, dtype=torch.float64)
        G = torch.randn(B, *P.event_shape, dtype=torch.float64)
        times = interleaved(
            {
                "fast": lambda: forward_backward(P, U, G, reg, "fast"),
                "moreau": lambda: moreau_forward_backward(P, U, G, reg),
            },
            rounds=3,
            warmup=1,
        )
        X, _ = forward_backward(P, U, G, reg, "fast")
        Xm, _ = moreau_forward_backward(P, U, G, reg)
        print(
            f"{P.name:<30} {reg:<15} | {fmt(times['fast'] / B)} | {fmt(times['moreau'] / B)} | "
            f"{times['moreau'] / times['fast']:11.1f} | {float((X - Xm).abs().max()):8.1e} | "
            f"{infeasibility(P, Xm):>15}",
            flush=True,
        )


def infeasibility(P, X) -> str:
    """How far the points ``X (B, *event_shape)`` are outside P: the largest violation of a bound or row
    of its linear form (declarations without auxiliary variables; '-' otherwise)."""
    form = P.linear_form()
    if form.n_aux:
        return "-"
    x = X.reshape(X.shape[0], -1).double()
    worst = torch.cat(
        [
            (form.lower - x).clamp_min(0).amax(-1, keepdim=True),
            (x - form.upper).clamp_min(0).amax(-1, keepdim=True),
            (x @ form.G.T - form.h).clamp_min(0).amax(-1, keepdim=True) if form.m_in else x.new_zeros(x.shape[0], 1),
            (x @ form.A.T - form.b).abs().amax(-1, keepdim=True) if form.m_eq else x.new_zeros(x.shape[0], 1),
        ],
        1,
    )
    return f"{float(worst.max()):.1e}"


_ONLY: list[str] = []


def selected(P, reg):
    """Whether ``--only`` keeps the case (polytope ``P``, regularizer ``reg``)."""
    return not _ONLY or any(key in f"{P.name} {reg}" for key in _ONLY)


def main(argv=None):
    def options(parser):
        parser.add_argument(
            "--only",
            metavar="A,B",
            default="",
            help="only the cases whose 'polytope regularizer' contains one of these",
        )
        parser.add_argument(
            "--moreau", action="store_true", help="the fast solver against Moreau (needs the moreau extra)"
        )

    args = benchmark_arguments(__doc__, "batch 64 and fewer rounds", argv, options)
    _ONLY[:] = [key for key in args.only.split(",") if key]
    if args.moreau:
        return moreau_main(args)
    B = 64 if args.quick else 256
    B_conic = 8 if args.quick else 16
    rounds = 3 if args.quick else 5
    torch.manual_seed(0)
    warnings.simplefilter("ignore", RuntimeWarning)
    print(f"forward+backward per instance; fast and specialized at batch {B}, cvxpylayers at batch {B_conic}")
    head = f"{'polytope':<30} {'regularizer':<15} | {'fast':>11} | {'cvxpylayers':>11} | {'specialized':>11} | {'cvx/fast':>8} | {'fast/spec':>9} | {'|dX| cvx':>8} | {'|dX| spec':>9} | {'|dVJP| spec':>11}"
    print(head)
    for P, reg, S in cases():
        if not selected(P, reg):
            continue
        U = torch.randn(B, *P.event_shape, dtype=torch.float64)
        G = torch.randn(B, *P.event_shape, dtype=torch.float64)
        fns = {
            "fast": lambda: forward_backward(P, U, G, reg, "fast"),
            "cvx": lambda: forward_backward(P, U[:B_conic], G[:B_conic], reg, "cvxpylayers"),
        }
        if S is not None:
            fns["spec"] = lambda: forward_backward(S, U, G, reg, "specialized")
        times = interleaved(fns, rounds=rounds, warmup=1)
        per = {"fast": times["fast"] / B, "cvx": times["cvx"] / B_conic, "spec": times.get("spec", float("nan")) / B}
        X, g = forward_backward(P, U, G, reg, "fast")
        Xc, _ = forward_backward(P, U[:B_conic], G[:B_conic], reg, "cvxpylayers")
        d_cvx = float((X[:B_conic] - Xc).abs().max())
        d_spec = d_vjp = float("nan")
        if S is not None:
            Xs, gs = forward_backward(S, U, G, reg, "specialized")
            d_spec, d_vjp = float((X - Xs).abs().max()), float((g - gs).abs().max())
        status = fast_relaxation(P, sstcvx.regularizers.get_regularizer(reg)).solve(U)
        fails = int((status.status != 0).sum())
        print(
            f"{P.name:<30} {reg:<15} | {fmt(per['fast'])} | {fmt(per['cvx'])} | "
            f"{fmt(per['spec']) if S is not None else '          -'} | {per['cvx'] / per['fast']:8.1f} | "
            f"{per['fast'] / per['spec'] if S is not None else float('nan'):9.2f} | {d_cvx:8.1e} | {d_spec:9.1e} | {d_vjp:11.1e}"
            + (f"  ({fails} of {B} to the conic fallback)" if fails else ""),
            flush=True,
        )
    if not _ONLY:
        scale_case(args)


def scale_case(args):
    """1,000 variables in [0, 1] and 100 packing rows (each over 30 random coordinates, at most 5 of them)."""
    torch.manual_seed(1)
    n, m, B = 1000, 100, 64
    G = torch.zeros(m, n)
    for i in range(m):
        G[i, torch.randperm(n)[:30]] = 1.0
    x = cp.Variable(n)
    P = sstcvx.Polytope.from_cvxpy(
        x, [x >= 0, x <= 1, G.numpy() @ x <= 5], name=f"packing({n} vars, {m} rows)", recognize=False
    )
    for reg in ("binary_entropy", "euclidean"):
        F = fast_relaxation(P, sstcvx.regularizers.get_regularizer(reg))
        U = 2 * torch.randn(B, n, dtype=torch.float64)
        W = torch.randn(B, n, dtype=torch.float64)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        times = interleaved({"fast": lambda: forward_backward(P, U, W, reg, "fast")}, rounds=1, warmup=1)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        sol = F.solve(U)
        print(
            f"scale: {P.name} {reg:<15} batch {B}: {fmt(times['fast'])} per batch ({fmt(times['fast'] / B)} per instance), "
            f"Newton steps median {int(sol.iterations.median())} max {int(sol.iterations.max())}, "
            f"converged {int((sol.status == 0).sum())}/{B}, peak RSS growth {(after - before) / 1024:.0f} MiB",
            flush=True,
        )


if __name__ == "__main__":
    main()
