"""Learning to explain with correlated k-subsets: contiguous rationales on data with a known answer.

The correlated k-subset experiment of Paulus et al. (NeurIPS 2020, §8.3), where the
explanation of a review is a k-subset of its words that rewards choosing neighbours
together, here on synthetic sequences whose rationale is known, so that the chosen
subsets can be scored.

Data.  A sequence of d positions (features) holds one informative block of k contiguous
positions at a uniformly random place; the label y in {0, 1} is uniform, and
x_j = (2y - 1) * signal + N(0, 1) inside the block, x_j = N(0, 1) outside.  One
position alone is weak evidence (its shift is about one standard deviation), the k
positions of the block together decide the label, and only the run of k shifted
values of the same sign marks where the block is.

Model.  A convolutional explainer scores each position from its neighbourhood
x_{j-1..j+1} (unary utilities theta, d of them; ``--kernel`` widens it) and, for the
correlated method, each adjacent pair from x_{j-1..j+2} (pairwise utilities phi,
d - 1), like a word-level scorer of a text model; a subset is drawn as U = utilities + Gumbel noise and relaxed by
an SST; a predictor MLP sees only x * mask (the first d entries of the sample) and
outputs the label.  Both train on the cross-entropy.

Methods (all through ``sstcvx.sample``, on the same data and budget):

* ``correlated``: ``CorrelatedKSubset(d, k)`` with exponential-family entropy (the
  forward-backward marginals) on (theta, phi), so adjacent positions chosen together
  can be rewarded;
* ``ksubset``: ``KSubset(d, k)`` with exponential-family entropy (theta only);
* ``straight_through``: the hard k-subset in the forward pass, the k-subset
  exponential-family relaxation's Jacobian in the backward pass;
* ``independent``: independent bits, ``Hypercube(d)`` with binary entropy (a sigmoid per
  position; nothing limits the mask to k positions).

Evaluation on held-out data uses one hard subset per instance, the argmax of the
explainer's utilities over the method's own set of k-subsets (``CorrelatedKSubset`` for
``correlated``, the k largest theta for the others): ``accuracy`` of the predictor on
x * mask, ``subset_precision`` = |chosen & block| / k, and ``contiguity`` = (adjacent
chosen pairs) / (k - 1), 1 for a single block.  With ``--seeds 0 1 2`` the table gives
mean and standard deviation over the seeds.

Run ``python examples/correlated_subset_selection.py`` (about 30 s of CPU time per seed
on one thread; the default); ``--tiny`` for a smoke test.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common

import polytopes
import sstcvx

# name: (family of the training samples, regularizer, sampling mode)
METHODS = {
    "correlated": ("correlated_ksubset", "exp_family_entropy", "relaxed"),
    "ksubset": ("ksubset", "exp_family_entropy", "relaxed"),
    "straight_through": ("ksubset", "exp_family_entropy", "straight_through"),
    "independent": ("hypercube", "binary_entropy", "relaxed"),
}
METRICS = ("accuracy", "subset_precision", "contiguity")


def make_data(count: int, d: int, k: int, signal: float, gen: torch.Generator):
    """``(x (count, d), labels (count,), block mask (count, d))``; see the module docstring."""
    if not 2 <= k < d:
        raise ValueError(f"--k: expected 2 <= k < d = {d} (a block of k positions in a longer sequence), got {k}")
    labels = torch.randint(2, (count,), generator=gen)
    start = torch.randint(d - k + 1, (count, 1), generator=gen)
    position = torch.arange(d)
    block = ((position >= start) & (position < start + k)).float()
    x = torch.randn(count, d, generator=gen) + signal * (2.0 * labels - 1.0).unsqueeze(-1) * block
    return x, labels, block


def mlp(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, d_out)
    )


class ConvExplainer(nn.Module):
    """Local utilities from a sequence x (B, d): theta_j from the ``kernel`` positions around j, and
    with ``pairwise`` also phi_j (the pair j, j + 1) from those around j and j + 1; returns theta
    (B, d) or (theta, phi) (B, 2d - 1).

    With a small receptive field (the default 3), as a word-level scorer of a text model, a
    position's own evidence is weak, and only the utilities' structure (phi) can pool it along a block.
    """

    def __init__(self, hidden: int, pairwise: bool, kernel: int):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(1, hidden, kernel, padding=kernel // 2), nn.ReLU(), nn.Conv1d(hidden, hidden, 1), nn.ReLU()
        )
        self.unary = nn.Conv1d(hidden, 1, 1)
        self.pair = nn.Conv1d(hidden, 1, 2) if pairwise else None

    def forward(self, x):
        h = self.features(x.unsqueeze(1))
        theta = self.unary(h).squeeze(1)
        return theta if self.pair is None else torch.cat([theta, self.pair(h).squeeze(1)], dim=-1)


class Explainer(nn.Module):
    """Explainer (x -> utilities), SST over subsets, predictor MLP (x * mask -> label logits)."""

    def __init__(self, method: str, d: int, k: int, hidden: int, tau: float, kernel: int):
        super().__init__()
        family, self.regularizer, self.mode = METHODS[method]
        self.d, self.tau = d, tau
        if family == "correlated_ksubset":
            self.P = self.hard_P = polytopes.CorrelatedKSubset(d, k)
        else:
            self.P = polytopes.KSubset(d, k) if family == "ksubset" else polytopes.Hypercube(d)
            self.hard_P = polytopes.KSubset(d, k)
        self.pairwise = family == "correlated_ksubset"
        self.explainer = ConvExplainer(hidden, self.pairwise, kernel)
        self.predictor = mlp(d, hidden, 2)

    def forward(self, x, generator=None):
        """Label logits from a random (relaxed or straight-through) mask; training mode."""
        utilities = self.explainer(x)
        sample = sstcvx.sample(self.P, utilities, self.tau, self.regularizer, mode=self.mode, generator=generator)
        return self.predictor(x * sample[:, : self.d])

    @torch.no_grad()
    def explain(self, x):
        """The hard subset (the argmax of the utilities over the method's k-subsets) and its label logits."""
        mask = sstcvx.argmax(self.hard_P, self.explainer(x))[:, : self.d]
        return mask, self.predictor(x * mask)


@torch.no_grad()
def evaluate(model: Explainer, x, labels, block):
    mask, logits = model.explain(x)
    k = mask.sum(-1)
    return {
        "accuracy": (logits.argmax(-1) == labels).float().mean().item(),
        "subset_precision": ((mask * block).sum(-1) / k).mean().item(),
        "contiguity": ((mask[:, :-1] * mask[:, 1:]).sum(-1) / (k - 1)).mean().item(),
    }


def train(method: str, data, args, seed: int):
    gen = _common.seed_everything(seed)
    (x, labels, _), test = data
    model = Explainer(method, x.shape[1], args.k, args.hidden, args.tau, args.kernel)
    curves = _common.train_classifier(model, x, labels, test, evaluate, args, gen, f"{method:>16} seed {seed}", METRICS)
    return model, curves


def plot(path, curves, examples):
    """Learning curves (first seed) and the hard subsets each method picks on a few test instances."""
    plt = _common.pyplot()

    fig, axes = plt.subplots(1, 4, figsize=(18, 3.8))
    for m, c in curves.items():
        axes[0].plot(c["step"], _common.smooth(c["loss"]), label=m)
        axes[1].plot(c["eval_step"], c["accuracy"], "o-", ms=3, label=m)
        axes[2].plot(c["eval_step"], c["subset_precision"], "o-", ms=3, label=m)
    axes[0].set(xlabel="step", ylabel="cross-entropy (train, smoothed)", title="training loss")
    axes[1].set(xlabel="step", ylabel="accuracy (test, hard subset)", title="accuracy", ylim=(0.4, 1.01))
    axes[2].set(xlabel="step", ylabel="|chosen & block| / k (test)", title="subset precision", ylim=(0, 1.01))
    axes[2].legend(fontsize=8)
    # rows: the true block, then each method's hard subset, for a few test instances stacked
    block, masks = examples
    rows, labels = [], []
    for i in range(block.shape[0]):
        rows.append(2 * block[i])
        labels.append(f"#{i} block")
        for m, mask in masks.items():
            rows.append(mask[i] + block[i] * mask[i])  # 1: chosen outside the block, 2: chosen inside
            labels.append(f"#{i} {m}")
    axes[3].imshow(torch.stack(rows).numpy(), aspect="auto", cmap="Greys", vmin=0, vmax=2, interpolation="nearest")
    axes[3].set_yticks(range(len(labels)), labels, fontsize=6)
    axes[3].set(xlabel="position", title="hard subsets (dark: inside the block)")
    _common.save_figure(fig, path)


def parse_args(argv=None):
    p = _common.argument_parser(__doc__)
    p.add_argument("--features", type=int, default=40, help="d, the sequence length")
    p.add_argument("--k", type=int, default=5, help="the length of the informative block and the subset size")
    p.add_argument(
        "--signal", type=float, default=1.0, help="shift of the block's positions, in noise standard deviations"
    )
    p.add_argument("--train", type=int, default=10_000, help="training instances")
    p.add_argument("--test", type=int, default=2_000, help="test instances")
    p.add_argument("--steps", type=int, default=600, help="training steps per method")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--hidden", type=int, default=64, help="width of the explainer and predictor MLPs")
    p.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate")
    p.add_argument("--tau", type=float, default=0.5, help="temperature of every SST")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--kernel", type=int, default=3, help="receptive field of the explainer's unary scores (odd)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--seeds", type=int, nargs="+", help="run every method once per seed (default: --seed)")
    _common.add_run_arguments(p, "correlated_subset_selection")
    p.set_defaults(threads=1)
    args = p.parse_args(argv)
    if args.tiny:
        args.features, args.train, args.test, args.steps, args.eval_every, args.hidden = 12, 200, 100, 5, 5, 16
    if args.kernel < 1 or args.kernel % 2 == 0:
        p.error(f"--kernel: expected an odd positive int, got {args.kernel}")
    args.seeds = args.seeds or [args.seed]
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    out, gen = _common.start_run(args)
    per_seed, curves, examples = {m: [] for m in args.methods}, {}, None
    for seed in args.seeds:
        gen = torch.Generator().manual_seed(seed)
        data = (
            make_data(args.train, args.features, args.k, args.signal, gen),
            make_data(args.test, args.features, args.k, args.signal, gen),
        )
        masks = {}
        for method in args.methods:
            start = time.perf_counter()
            model, method_curves = train(method, data, args, seed)
            result = evaluate(model, *data[1])
            result["train_seconds"] = time.perf_counter() - start
            per_seed[method].append(result)
            if seed == args.seeds[0]:
                curves[method] = method_curves
                masks[method] = model.explain(data[1][0][:4])[0]
        if examples is None:
            examples = (data[1][2][:4], masks)
    results = {}
    for method, runs in per_seed.items():
        results[method] = {key: statistics.fmean(r[key] for r in runs) for key in (*METRICS, "train_seconds")}
        if len(runs) > 1:
            results[method].update({f"{key}_std": statistics.stdev(r[key] for r in runs) for key in METRICS})
            results[method]["per_seed"] = {str(s): r for s, r in zip(args.seeds, runs)}

    def cell(method, key):
        r = results[method]
        return f"{r[key]:.3f} ± {r[key + '_std']:.3f}" if f"{key}_std" in r else r[key]

    rows = [[m, *(cell(m, key) for key in METRICS), results[m]["train_seconds"]] for m in results]
    title = (
        f"Correlated subset selection, d={args.features}, block k={args.k}, signal={args.signal}, "
        f"{args.train}/{args.test} instances, {args.steps} steps, tau={args.tau}, seeds {args.seeds}; "
        "test metrics of one hard subset per instance"
    )
    print(_common.format_table(["method", "accuracy", "subset precision", "contiguity", "train s"], rows, title))
    plot(out, curves, examples)
    return _common.finish_run(args, out, results)


if __name__ == "__main__":
    main()
