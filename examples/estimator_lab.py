"""How good is a relaxation's gradient?  The estimator lab on k-subsets and spanning trees.

The quantity a stochastic argmax model optimizes is E[L(X)] for the hard sample
X = argmax_{x in P} <theta + eps, x>.  Its gradient is estimated three ways:

* ``relaxed``: grad_theta L(X_tau), the stochastic softmax trick, for each regularizer and
  temperature tau (biased: it differentiates E[L(X_tau)]);
* ``straight_through``: L sees X, the gradient flows through X_tau of the same U;
* ``score_function``: L(X) grad_theta log p(U - theta), unbiased, with no baseline, a running
  mean of the earlier losses, or the leave-one-out mean over groups of 8 samples.

``sstcvx.harness.lab.run_lab`` measures each against a reference gradient (the score function
with control variates over a million hard samples) and reports its bias (with a 95% interval),
the standard deviation and mean squared error of one sample, and the samples an average needs
for a 10% error.  Here on ``KSubset(10, 3)`` (binary entropy, Euclidean and exponential-family
entropy relaxations) and on the spanning trees of K_5 (exponential-family entropy, the
Matrix-Tree marginals), with the non-linear loss L(X) = (<c, X> - 1)^2, c ~ N(0, 1), which
couples the coordinates of X.  What it shows: the relaxed estimators' bias falls and their
variance rises as tau -> 0; straight-through keeps a bias at every tau; the score function
is unbiased but its variance is the largest, and its baselines cut it.

Run ``python examples/estimator_lab.py`` (about a minute with one thread); ``--tiny`` for a
smoke test.  The command line does the same for any family or user polytope:
``sstcvx lab ksubset --n 10 --k 3``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common

from polytopes.ksubset import KSubset
from polytopes.spanning_tree import SpanningTree
from sstcvx.harness.lab import run_lab

TAUS = (0.03, 0.1, 0.3, 1.0, 3.0)
SETTINGS = {  # name: (polytope, regularizers)
    "ksubset": (lambda: KSubset(10, 3), ("binary_entropy", "euclidean", "exp_family_entropy")),
    "spanning_tree": (lambda: SpanningTree(5), ("exp_family_entropy",)),
}


def quadratic_loss(c):
    """L(X) = (<c, X> - 1)^2 for a batch X (B, d): non-linear on the vertices."""

    def loss(X):
        return (X @ c.to(X) - 1.0) ** 2

    loss.__name__ = "(<c, X> - 1)^2"
    return loss


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    _common.add_run_arguments(parser, "estimator_lab")
    parser.add_argument("--samples", type=int, default=50_000, help="per-sample gradients per setting (default 50000)")
    parser.add_argument(
        "--reference-samples", type=int, default=1_000_000, help="hard samples of the reference (default 1000000)"
    )
    args = parser.parse_args(argv)
    if args.threads is None:
        torch.set_num_threads(1)  # many small batched solver calls: one thread is fastest on a shared machine
    out, generator = _common.start_run(args)
    taus = (0.3, 1.0) if args.tiny else TAUS
    samples, reference_samples = (200, 5000) if args.tiny else (args.samples, args.reference_samples)

    plt = _common.pyplot()

    fig, axes = plt.subplots(len(SETTINGS), 3, figsize=(15, 4.4 * len(SETTINGS)), squeeze=False)
    results, rows = {}, []
    problems = {}  # theta and the loss of each polytope, drawn first so that they do not depend on --samples
    for name, (make, _) in SETTINGS.items():
        P = make()
        d = P.event_shape[0]
        theta = torch.randn(d, dtype=torch.float64, generator=generator)
        problems[name] = P, theta, quadratic_loss(torch.randn(d, dtype=torch.float64, generator=generator))
    for (name, (_, regularizers)), ax_row in zip(SETTINGS.items(), axes):
        P, theta, loss = problems[name]
        start = time.perf_counter()
        report = run_lab(
            P,
            loss,
            theta,
            taus=taus,
            regularizers=regularizers,
            samples=samples,
            reference_samples=reference_samples,
            batch=5000,
            generator=generator,
            progress=not args.quiet,
        )
        seconds = time.perf_counter() - start
        print(
            f"{P!r}: reference ||grad|| = {report.reference['norm']:.4g} "
            f"(95% ball radius {report.reference['radius']:.2g}), {seconds:.0f} s"
        )
        report.plot(axes=ax_row)
        ax_row[1].set_title(f"{P.name}, L = (<c, X> - 1)^2: std of one sample")
        results[name] = report.to_dict()
        for r in report:
            ci = "-" if r.bias_ci is None else f"[{r.bias_ci[0]:.2g}, {r.bias_ci[1]:.2g}]"
            rows.append(
                [
                    name,
                    r.estimator,
                    r.regularizer or "-",
                    "-" if r.tau is None else f"{r.tau:g}",
                    r.baseline or "-",
                    r.bias_norm,
                    ci,
                    r.std,
                    r.mse,
                    "never" if r.samples_to_target is None else r.samples_to_target,
                ]
            )
    fig.suptitle(
        "Estimators of grad E[L(X)]: |bias| (95% interval shaded), std and MSE of one sample against tau "
        "(dashed: the score function)",
        fontsize=11,
    )
    _common.save_figure(fig, out, dpi=100, rect=(0, 0, 1, 0.96))
    print(
        _common.format_table(
            ["polytope", "estimator", "regularizer", "tau", "baseline", "|bias|", "95% CI", "std", "MSE", "N(10%)"],
            rows,
        )
    )
    return _common.finish_run(args, out, results)


if __name__ == "__main__":
    main()
