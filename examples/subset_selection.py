"""Learning to explain (L2X) with k-subset stochastic softmax tricks, on data with a known answer.

An instance-wise feature-selection experiment after Chen et al. (ICML 2018) and
Paulus et al. (NeurIPS 2020, §8.3), on synthetic data where the informative features are
known, so that the chosen subsets can be scored.

Data.  x ~ N(0, I_d).  Feature 0 is a switch: if x_0 > 0 the label is the "orange skin"
rule 1[x_1^2 + x_2^2 + x_3^2 > 2.366] (2.366 is the median of chi^2_3, so classes are
balanced), otherwise it is 1[x_4 + x_5 + x_6 > 0].  The k = 4 informative features of
an instance are therefore {0, 1, 2, 3} or {0, 4, 5, 6}; the other d - 7 features are noise.

Model.  An explainer MLP maps x to logits theta (d,); a k-subset is drawn as
U = theta + Gumbel noise and relaxed by an SST on ``polytopes.KSubset(d, k)``; a predictor
MLP sees only x * mask and outputs the label.  Both are trained on the cross-entropy.

Methods (relaxed masks in training, all through ``sstcvx.sample``):

* ``binary_entropy``, ``exp_family_entropy``, ``euclidean``: the relaxed k-subset SST
  with that regularizer;
* ``straight_through``: the hard k-subset in the forward pass, the binary-entropy
  relaxation's Jacobian in the backward pass;
* ``independent``: independent bits, ``polytopes.Hypercube(d)`` with binary entropy
  (a sigmoid per feature: nothing limits the mask to k features).

Evaluation on held-out data uses the hard subset argmax_{x in KSubset(d, k)} <theta, x>
(the k largest logits) for every method: ``accuracy`` of the predictor on x * mask, and
``subset_precision`` = |chosen & informative| / k, averaged over instances; and the
first evaluation step at which the test subset precision reached 0.9 (sample efficiency).

Run ``python examples/subset_selection.py``; ``--tiny`` for a smoke test.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common

import polytopes
import sstcvx

K = 4  # the switch and the three features of the active rule
CHI2_3_MEDIAN = 2.366

# name: (polytope on d features, regularizer, sampling mode)
METHODS = {
    "binary_entropy": ("ksubset", "binary_entropy", "relaxed"),
    "exp_family_entropy": ("ksubset", "exp_family_entropy", "relaxed"),
    "euclidean": ("ksubset", "euclidean", "relaxed"),
    "straight_through": ("ksubset", "binary_entropy", "straight_through"),
    "independent": ("hypercube", "binary_entropy", "relaxed"),
}


def make_data(count: int, d: int, gen: torch.Generator):
    """``(x (count, d), labels (count,), informative mask (count, d))``; see the module docstring."""
    if d < 7:
        raise ValueError(f"--features: expected at least 7 features (a switch and two rules of 3), got {d}")
    x = torch.randn(count, d, generator=gen)
    switch = x[:, 0] > 0
    orange_skin = (x[:, 1:4] ** 2).sum(-1) > CHI2_3_MEDIAN
    linear = x[:, 4:7].sum(-1) > 0
    labels = torch.where(switch, orange_skin, linear).long()
    informative = torch.zeros(count, d)
    informative[:, 0] = 1
    informative[switch, 1:4] = 1
    informative[~switch, 4:7] = 1
    return x, labels, informative


def mlp(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, d_out)
    )


class L2X(nn.Module):
    """Explainer (x -> logits over features), k-subset SST, predictor (x * mask -> label logits)."""

    def __init__(self, method: str, d: int, hidden: int, tau: float):
        super().__init__()
        family, self.regularizer, self.mode = METHODS[method]
        self.P = polytopes.KSubset(d, K) if family == "ksubset" else polytopes.Hypercube(d)
        self.hard_P = polytopes.KSubset(d, K)
        self.explainer, self.predictor = mlp(d, hidden, d), mlp(d, hidden, 2)
        self.tau = tau

    def forward(self, x, generator=None):
        """Label logits from a random (relaxed or straight-through) mask; training mode."""
        theta = self.explainer(x)
        mask = sstcvx.sample(self.P, theta, self.tau, self.regularizer, mode=self.mode, generator=generator)
        return self.predictor(x * mask)

    @torch.no_grad()
    def explain(self, x):
        """The hard subset: the k features with the largest logits, and the label logits it gives."""
        mask = sstcvx.argmax(self.hard_P, self.explainer(x))
        return mask, self.predictor(x * mask)


@torch.no_grad()
def evaluate(model: L2X, x, labels, informative):
    mask, logits = model.explain(x)
    return {
        "accuracy": (logits.argmax(-1) == labels).float().mean().item(),
        "subset_precision": ((mask * informative).sum(-1) / K).mean().item(),
    }


def train(method: str, data, args):
    gen = _common.seed_everything(args.seed)
    (x, labels, _), test = data
    model = L2X(method, x.shape[1], args.hidden, args.tau)
    metrics = ("accuracy", "subset_precision")
    curves = _common.train_classifier(model, x, labels, test, evaluate, args, gen, f"{method:>18}", metrics)
    return model, curves


def plot(path, curves):
    plt = _common.pyplot()

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for m, c in curves.items():
        axes[0].plot(c["step"], _common.smooth(c["loss"]), label=m)
        axes[1].plot(c["eval_step"], c["accuracy"], "o-", ms=3, label=m)
        axes[2].plot(c["eval_step"], c["subset_precision"], "o-", ms=3, label=m)
    axes[0].set(xlabel="step", ylabel="cross-entropy (train, smoothed)", title="training loss")
    axes[1].set(xlabel="step", ylabel="accuracy (test, hard k-subset)", title="accuracy", ylim=(0.4, 1.01))
    axes[2].set(xlabel="step", ylabel="|chosen & informative| / k (test)", title="subset precision", ylim=(0, 1.01))
    axes[2].legend(fontsize=8)
    _common.save_figure(fig, path)


def parse_args(argv=None):
    p = _common.argument_parser(__doc__)
    p.add_argument("--features", type=int, default=20, help="d, the number of features (>= 7)")
    p.add_argument("--train", type=int, default=10_000, help="training instances")
    p.add_argument("--test", type=int, default=2_000, help="test instances")
    p.add_argument("--steps", type=int, default=1_000, help="training steps per method")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--hidden", type=int, default=64, help="width of the explainer and predictor MLPs")
    p.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate")
    p.add_argument("--tau", type=float, default=0.5, help="temperature of every SST")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    _common.add_run_arguments(p, "subset_selection")
    args = p.parse_args(argv)
    if args.tiny:
        args.train, args.test, args.steps, args.eval_every, args.hidden = 200, 100, 5, 5, 16
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    out, gen = _common.start_run(args)
    data = make_data(args.train, args.features, gen), make_data(args.test, args.features, gen)
    results, curves = {}, {}
    for method in args.methods:
        start = time.perf_counter()
        model, curves[method] = train(method, data, args)
        results[method] = evaluate(model, *data[1])
        results[method]["train_seconds"] = time.perf_counter() - start
        reached = [s for s, v in zip(curves[method]["eval_step"], curves[method]["subset_precision"]) if v >= 0.9]
        results[method]["steps_to_0.9_precision"] = reached[0] if reached else None
    rows = [
        [m, r["accuracy"], r["subset_precision"], r["steps_to_0.9_precision"] or "never", r["train_seconds"]]
        for m, r in results.items()
    ]
    title = (
        f"Subset selection (L2X), d={args.features}, k={K}, {args.train}/{args.test} instances, "
        f"{args.steps} steps, tau={args.tau}; test accuracy and precision of the top-k subset"
    )
    columns = ["method", "accuracy", "subset precision", "first step with precision >= 0.9", "train s"]
    print(_common.format_table(columns, rows, title))
    plot(out, curves)
    return _common.finish_run(args, out, results)


if __name__ == "__main__":
    main()
