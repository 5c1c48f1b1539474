"""Your own polytope: declare it in CVXPY, train through the generic path, then specialize it.

The set X: choose exactly one item from each of G groups of M items (a menu: one starter,
one main, one dessert).  X is a set of 0/1 matrices (G, M) with one 1 per row, and its
convex hull is a product of simplices, {x >= 0, sum_j x_gj = 1 for every g} -- two lines
of CVXPY.  (sstcvx recognizes this declaration as ``polytopes.ProductSimplex`` and would
route it to that family's solvers; the example declares it with ``recognize=False`` to show
the route a polytope that no family covers takes.)

1. Declare P with ``sstcvx.Polytope.from_cvxpy(..., check=True)`` (random LP probes confirm
   that its vertices are 0/1).
2. Train a small model through the generic path (its fast batched torch solver; the
   cvxpylayers backend, milliseconds per instance, is timed on a few steps): a linear map from a context c to utilities theta (G, M), relaxed samples
   X_tau with the entropy regularizer, squared loss to the best menu for c.
3. Check the hard samples (the LP solved by HiGHS) are vertices: 0/1 with one item per group.
4. Register a specialized solver: the entropy is separable and the groups are
   independent simplices, so X_tau is a softmax per group, exactly; the argmax is an
   argmax per group.  ``sstcvx.compare`` checks it against the generic path on the same
   utilities, and the model is retrained through it.

Run ``python examples/custom_polytope.py``; ``--tiny`` for a smoke test.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import cvxpy as cp
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common

import sstcvx


def one_item_per_group(groups: int, items: int) -> sstcvx.Polytope:
    """conv{x in {0,1}^(groups x items) : one 1 per row}: the whole declaration."""
    x = cp.Variable((groups, items))
    return sstcvx.Polytope.from_cvxpy(
        x, [x >= 0, cp.sum(x, axis=1) == 1], name=f"OnePerGroup({groups}x{items})", check=True, recognize=False
    )


def per_group_softmax(P, Z):
    """argmax_{x in P} <Z, x> - sum x log x on a product of simplices = softmax in each group (row)."""
    return Z.softmax(dim=-1)


def per_group_argmax(P, U):
    """argmax_{x in P} <U, x>: the best item of each group."""
    return nn.functional.one_hot(U.argmax(dim=-1), U.shape[-1]).to(U.dtype)


def make_data(counts, groups: int, items: int, features: int, gen: torch.Generator):
    """Per split size in ``counts``: contexts c ~ N(0, I) and the best menu under one hidden linear utility."""
    hidden = torch.randn(features, groups * items, generator=gen)
    splits = []
    for count in counts:
        c = torch.randn(count, features, generator=gen)
        best = (c @ hidden).view(count, groups, items).argmax(-1)
        splits.append((c, nn.functional.one_hot(best, items).float()))
    return splits


def is_vertex(X) -> torch.Tensor:
    """Per sample: entries exactly 0 or 1 and exactly one item per group."""
    binary = ((X == 0) | (X == 1)).flatten(1).all(-1)
    return binary & (X.sum(-1) == 1).all(-1)


def train(P, solver: str, data, args):
    """Fit theta = Linear(c) through ``solver`` ("generic" or "specialized").

    Returns the training losses and, on the test contexts, the exact-match rate of the most
    likely menu, the fraction of hard samples (random U) that are vertices, and the time per step.
    """
    gen = _common.seed_everything(args.seed)
    (c, y), (c_test, y_test) = data
    model = nn.Linear(c.shape[1], y.shape[1] * y.shape[2])
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    losses = []
    start = time.perf_counter()
    for _ in _common.progress(range(args.steps), f"{solver:>11} path", args.quiet):
        idx = torch.randint(len(c), (args.batch_size,), generator=gen)
        theta = model(c[idx]).view(-1, *P.event_shape)
        X = sstcvx.sample(P, theta, args.tau, "entropy", solver=solver, generator=gen)
        loss = ((X - y[idx]) ** 2).sum((-2, -1)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    seconds = time.perf_counter() - start
    with torch.no_grad():  # the most likely menu: the LP at theta, through the same path
        theta = model(c_test).view(-1, *P.event_shape)
        best = sstcvx.argmax(P, theta, solver=solver)
        hard = sstcvx.sample(P, theta, mode="hard", solver=solver, generator=torch.Generator().manual_seed(args.seed))
    metrics = {
        "seconds_per_step": seconds / args.steps,
        "final_loss": losses[-1],
        "accuracy": (best == y_test).flatten(1).all(-1).float().mean().item(),
        "vertices": is_vertex(hard).float().mean().item(),
    }
    return losses, metrics


def plot(path, curves):
    plt = _common.pyplot()

    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for name, losses in curves.items():
        ax.plot(range(1, len(losses) + 1), losses, "-" if name == "generic" else "--", label=f"{name} path")
    ax.set(xlabel="step", ylabel="||X_tau - best menu||^2 (train batch)")
    ax.set_title("One item per group: generic CVXPY path vs per-group softmax (same seed)", fontsize=10)
    ax.legend()
    _common.save_figure(fig, path)


def parse_args(argv=None):
    p = _common.argument_parser(__doc__)
    p.add_argument("--groups", type=int, default=3)
    p.add_argument("--items", type=int, default=4, help="items per group")
    p.add_argument("--features", type=int, default=5, help="context dimension")
    p.add_argument("--train", type=int, default=512)
    p.add_argument("--test", type=int, default=128, help="held-out contexts (the generic path solves an LP for each)")
    p.add_argument("--steps", type=int, default=100, help="training steps (generic path: ms per instance)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=0.1, help="Adam learning rate")
    p.add_argument("--tau", type=float, default=0.5)
    p.add_argument("--compare-batch", type=int, default=16, help="utilities compared by sstcvx.compare")
    p.add_argument(
        "--cvxpylayers-steps",
        type=int,
        default=10,
        help="steps timed on the cvxpylayers backend of the generic path (ms per instance each)",
    )
    _common.add_run_arguments(p, "custom_polytope")
    args = p.parse_args(argv)
    if args.tiny:
        args.steps, args.batch_size, args.compare_batch, args.train, args.test = 2, 4, 4, 32, 32
        args.cvxpylayers_steps = 1
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    out, gen = _common.start_run(args)
    data = make_data((args.train, args.test), args.groups, args.items, args.features, gen)
    P = one_item_per_group(args.groups, args.items)

    # 1-3: the generic path (its fast torch backend), and its hard samples; a few steps on its
    # cvxpylayers backend for the time per step.
    curves, results = {}, {}
    curves["generic"], results["generic"] = train(P, "generic", data, args)
    short = argparse.Namespace(**{**vars(args), "steps": args.cvxpylayers_steps})
    curves["cvxpylayers"], results["cvxpylayers"] = train(P, "cvxpylayers", data, short)

    # 4: register the specialized solvers on this polytope, compare them with the generic path, retrain.
    sstcvx.register_relaxation(P, "entropy")(per_group_softmax)
    sstcvx.register_argmax(P)(per_group_argmax)
    report = sstcvx.compare(P, "entropy", tau=args.tau, batch=args.compare_batch, seed=args.seed, repeats=2)
    print(report.table())
    curves["specialized"], results["specialized"] = train(P, "specialized", data, args)
    row = report[0]
    results["compare"] = {
        "max_abs_diff": row.max_abs_diff,
        "max_abs_grad_diff": row.max_abs_grad_diff,
        "hard_agreement": row.hard_agreement,
        "speedup": row.speedup,
    }

    rows = [
        [name, r["seconds_per_step"] * 1e3, r["final_loss"], r["accuracy"], r["vertices"]]
        for name, r in results.items()
        if name != "compare"
    ]
    title = (
        f"{P.name}, entropy, tau={args.tau}, {args.steps} steps of batch {args.batch_size}; "
        f"generic vs specialized X_tau on the same U: max |dX| = {row.max_abs_diff:.2g}, "
        f"max |dVJP| = {row.max_abs_grad_diff:.2g}"
    )
    columns = ["path", "ms per step", "final loss", "test exact match", "hard samples that are vertices"]
    print(_common.format_table(columns, rows, title))
    plot(out, curves)
    return _common.finish_run(args, out, results)


if __name__ == "__main__":
    main()
