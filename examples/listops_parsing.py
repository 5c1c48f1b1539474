"""Unsupervised parsing on ListOps: a latent arborescence over the tokens, learned from the value alone.

The parsing experiment of Paulus et al. (NeurIPS 2020), after ListOps (Nangia and Bowman,
2018), simplified and at a scale two CPU cores run in minutes.

Data (generated here, seeded, cached in ``<figure folder>/data/``).  An expression is an
operator applied to 2..``--max-args`` arguments, each a digit 0-9 or, below
``--max-depth`` nested operators, with probability ``--p-nest`` another expression::

    [MAX 2 9 [MIN 4 7 ] 0 ]   ->   9

Operators: MIN, MAX and MED (the lower median, sorted(args)[(k - 1) // 2]; no SUM_MOD).
Expressions longer than ``--max-len`` tokens are redrawn; test and validation
expressions that also occur in the training set are redrawn.  The value (10 classes) is
the label.

Ground-truth parse (the convention scored by the arc metrics).  The parse's vertices
are a virtual ROOT (vertex 0) and the expression's operators and digits in order
(vertices 1..m); closing brackets are tokens the encoder reads but not vertices (they
only delimit, and a bracket-to-operator arc would be a second name for the same
constituent).  ROOT heads the outermost operator, which in prefix notation is always the
first token; every operator heads each of its arguments (a digit, or the operator of a
nested expression).  Every vertex but ROOT has exactly one head: m arcs per expression.

Model.

* encoder: token embeddings of (ROOT, tokens) -> a one-layer bidirectional LSTM; the
  states of the vertices give biaffine arc scores
  theta[h, d] = <a(s_h), b(s_d)> / sqrt(k) + c(s_h) (a, b, c linear maps);
* latent: an arborescence of the m + 1 vertices rooted at ROOT, drawn by a stochastic
  softmax trick (below) from U = theta + Gumbel noise.  Its mask lets ROOT head vertex 1
  only (the one fact of prefix notation given to every method; ``--free-root`` drops it);
* classifier: its own token embeddings (not the encoder's states, so that information
  moves between vertices only along the sampled arcs), ``--rounds`` rounds of bottom-up
  message passing over the sampled arc matrix X (every head adds an MLP of the sum of its
  dependents' messages; weights shared by the rounds), then an MLP on ROOT's state -> 10
  logits.  Trained on cross-entropy, with Adam and a one-cycle learning-rate schedule.

Methods (same data, steps and batches; all through ``sstcvx.sample``):

* ``arborescence``: ``polytopes.Arborescence(m + 1, root=0, mask)`` with
  ``exp_family_entropy`` (the arc marginals of the Gibbs distribution over
  arborescences, directed Matrix-Tree theorem), relaxed: the classifier sees fractional
  arcs;
* ``straight_through``: the same polytope, forward the hard arborescence (Chu-Liu/Edmonds
  on U), backward the Jacobian of the relaxation;
* ``independent``: ``polytopes.Hypercube((m + 1)^2)`` on the arc indicators with
  ``binary_entropy`` (a sigmoid per arc), times the arborescence's allowed arcs (no
  self-loops, nothing into ROOT, ROOT -> vertex 1 only): nothing makes the arcs a tree or
  gives a vertex one head.

Two references are printed and plotted, not methods (not in ``--json``): ``gold_parse``,
the classifier alone trained the same way on the true parses (what a perfect parser
would allow in this budget; ``--no-reference`` skips it), and the ``flat parse`` that
hangs every vertex from the first token (its arc precision, a level below which a
learned parse says nothing).

Variable length.  An ``Arborescence`` takes one arc mask per polytope, shared by the
batch, so padded batches of mixed lengths cannot be expressed by a mask.  Batches are
therefore drawn from one shape at a time (the expressions with the same number of tokens
and of vertices form a bucket, chunked into batches of at most ``--batch-size``), and
each size m uses its own ``Arborescence(m + 1, root=0, mask)``: no padding vertex exists,
so none can get an arc, and no O(n^3) work is spent on padding.

Reported on the test set: ``accuracy`` of the classifier on one sample drawn the way the
method trains (relaxed, or hard for straight-through); ``hard_accuracy`` on one hard
sample; ``arc_precision`` and ``arc_recall`` of one hard sample X = argmax_P <U, x>
(U = theta + Gumbel noise, one per expression) against the ground-truth parse, pooled over
all arcs of the test set.  A tree has exactly m arcs, so for ``arborescence`` and
``straight_through`` precision equals recall; independent arcs can pick any number.

Run ``python examples/listops_parsing.py`` (default, a few minutes on one thread),
``--paper`` for a paper-scale configuration (more and longer data, wider model, 20x the
steps: hours on a CPU), ``--tiny`` for a smoke test.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common

import polytopes
import sstcvx

# name: (polytope family, regularizer, sampling mode)
METHODS = {
    "arborescence": ("arborescence", "exp_family_entropy", "relaxed"),
    "straight_through": ("arborescence", "exp_family_entropy", "straight_through"),
    "independent": ("hypercube", "binary_entropy", "relaxed"),
}

#: Bumped whenever ``generate`` changes, so that stale caches are not read.
DATA_VERSION = 2

#: The reference run: the classifier alone, reading the true parse (not a method; not in --json).
GOLD = "gold_parse"

OPERATORS = ("MIN", "MAX", "MED")
ROOT, CLOSE, FIRST_OP, FIRST_DIGIT = 0, 1, 2, 2 + len(OPERATORS)
VOCAB = ["ROOT", "]"] + [f"[{op}" for op in OPERATORS] + [str(d) for d in range(10)]

CONFIGS = {
    "default": {"train": 8000, "valid": 500, "test": 1000, "steps": 1500, "max_len": 24, "hidden": 64},
    "paper": {"train": 90_000, "valid": 5_000, "test": 10_000, "steps": 30_000, "max_len": 50, "hidden": 128},
    "tiny": {"train": 120, "valid": 40, "test": 40, "steps": 4, "max_len": 12, "hidden": 16},
}


# ------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------
def apply(op: int, args: list[int]) -> int:
    """The value of operator ``op`` (index into OPERATORS) on the digits ``args``."""
    if op == 0:
        return min(args)
    if op == 1:
        return max(args)
    return sorted(args)[(len(args) - 1) // 2]  # lower median: an integer for any count


def draw_expression(rng: np.random.Generator, max_depth: int, max_args: int, p_nest: float):
    """One random expression: ``(tokens, nodes, heads, value)``.

    ``tokens`` indexes VOCAB, position 0 being ROOT; ``nodes`` lists the positions of the
    parse's vertices in ``tokens`` (ROOT, then every operator and digit in order; closing
    brackets are not vertices); ``heads[i]`` is the vertex heading vertex i in the
    ground-truth parse (``heads[0] = -1``).  See the module docstring for the convention.
    """
    tokens, nodes, heads = [ROOT], [0], [-1]

    def expression(depth: int, parent: int) -> int:
        op = int(rng.integers(len(OPERATORS)))
        me = len(nodes)
        nodes.append(len(tokens))
        tokens.append(FIRST_OP + op)
        heads.append(parent)
        values = []
        for _ in range(int(rng.integers(2, max_args + 1))):
            if depth < max_depth and rng.random() < p_nest:
                values.append(expression(depth + 1, me))
            else:
                digit = int(rng.integers(10))
                nodes.append(len(tokens))
                tokens.append(FIRST_DIGIT + digit)
                heads.append(me)
                values.append(digit)
        tokens.append(CLOSE)
        return apply(op, values)

    value = expression(1, 0)
    return tokens, nodes, heads, value


def generate(counts: dict, args, seed: int, quiet: bool = False) -> dict:
    """Splits ``{name: count}`` of expressions with at most ``args.max_len`` tokens.

    Each split is a dict of tensors: ``tokens`` (N, max_len + 1) and ``nodes``, ``heads``
    (N, max_len + 1) long, padded (padding is never read: a batch takes the first
    ``length + 1`` tokens and ``size + 1`` vertices), ``length`` (N,) tokens and ``size``
    (N,) operators and digits of each expression, ``value`` (N,).  Training expressions
    may repeat; a validation or test expression never equals a training one.
    """
    rng = np.random.default_rng(seed)
    seen: set[tuple] = set()
    width = args.max_len + 1
    splits = {}
    for name, count in counts.items():
        split = {key: torch.zeros(count, width, dtype=torch.long) for key in ("tokens", "nodes", "heads")}
        split.update({key: torch.zeros(count, dtype=torch.long) for key in ("length", "size", "value")})
        for i in _common.progress(range(count), f"generating {name}", quiet):
            while True:
                tokens, nodes, heads, value = draw_expression(rng, args.max_depth, args.max_args, args.p_nest)
                key = tuple(tokens)
                if len(tokens) - 1 <= args.max_len and (name == "train" or key not in seen):
                    break
            if name == "train":
                seen.add(key)
            for field, row in (("tokens", tokens), ("nodes", nodes), ("heads", heads)):
                split[field][i, : len(row)] = torch.tensor(row)
            split["length"][i], split["size"][i], split["value"][i] = len(tokens) - 1, len(nodes) - 1, value
        splits[name] = split
    return splits


def load_data(args, cache_dir: Path) -> dict:
    """The three splits, generated once per configuration and cached as a .pt file."""
    counts = {"train": args.train, "valid": args.valid, "test": args.test}
    tag = f"d{args.max_depth}_a{args.max_args}_p{args.p_nest}_L{args.max_len}_{args.train}_{args.valid}_{args.test}"
    path = cache_dir / f"listops_v{DATA_VERSION}_{tag}_s{args.seed}.pt"
    if path.exists() and not args.no_cache:
        return torch.load(path)
    data = generate(counts, args, args.seed, args.quiet)
    if not args.no_cache:
        cache_dir.mkdir(parents=True, exist_ok=True)
        torch.save(data, path)
    return data


def to_text(split: dict, i: int) -> str:
    """Expression ``i`` of a split as text."""
    return " ".join(VOCAB[t] for t in split["tokens"][i, 1 : int(split["length"][i]) + 1].tolist())


def gold_arcs(heads: torch.Tensor) -> torch.Tensor:
    """Head arrays ``(B, n)`` (entry 0 = -1) -> arc-indicator matrices ``(B, n, n)``, x[h, d] = 1."""
    B, n = heads.shape
    x = torch.zeros(B, n, n)
    x[torch.arange(B)[:, None], heads[:, 1:], torch.arange(1, n)] = 1.0
    return x


def bucket_batches(split: dict, batch_size: int, gen: torch.Generator, shuffle: bool = True):
    """One epoch of index batches, each of a single (tokens, vertices) shape (see "Variable length").

    Within every bucket the indices are shuffled and cut into chunks of at most
    ``batch_size``; the chunks of all buckets are then visited in random order.
    """
    keys = split["length"] * (split["size"].max() + 1) + split["size"]
    order = torch.randperm(len(keys), generator=gen) if shuffle else torch.arange(len(keys))
    chunks = []
    for key in torch.unique(keys).tolist():
        chunks.extend(order[keys[order] == key].split(batch_size))
    visit = torch.randperm(len(chunks), generator=gen).tolist() if shuffle else range(len(chunks))
    return [chunks[i] for i in visit]


def endless_batches(split, batch_size, gen):
    while True:
        yield from bucket_batches(split, batch_size, gen)


def batch(split: dict, idx: torch.Tensor):
    """``(tokens (B, L + 1), nodes (B, m + 1), gold arcs (B, m + 1, m + 1), values (B,))`` of one bucket."""
    L, m = int(split["length"][idx[0]]), int(split["size"][idx[0]])
    return (
        split["tokens"][idx, : L + 1],
        split["nodes"][idx, : m + 1],
        gold_arcs(split["heads"][idx, : m + 1]),
        split["value"][idx],
    )


# ------------------------------------------------------------------------------------------
# model
# ------------------------------------------------------------------------------------------
def mlp(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, d_out))


class Encoder(nn.Module):
    """Tokens ``(B, L + 1)`` (ROOT first) and vertex positions ``(B, n)`` -> arc scores ``(B, n, n)``.

    theta[b, h, d] scores the arc h -> d between vertices (ROOT, operators, digits); the
    LSTM reads every token, closing brackets included.
    """

    def __init__(self, hidden: int):
        super().__init__()
        self.embed = nn.Embedding(len(VOCAB), hidden)
        self.lstm = nn.LSTM(hidden, hidden, batch_first=True, bidirectional=True)
        self.as_head, self.as_dep = nn.Linear(2 * hidden, hidden), nn.Linear(2 * hidden, hidden)
        self.head_bias = nn.Linear(2 * hidden, 1)
        self.scale = 1.0 / math.sqrt(hidden)

    def forward(self, tokens, nodes):
        states, _ = self.lstm(self.embed(tokens))  # (B, L + 1, 2H)
        states = states.gather(1, nodes[..., None].expand(-1, -1, states.shape[-1]))  # (B, n, 2H)
        scores = self.as_head(states) @ self.as_dep(states).transpose(1, 2) * self.scale
        return scores + self.head_bias(states)  # bias (B, n, 1): how good a head each vertex is


class Classifier(nn.Module):
    """Vertex tokens ``(B, n)`` and arcs ``(B, n, n)`` -> value logits ``(B, 10)``.

    Bottom-up message passing with weights shared by the rounds: every vertex adds to its
    state an MLP of its state and of the sum of its dependents' messages,
    z_h <- LayerNorm(z_h + F(z_h, sum_d x[h, d] W z_d)); an MLP reads the value from
    ROOT's state.  On a correct parse, round r can get the values of the sub-expressions
    of height <= r right, so ``rounds`` >= depth + 1 suffices.  The classifier has its own
    token embeddings: information moves between tokens only along the sampled arcs.
    """

    def __init__(self, hidden: int, rounds: int):
        super().__init__()
        self.embed = nn.Embedding(len(VOCAB), hidden)
        self.message = nn.Linear(hidden, hidden)
        self.update = mlp(2 * hidden, hidden, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.readout = mlp(hidden, hidden, 10)
        self.rounds = rounds

    def forward(self, tokens, arcs):
        z = self.embed(tokens)
        for _ in range(self.rounds):
            up = arcs @ self.message(z)  # (B, n, H): head h sums sum_d x[h, d] W z_d
            z = self.norm(z + self.update(torch.cat([z, up], -1)))
        return self.readout(z[:, 0])


class Parser(nn.Module):
    """Encoder, stochastic softmax trick over the parses, classifier."""

    def __init__(self, method: str, hidden: int, rounds: int, tau: float, free_root: bool = False):
        super().__init__()
        self.family, self.regularizer, self.mode = METHODS[method]
        self.encoder, self.classifier = Encoder(hidden), Classifier(hidden, rounds)
        self.tau, self.free_root = tau, free_root
        self._polytopes: dict[int, tuple] = {}

    def polytopes_for(self, n: int):
        """(latent polytope, tree polytope for hard samples, allowed arcs (n, n) float) for n vertices.

        Unless ``free_root``, the mask lets ROOT head vertex 1 only: in prefix notation the
        first token is always the outermost operator.  One polytope per size, built once.
        """
        if n not in self._polytopes:
            mask = None
            if not self.free_root:
                mask = torch.ones(n, n, dtype=torch.bool)
                mask[0, 2:] = False
            tree = polytopes.Arborescence(n, root=0, mask=mask)
            latent = tree if self.family == "arborescence" else polytopes.Hypercube(n * n)
            self._polytopes[n] = (latent, tree, tree.arcs.float())
        return self._polytopes[n]

    def sample_arcs(self, theta, mode: str, generator=None):
        """One sample ``(B, n, n)`` of the latent arcs from scores ``theta`` (``mode`` as in sstcvx.sample)."""
        B, n, _ = theta.shape
        latent, _, allowed = self.polytopes_for(n)
        if self.family == "arborescence":
            return sstcvx.sample(latent, theta, self.tau, self.regularizer, mode=mode, generator=generator)
        x = sstcvx.sample(latent, theta.reshape(B, n * n), self.tau, self.regularizer, mode=mode, generator=generator)
        return x.view(B, n, n) * allowed.to(x)  # the tree's arcs only: no self-loops, nothing into ROOT

    def forward(self, tokens, nodes, generator=None):
        """Value logits from one sample drawn the way this method trains; also returns theta."""
        theta = self.encoder(tokens, nodes)
        arcs = self.sample_arcs(theta, self.mode, generator)
        return self.classifier(tokens.gather(1, nodes), arcs), theta


# ------------------------------------------------------------------------------------------
# training and evaluation
# ------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: Parser, split: dict, seed: int, batch_size: int = 250, gold_parse: bool = False) -> dict:
    """Accuracy (training-mode sample, and hard sample) and pooled arc precision/recall of hard samples.

    ``gold_parse``: the reference run, whose classifier reads the true parse (arc scores 1).
    """
    gen = torch.Generator().manual_seed(seed)
    correct = hard_correct = hits = picked = true = 0.0
    for idx in bucket_batches(split, batch_size, gen, shuffle=False):
        tokens, nodes, gold, values = batch(split, idx)
        if gold_parse:
            logits, hard = model.classifier(tokens.gather(1, nodes), gold), gold
        else:
            logits, theta = model(tokens, nodes, gen)
            hard = model.sample_arcs(theta, "hard", gen)
        correct += (logits.argmax(-1) == values).sum().item()
        hard_correct += (model.classifier(tokens.gather(1, nodes), hard).argmax(-1) == values).sum().item()
        hits += (hard * gold).sum().item()
        picked += hard.sum().item()
        true += gold.sum().item()
    count = len(split["value"])
    return {
        "accuracy": correct / count,
        "hard_accuracy": hard_correct / count,
        "arc_precision": hits / max(picked, 1.0),
        "arc_recall": hits / true,
    }


def train(method: str, data, args):
    """Train one model; return it with its learning curves.

    ``method == GOLD``: the reference run, the classifier alone trained on the true parses.
    """
    gen = _common.seed_everything(args.seed)
    gold_parse = method == GOLD
    model = Parser("arborescence" if gold_parse else method, args.hidden, args.rounds, args.tau, args.free_root)
    if gold_parse:
        model.encoder.requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=args.steps, pct_start=0.05)
    curves = {"step": [], "loss": [], "eval_step": [], "accuracy": [], "arc_precision": [], "arc_recall": []}
    batches = endless_batches(data["train"], args.batch_size, gen)
    bar = _common.progress(range(1, args.steps + 1), f"{method:>16}", args.quiet)
    for step in bar:
        tokens, nodes, gold, values = batch(data["train"], next(batches))
        if gold_parse:
            logits = model.classifier(tokens.gather(1, nodes), gold)
        else:
            logits, _ = model(tokens, nodes, gen)
        loss = nn.functional.cross_entropy(logits, values)
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        sched.step()
        curves["step"].append(step)
        curves["loss"].append(loss.item())
        if step % args.eval_every == 0 or step == args.steps:
            model.eval()
            metrics = evaluate(model, data["valid"], args.seed + 1, gold_parse=gold_parse)
            model.train()
            curves["eval_step"].append(step)
            for key in ("accuracy", "arc_precision", "arc_recall"):
                curves[key].append(metrics[key])
            bar.set_postfix(acc=f"{metrics['accuracy']:.2f}", prec=f"{metrics['arc_precision']:.2f}")
    return model, curves


# ------------------------------------------------------------------------------------------
# figure
# ------------------------------------------------------------------------------------------
def flat_parse_precision(split: dict) -> float:
    """Arc precision (= recall) of the flat parse that hangs every vertex from the first token: a reference level."""
    vertex = torch.arange(split["heads"].shape[1])
    real = (vertex >= 1) & (vertex <= split["size"][:, None])
    hits = (real & (split["heads"] == 1)).sum() + (real & (vertex == 1)).sum()  # ROOT -> 1 is always right
    return hits.item() / real.sum().item()


def plot(path, curves, title: str, flat: float):
    plt = _common.pyplot()

    fig, axes = plt.subplots(1, 4, figsize=(17, 3.9))
    for m, c in curves.items():
        style = {"color": "k"} if m == GOLD else {}
        label = f"{m} (reference)" if m == GOLD else m
        axes[0].plot(c["step"], _common.smooth(c["loss"], 50), "--" if m == GOLD else "-", label=label, **style)
        axes[1].plot(c["eval_step"], c["accuracy"], "o--" if m == GOLD else "o-", ms=3, label=label, **style)
        if m != GOLD:
            axes[2].plot(c["eval_step"], c["arc_precision"], "o-", ms=3, label=m)
            axes[3].plot(c["eval_step"], c["arc_recall"], "o-", ms=3, label=m)
    for ax in axes[2:]:
        ax.axhline(flat, color="0.5", ls=":", label="flat parse")
    axes[0].set(xlabel="step", ylabel="cross-entropy (train, smoothed)", title="training loss")
    axes[1].set(xlabel="step", ylabel="accuracy (valid)", title="value accuracy", ylim=(0, 1.01))
    axes[2].set(xlabel="step", ylabel="precision (valid, hard sample)", title="arc precision", ylim=(0, 1.01))
    axes[3].set(xlabel="step", ylabel="recall (valid, hard sample)", title="arc recall", ylim=(0, 1.01))
    axes[1].legend(fontsize=8)
    axes[3].legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    _common.save_figure(fig, path)


# ------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = _common.argument_parser(__doc__)
    size = p.add_mutually_exclusive_group()
    size.add_argument(
        "--paper", action="store_true", help="paper-scale: 90k/5k/10k expressions of up to 50 tokens, 30k steps"
    )
    size.add_argument("--tiny", action="store_true", help="a seconds-long smoke test")
    d = CONFIGS["default"]
    p.add_argument("--train", type=int, help=f"training expressions (default {d['train']})")
    p.add_argument("--valid", type=int, help=f"validation expressions (default {d['valid']})")
    p.add_argument("--test", type=int, help=f"test expressions (default {d['test']})")
    p.add_argument("--steps", type=int, help=f"training steps per method (default {d['steps']})")
    p.add_argument("--max-len", type=int, help=f"most tokens in an expression (default {d['max_len']})")
    p.add_argument("--hidden", type=int, help=f"width of the encoder and classifier (default {d['hidden']})")
    p.add_argument("--max-depth", type=int, default=3, help="most nested operators")
    p.add_argument("--max-args", type=int, default=4, help="most arguments of an operator (at least 2)")
    p.add_argument("--p-nest", type=float, default=0.3, help="probability that an argument is an expression")
    p.add_argument("--rounds", type=int, help="message-passing rounds (default: max depth + 2)")
    p.add_argument("--batch-size", type=int, default=64, help="largest batch (batches hold one length each)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak Adam learning rate (one-cycle schedule)")
    p.add_argument("--tau", type=float, default=1.0, help="temperature of every SST")
    p.add_argument("--eval-every", type=int, default=100, help="steps between validation evaluations")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument(
        "--no-reference", action="store_true", help=f"skip the reference run ({GOLD}: the classifier on the true parse)"
    )
    p.add_argument("--free-root", action="store_true", help="let ROOT head any vertex, not only the first token")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the generated data cache")
    _common.add_run_arguments(p, "listops_parsing", tiny=False)
    p.set_defaults(threads=1)
    args = p.parse_args(argv)
    config = CONFIGS["paper" if args.paper else "tiny" if args.tiny else "default"]
    for name, value in config.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.rounds is None:
        args.rounds = args.max_depth + 2
    if args.tiny:
        args.eval_every = 2
    if args.max_args < 2:
        p.error(f"--max-args: expected at least 2, got {args.max_args}")
    if args.max_len < args.max_args + 2:
        p.error(
            f"--max-len: expected at least max-args + 2 = {args.max_args + 2} (one flat expression), got {args.max_len}"
        )
    if not 0.0 <= args.p_nest < 1.0:
        p.error(f"--p-nest: expected a probability in [0, 1), got {args.p_nest}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    out, _ = _common.start_run(args)
    data = load_data(args, out.parent / "data")
    test = data["test"]
    lengths = data["train"]["length"].float()
    print(
        f"ListOps (MIN/MAX/MED), depth <= {args.max_depth}, 2..{args.max_args} arguments, p_nest={args.p_nest}: "
        f"train lengths {int(lengths.min())}..{int(lengths.max())} tokens (mean {lengths.mean():.1f}); "
        f"e.g. {to_text(test, 0)} -> {int(test['value'][0])}"
    )
    majority = torch.bincount(test["value"], minlength=10).max().item() / len(test["value"])
    results, curves = {}, {}
    for method in args.methods + ([] if args.no_reference else [GOLD]):
        start = time.perf_counter()
        model, curves[method] = train(method, data, args)
        model.eval()
        results[method] = evaluate(model, test, args.seed + 2, gold_parse=method == GOLD)
        results[method]["train_seconds"] = time.perf_counter() - start
    rows = [
        [m, r["accuracy"], r["hard_accuracy"], r["arc_precision"], r["arc_recall"], r["train_seconds"]]
        for m, r in results.items()
    ]
    title = (
        f"ListOps parsing, {args.train}/{args.valid}/{args.test} expressions of <= {args.max_len} tokens, "
        f"{args.steps} steps, tau={args.tau}; test accuracy (majority class {majority:.3f}) and arc precision/recall of a hard sample"
    )
    flat = flat_parse_precision(test)
    rows.append(["flat parse (reference)", "-", "-", flat, flat, "-"])
    columns = ["method", "accuracy", "accuracy (hard sample)", "arc precision", "arc recall", "train s"]
    print(_common.format_table(columns, rows, title))
    plot(out, curves, title, flat)
    return _common.finish_run(args, out, {m: r for m, r in results.items() if m != GOLD})


if __name__ == "__main__":
    main()
