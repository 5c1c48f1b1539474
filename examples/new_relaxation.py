"""Your own relaxation: a new separable regularizer in a few lines of torch, compared with the built-in ones.

A stochastic softmax trick is fixed by the polytope P and the strongly convex regularizer f
of X_tau = argmax_{x in P} <U, x> - tau f(x).  ``sstcvx.Regularizer.separable(phi, domain)``
turns an elementwise torch function phi into f(x) = sum_i phi(x_i): the families whose relaxed
program reduces to one scalar root per element (the simplex, k-subsets, the hypercube) solve
it directly, from phi's derivatives (by autograd) and a batched inverse of phi'.  Given its
CVXPY form too (``cvxpy=``), the same f also runs on the generic cvxpylayers path, which
serves any polytope and is the independent check.  Two new ones are prototyped here on the
k-subset polytope ``polytopes.KSubset``:

* ``tsallis_1.5``: the Tsallis 1.5-entropy, phi(x) = (x^1.5 - x) / 0.75 (the regularizer of
  1.5-entmax on the simplex); like the Euclidean one it reaches the boundary, so X_tau has
  exact zeros and ones;
* ``entropy+euclidean``: phi(x) = 1/2 x log x + 1/4 x^2, a mix of the entropy and 1/2 ||x||^2.

``sstcvx.compare`` runs both paths on the same utilities (agreement and time per instance) and
checks them against the same program stated on the vertex list of P (brute force).  Then the
new relaxations are trained, on both paths, beside the built-in ones: binary entropy,
Euclidean and exponential-family entropy (specialized solvers) and the plain entropy (no
specialized solver on k-subsets, so the generic path).

Task: a linear map from a context c to utilities theta; relaxed k-subsets X_tau of
U = theta + Gumbel noise; squared loss to the k best items under a hidden linear utility.
Reported on held-out contexts: the precision of the hard subset argmax_P <theta, x>,
the fraction of entries of X_tau within 1e-6 of 0 or 1 (exact for the Euclidean and
Tsallis projections; for the entropies only where float32 saturates), the gap
|X_tau - X|_1 / 2k between relaxed and hard samples of the same U, and the time per
instance (forward and backward) of the path that served the regularizer.

Run ``python examples/new_relaxation.py``; ``--tiny`` for a smoke test.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import cvxpy as cp
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common

import polytopes
import sstcvx


def _xlogx(x):
    return torch.where(x > 0, x * torch.log(x.clamp_min(1e-300)), torch.zeros_like(x))


def tsallis_phi(x):
    return (x.clamp_min(0) ** 1.5 - x) / 0.75


def tsallis_cvxpy(x):
    return (cp.sum(cp.power(x, 1.5)) - cp.sum(x)) / 0.75


def mix_phi(x):
    return 0.5 * _xlogx(x) + 0.25 * x * x


def mix_cvxpy(x):
    return 0.5 * -cp.sum(cp.entr(x)) + 0.25 * cp.sum_squares(x)


# functions defined with def at the top level: the regularizers pickle (data-loader workers, torch.save)
TSALLIS = sstcvx.Regularizer.separable(tsallis_phi, domain=(0, math.inf), name="tsallis_1.5", cvxpy=tsallis_cvxpy)
MIX = sstcvx.Regularizer.separable(mix_phi, domain=(0, math.inf), name="entropy+euclidean", cvxpy=mix_cvxpy)
REGULARIZERS = {
    "binary_entropy": "binary_entropy",
    "euclidean": "euclidean",
    "exp_family_entropy": "exp_family_entropy",
    "entropy": "entropy",
    "tsallis_1.5": TSALLIS,
    "entropy+euclidean": MIX,
}
NEW = ("tsallis_1.5", "entropy+euclidean")


def make_data(counts, n: int, k: int, features: int, gen: torch.Generator):
    """Per split size in ``counts``: contexts c ~ N(0, I) and the k-hot set of the k best items."""
    hidden = torch.randn(features, n, generator=gen)
    splits = []
    for count in counts:
        c = torch.randn(count, features, generator=gen)
        splits.append((c, sstcvx.argmax(polytopes.KSubset(n, k), c @ hidden)))
    return splits


def train(P, name: str, data, args, solver: str = "auto"):
    """Fit theta = Linear(c) with the relaxation ``name`` on the path ``solver``; return the model, its losses
    and seconds per instance."""
    gen = _common.seed_everything(args.seed)
    regularizer = REGULARIZERS[name]
    (c, y), _ = data
    model = nn.Linear(c.shape[1], P.n)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    losses, solve_time = [], 0.0
    for _ in _common.progress(range(args.steps), f"{name:>18}", args.quiet):
        idx = torch.randint(len(c), (args.batch_size,), generator=gen)
        theta = model(c[idx])
        start = time.perf_counter()
        X = sstcvx.sample(P, theta, args.tau, regularizer, solver=solver, generator=gen)
        loss = ((X - y[idx]) ** 2).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        solve_time += time.perf_counter() - start
        opt.step()
        losses.append(loss.item())
    return model, losses, solve_time / (args.steps * args.batch_size)


@torch.no_grad()
def evaluate(P, name: str, model, data, args):
    """Held-out precision of the hard subset at theta; boundary fraction and relaxed-hard gap at U = theta + noise."""
    c, y = data[1]
    theta = model(c)
    precision = (sstcvx.argmax(P, theta) * y).sum(-1).mean().item() / P.k
    U = sstcvx.perturb(theta, generator=torch.Generator().manual_seed(args.seed + 1))
    X = sstcvx.relax(P, U, args.tau, REGULARIZERS[name])
    boundary = ((X < 1e-6) | (X > 1 - 1e-6)).float().mean().item()
    gap = (X - sstcvx.argmax(P, U)).abs().sum(-1).mean().item() / (2 * P.k)
    return {"subset_precision": precision, "boundary_fraction": boundary, "relaxed_hard_gap": gap}


def plot(path, curves, tau):
    plt = _common.pyplot()

    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for name, losses in curves.items():
        new = name.split(" (")[0] in NEW
        ax.plot(_common.smooth(losses, 5), "--" if new else "-", label=name + (" (new)" if new else ""))
    ax.set(xlabel="step", ylabel="||X_tau - target||^2 (train, smoothed)", title=f"k-subset relaxations, tau={tau}")
    ax.legend(fontsize=8)
    _common.save_figure(fig, path)


def parse_args(argv=None):
    p = _common.argument_parser(__doc__)
    p.add_argument("--items", type=int, default=10, help="n of KSubset(n, k)")
    p.add_argument("--k", type=int, default=3, help="k of KSubset(n, k)")
    p.add_argument("--features", type=int, default=5, help="context dimension")
    p.add_argument("--train", type=int, default=512)
    p.add_argument("--test", type=int, default=128, help="held-out contexts (the generic path solves each)")
    p.add_argument("--steps", type=int, default=100, help="training steps (generic path: ms per instance)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=0.05, help="Adam learning rate")
    p.add_argument("--tau", type=float, default=0.5)
    p.add_argument("--compare-batch", type=int, default=8, help="utilities checked by sstcvx.compare")
    p.add_argument("--regularizers", nargs="+", default=list(REGULARIZERS), choices=list(REGULARIZERS))
    p.add_argument("--repeats", type=int, default=3, help="timing repeats of sstcvx.compare")
    p.add_argument("--skip-generic", action="store_true", help="do not also train the new ones on the cvxpylayers path")
    _common.add_run_arguments(p, "new_relaxation")
    args = p.parse_args(argv)
    if args.tiny:
        args.items, args.k, args.steps, args.batch_size, args.train, args.test, args.compare_batch = (
            6,
            2,
            2,
            4,
            32,
            8,
            2,
        )
        args.repeats = 1
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    out, gen = _common.start_run(args)
    P = polytopes.KSubset(args.items, args.k)
    data = make_data((args.train, args.test), args.items, args.k, args.features, gen)

    new = [REGULARIZERS[name] for name in args.regularizers if name in NEW]
    comparison = {}
    if new:
        # the new regularizers: the cvxpylayers path against the separable solver of
        # k-subsets ("specialized"), timed, then against the same program on the vertex list
        both = sstcvx.compare(
            P,
            new,
            tau=args.tau,
            batch=args.compare_batch,
            seed=args.seed,
            repeats=args.repeats,
            generic_backend="cvxpylayers",
        )
        brute = sstcvx.compare(
            P,
            new,
            tau=args.tau,
            batch=args.compare_batch,
            seed=args.seed,
            reference="brute_force",
            repeats=0,
            hard=False,
        )
        print((both + brute).table())
        for row, check in zip(both.rows, brute.rows):
            comparison[row.regularizer] = {
                "max_abs_diff": row.max_abs_diff,
                "max_abs_grad_diff": row.max_abs_grad_diff,
                "brute_force_max_abs_diff": check.max_abs_diff,
                "ms_per_instance_generic": None
                if row.time_generic is None
                else row.time_generic / row.generic_batch * 1e3,
                "ms_per_instance_separable": None
                if row.time_reference is None
                else row.time_reference / row.batch * 1e3,
            }

    results, curves = {}, {}
    runs = [(name, "auto") for name in args.regularizers]
    runs += [(name, "cvxpylayers") for name in args.regularizers if name in NEW and not args.skip_generic]
    for name, solver in runs:
        key = name if solver == "auto" else f"{name} (cvxpylayers)"
        model, curves[key], seconds = train(P, name, data, args, solver)
        path = sstcvx.relaxation_solver(P, REGULARIZERS[name], solver)[1]
        results[key] = {"path": path, "ms_per_instance": seconds * 1e3, "final_loss": curves[key][-1]}
        results[key].update(evaluate(P, name, model, data, args))
    rows = [
        [
            name + (" (new)" if name.split(" (")[0] in NEW else ""),
            r["path"],
            r["ms_per_instance"],
            r["final_loss"],
            r["subset_precision"],
            r["boundary_fraction"],
            r["relaxed_hard_gap"],
        ]
        for name, r in results.items()
    ]
    columns = [
        "regularizer",
        "path",
        "ms/instance",
        "final loss",
        "subset precision",
        "X_tau within 1e-6 of 0/1",
        "relaxed-hard gap",
    ]
    title = f"{P.name}, tau={args.tau}, {args.steps} steps of batch {args.batch_size}, {args.test} held-out contexts"
    print(_common.format_table(columns, rows, title))
    plot(out, curves, args.tau)
    results["compare"] = comparison
    return _common.finish_run(args, out, results)


if __name__ == "__main__":
    main()
