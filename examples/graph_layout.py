"""Neural relational inference on graph layout: recover a latent spanning tree from motion.

The graph-layout experiment of Paulus et al. (NeurIPS 2020, §8.2), after the neural
relational inference (NRI) model of Kipf et al. (ICML 2018), at a scale two CPU cores run
in minutes.

Data.  A random spanning tree of K_n (n = 10) is the maximum spanning tree under i.i.d.
Gumbel(0, 1) edge weights, i.e. the hard sample of ``polytopes.SpanningTree`` with
theta = 0.  Its n vertices start at standard-normal positions in the plane and
networkx's force-directed ``spring_layout`` (Fruchterman-Reingold) moves them one
iteration at a time; the T frames after iterations 1..T form a trajectory.  Coordinates
are standardised once, with the training set's mean and standard deviation (not per
frame: spring_layout's own per-call rescaling is switched off, see ``simulate``).

Model.  A variational auto-encoder with a latent edge set:

* encoder: a graph network on the fully connected graph maps a trajectory to one logit
  theta_e per undirected edge (NRI's encoder, plus each pair's relative trajectory);
* latent: U = theta + Gumbel noise, relaxed to X_tau by a stochastic softmax trick on
  one of three polytopes (below);
* decoder: a graph network predicts frame t+1 from frame t; every vertex pair exchanges a
  message (the layout's repulsion) and pair e adds X_tau[e] times a second message (the
  attraction along tree edges); pair features include d / |d|^2 and d |d| (d the
  displacement), the shapes of the two forces, which speeds learning several-fold;
  Gaussian likelihood with a fixed scale sigma;
* KL term on the utilities, KL(Gumbel(theta, 1) || Gumbel(0, 1)) summed over edges.

Latent structures compared (all through ``sstcvx.sample``):

* ``spanning_tree``: ``SpanningTree(n)``, exponential-family entropy (Matrix-Tree marginals);
* ``topk``: ``KSubset(n(n-1)/2, n-1)``, exponential-family entropy: n-1 edges, any shape;
* ``independent``: ``Hypercube(n(n-1)/2)``, binary entropy (sigmoid): independent edges.

Reported on held-out trajectories: the ELBO (per trajectory, one relaxed sample, as in
training), and the edge precision and recall of one hard sample X = argmax_P <U, x> per
trajectory against the true tree (pooled over the test set).

Run ``python examples/graph_layout.py`` (quick default), ``--full`` for the paper's
sizes (50,000 / 10,000 / 10,000 trajectories), ``--tiny`` for a smoke test.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

try:
    import networkx as nx
except ImportError:  # one line instead of a traceback: the only dependency the library does not need
    raise SystemExit(
        "graph_layout.py needs networkx: pip install networkx  (or pip install -e '.[examples]')"
    ) from None
import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common

import polytopes
import sstcvx

METHODS = {
    # name: (polytope factory on n vertices, regularizer)
    "spanning_tree": (lambda n: polytopes.SpanningTree(n), "exp_family_entropy"),
    "topk": (lambda n: polytopes.KSubset(n * (n - 1) // 2, n - 1), "exp_family_entropy"),
    "independent": (lambda n: polytopes.Hypercube(n * (n - 1) // 2), "binary_entropy"),
}

#: Bumped whenever ``simulate`` changes, so that stale caches are not read.
DATA_VERSION = 2

SIZES = {  # (train, valid, test, steps)
    "default": (2000, 200, 500, 2000),
    "full": (50_000, 10_000, 10_000, 50_000),
    "tiny": (24, 8, 8, 4),
}


# ------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------
def simulate(count: int, n: int, frames: int, seed: int, quiet: bool = False):
    """``count`` spring-layout trajectories of random spanning trees of K_n.

    Returns ``(positions (count, frames, n, 2) float32, trees (count, n(n-1)/2) float32)``,
    edges in ``torch.triu_indices(n, n, 1)`` order.  Cost: ``count * frames`` calls of
    ``networkx.spring_layout`` (about 1.5 ms each).
    """
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    E = n * (n - 1) // 2
    # A uniform-Gumbel maximum spanning tree is the stochastic argmax with theta = 0.
    trees = sstcvx.sample(polytopes.SpanningTree(n), torch.zeros(count, E), mode="hard", generator=gen)
    edges = torch.triu_indices(n, n, 1).T.tolist()
    positions = np.empty((count, frames, n, 2), dtype=np.float32)
    for b in _common.progress(range(count), "simulating layouts", quiet):
        graph = nx.Graph()
        graph.add_nodes_from(range(n))
        graph.add_edges_from(e for e, on in zip(edges, trees[b].tolist()) if on)
        pos = dict(enumerate(rng.standard_normal((n, 2))))
        for t in range(frames):
            # scale=None: no re-centring and rescaling to [-1, 1] after each call, which would add a
            # global contraction that has nothing to do with the tree (and that the edges then learn).
            pos = nx.spring_layout(graph, pos=pos, iterations=1, seed=0, scale=None)
            positions[b, t] = [pos[v] for v in range(n)]
    return torch.from_numpy(positions), trees.float()


def load_data(args, cache_dir: Path):
    """Train/valid/test splits, simulated once per configuration and cached as a .pt file."""
    sizes = (args.train, args.valid, args.test)
    path = (
        cache_dir
        / f"graph_layout_v{DATA_VERSION}_n{args.vertices}_T{args.frames}_{'_'.join(map(str, sizes))}_s{args.seed}.pt"
    )
    if path.exists() and not args.no_cache:
        return torch.load(path)
    x, trees = simulate(sum(sizes), args.vertices, args.frames, args.seed, args.quiet)
    a, b = sizes[0], sizes[0] + sizes[1]
    mean, std = x[:a].mean(dim=(0, 1, 2)), x[:a].std()
    x = (x - mean) / std
    data = {"train": (x[:a], trees[:a]), "valid": (x[a:b], trees[a:b]), "test": (x[b:], trees[b:])}
    if not args.no_cache:
        cache_dir.mkdir(parents=True, exist_ok=True)
        torch.save(data, path)
    return data


# ------------------------------------------------------------------------------------------
# model
# ------------------------------------------------------------------------------------------
def mlp(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(d_in, hidden), nn.ELU(), nn.Linear(hidden, hidden), nn.ELU(), nn.Linear(hidden, d_out)
    )


class FullGraph:
    """Index bookkeeping of K_n: ordered pairs (arcs) s -> r and their undirected edge."""

    def __init__(self, n: int):
        s, r = torch.where(~torch.eye(n, dtype=torch.bool))
        self.senders, self.receivers = s, r
        edge_id = torch.full((n, n), -1, dtype=torch.long)
        iu = torch.triu_indices(n, n, 1)
        edge_id[iu[0], iu[1]] = edge_id[iu[1], iu[0]] = torch.arange(iu.shape[1])
        self.arc_edge = edge_id[s, r]  # (A,) undirected edge of each arc
        self.edges = iu.T  # (E, 2)
        # (n, A) incidence: sums the messages arriving at each vertex.
        self.incoming = torch.zeros(n, len(s))
        self.incoming[r, torch.arange(len(s))] = 1.0


class Encoder(nn.Module):
    """Trajectories ``(B, T, n, 2)`` -> one logit per undirected edge ``(B, E)``.

    NRI's MLP encoder (node -> edge -> node -> edge message passing on K_n), with the
    relative trajectory of each pair (displacement and distance at every frame) as an
    extra input of the first edge layer.
    """

    def __init__(self, graph: FullGraph, frames: int, hidden: int):
        super().__init__()
        self.g = graph
        self.node = mlp(2 * frames, hidden, hidden)
        self.pair = mlp(3 * frames, hidden, hidden)
        self.edge = mlp(3 * hidden, hidden, hidden)
        self.node2 = mlp(hidden, hidden, hidden)
        self.edge2 = mlp(3 * hidden, hidden, hidden)
        self.out = nn.Linear(hidden, 1)

    def forward(self, x):
        g = self.g
        h = self.node(x.transpose(1, 2).flatten(2))  # (B, n, H)
        d = x[:, :, g.receivers] - x[:, :, g.senders]  # (B, T, A, 2)
        pair = self.pair(torch.cat([d, d.norm(dim=-1, keepdim=True)], -1).transpose(1, 2).flatten(2))
        e = self.edge(torch.cat([h[:, g.senders], h[:, g.receivers], pair], -1))  # (B, A, H)
        v = self.node2(g.incoming @ e / (g.incoming.shape[0] - 1))  # mean of incoming arcs
        e = self.edge2(torch.cat([v[:, g.senders], v[:, g.receivers], e], -1))
        logits = self.out(e).squeeze(-1)  # (B, A), one per arc
        # Average the two arcs of each undirected edge: a symmetric logit.
        return logits.new_zeros(x.shape[0], len(g.edges)).index_add_(1, g.arc_edge, logits) / 2


class Decoder(nn.Module):
    """One layout step: positions ``(B, S, n, 2)`` and edge weights ``(B, E)`` -> next positions."""

    def __init__(self, graph: FullGraph, hidden: int):
        super().__init__()
        self.g = graph
        self.message = mlp(9, hidden, 2 * hidden)  # [every pair | along an edge]
        self.update = mlp(2 + hidden, hidden, 2)

    def forward(self, x, z):
        g = self.g
        d = x[..., g.receivers, :] - x[..., g.senders, :]  # (B, S, A, 2)
        r = d.norm(dim=-1, keepdim=True)
        # The two force laws of force-directed layout as features: repulsion ~ d / r^2, attraction ~ d r.
        feats = torch.cat([x[..., g.receivers, :], d, r, d / (r * r + 1e-3), d * r], -1)
        weight = z[:, g.arc_edge][:, None, :, None]  # (B, 1, A, 1)
        every_pair, along_edge = self.message(feats).chunk(2, dim=-1)
        messages = every_pair + weight * along_edge
        return x + self.update(torch.cat([x, g.incoming @ messages], -1))


def gumbel_kl(theta: torch.Tensor) -> torch.Tensor:
    """KL(Gumbel(theta, 1) || Gumbel(0, 1)) summed over the last dimension.

    With U = theta + G, G standard Gumbel: log q(U) - log p(U) = theta - exp(-G) + exp(-G - theta),
    and exp(-G) ~ Exponential(1) has mean 1, so the KL is theta + exp(-theta) - 1 per edge
    (>= 0, zero only at theta = 0).
    """
    return (theta + torch.exp(-theta) - 1).sum(-1)


class NRI(nn.Module):
    """Encoder, stochastic softmax trick on the latent polytope, decoder."""

    def __init__(self, method: str, n: int, frames: int, hidden: int, tau: float, sigma: float):
        super().__init__()
        make_polytope, self.regularizer = METHODS[method]
        self.P = make_polytope(n)
        graph = FullGraph(n)
        self.encoder, self.decoder = Encoder(graph, frames, hidden), Decoder(graph, hidden)
        self.tau, self.sigma = tau, sigma

    def log_likelihood(self, x, z):
        """log p(frames 2..T | frame 1, edges z) under N(decoder, sigma^2), per trajectory."""
        mean = self.decoder(x[:, :-1], z)
        resid = ((x[:, 1:] - mean) / self.sigma).flatten(1)
        return -0.5 * (resid**2).sum(-1) - resid.shape[1] * (math.log(self.sigma) + 0.5 * math.log(2 * math.pi))

    def elbo(self, x, generator=None):
        """One-sample ELBO per trajectory, relaxed latent; also returns theta."""
        theta = self.encoder(x)
        z = sstcvx.sample(self.P, theta, self.tau, self.regularizer, generator=generator)
        return self.log_likelihood(x, z) - gumbel_kl(theta), theta


# ------------------------------------------------------------------------------------------
# training and evaluation
# ------------------------------------------------------------------------------------------
def batches(count: int, batch_size: int, gen: torch.Generator):
    """Endless random mini-batch indices (reshuffled every epoch)."""
    while True:
        perm = torch.randperm(count, generator=gen)
        for i in range(0, count - batch_size + 1, batch_size):
            yield perm[i : i + batch_size]


@torch.no_grad()
def evaluate(model: NRI, x, trees, seed: int, batch_size: int = 256):
    """Held-out ELBO (mean per trajectory) and pooled precision/recall of hard samples."""
    gen = torch.Generator().manual_seed(seed)
    elbo, hits, picked, true = 0.0, 0.0, 0.0, 0.0
    for i in range(0, len(x), batch_size):
        xb, tb = x[i : i + batch_size], trees[i : i + batch_size]
        e, theta = model.elbo(xb, gen)
        hard = sstcvx.sample(model.P, theta, mode="hard", generator=gen)
        elbo += e.sum().item()
        hits += (hard * tb).sum().item()
        picked += hard.sum().item()
        true += tb.sum().item()
    return {"elbo": elbo / len(x), "edge_precision": hits / max(picked, 1.0), "edge_recall": hits / true}


def train(method: str, data, args):
    """Train one model; return it with its learning curves."""
    gen = _common.seed_everything(args.seed)
    x, _ = data["train"]
    model = NRI(method, args.vertices, args.frames, args.hidden, args.tau, args.sigma)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.steps)
    curves = {"step": [], "train_elbo": [], "valid_step": [], "valid_elbo": [], "valid_precision": []}
    index = batches(len(x), min(args.batch_size, len(x)), gen)
    bar = _common.progress(range(1, args.steps + 1), f"{method:>13}", args.quiet)
    for step in bar:
        elbo, _ = model.elbo(x[next(index)], gen)
        loss = -elbo.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        curves["step"].append(step)
        curves["train_elbo"].append(-loss.item())
        if step % args.eval_every == 0 or step == args.steps:
            model.eval()
            metrics = evaluate(model, *data["valid"], args.seed + 1)
            model.train()
            curves["valid_step"].append(step)
            curves["valid_elbo"].append(metrics["elbo"])
            curves["valid_precision"].append(metrics["edge_precision"])
            bar.set_postfix(elbo=f"{metrics['elbo']:.0f}", prec=f"{metrics['edge_precision']:.2f}")
    return model, curves


# ------------------------------------------------------------------------------------------
# figure
# ------------------------------------------------------------------------------------------
def plot(path, curves, example, results, n):
    """Learning curves, and the true tree next to each method's recovered tree on one test trajectory."""
    plt = _common.pyplot()

    x, tree, recovered = example
    methods = list(curves)
    fig = plt.figure(figsize=(4 * (1 + len(methods)), 7.5))
    ax = fig.add_subplot(2, 2, 1)
    for m in methods:
        ax.plot(curves[m]["step"], _common.smooth(curves[m]["train_elbo"]), label=f"{m} (train)")
        ax.plot(curves[m]["valid_step"], curves[m]["valid_elbo"], "o--", ms=3, label=f"{m} (valid)")
    ax.set(xlabel="step", ylabel="ELBO per trajectory", title="ELBO")
    lo = min(min(c["valid_elbo"]) for c in curves.values())
    hi = max(max(_common.smooth(c["train_elbo"])) for c in curves.values())
    ax.set_ylim(lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
    ax.legend(fontsize=7)
    ax = fig.add_subplot(2, 2, 2)
    for m in methods:
        ax.plot(curves[m]["valid_step"], curves[m]["valid_precision"], "o-", ms=3, label=m)
    ax.set(xlabel="step", ylabel="edge precision (valid, hard samples)", ylim=(0, 1.02), title="edge precision")
    ax.legend(fontsize=7)

    edges = torch.triu_indices(n, n, 1).T.tolist()
    final = x[-1].numpy()
    panels = [("true tree", tree)] + [(m, recovered[m]) for m in methods]
    for k, (name, z) in enumerate(panels):
        ax = fig.add_subplot(2, len(panels), len(panels) + k + 1)
        for v in range(n):
            ax.plot(x[:, v, 0].numpy(), x[:, v, 1].numpy(), "-", color="0.8", lw=1)
        for (i, j), on, true in zip(edges, z.tolist(), tree.tolist()):
            if on:
                ax.plot(*final[[i, j]].T, "-", color="tab:green" if true else "tab:red", lw=2)
        ax.scatter(*final.T, s=40, c="k", zorder=3)
        title = name if k == 0 else f"{name}: prec {results[name]['edge_precision']:.2f}"
        ax.set(title=title, xticks=[], yticks=[], aspect="equal")
    fig.suptitle("Graph layout: trajectories (grey), edges of a hard sample (green: true, red: false)")
    _common.save_figure(fig, path)


# ------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = _common.argument_parser(__doc__)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--full", action="store_true", help="the paper's sizes (50k/10k/10k trajectories, 50k steps)")
    size.add_argument("--tiny", action="store_true", help="a seconds-long smoke test")
    p.add_argument("--train", type=int, help=f"training trajectories (default {SIZES['default'][0]})")
    p.add_argument("--valid", type=int, help=f"validation trajectories (default {SIZES['default'][1]})")
    p.add_argument("--test", type=int, help=f"test trajectories (default {SIZES['default'][2]})")
    p.add_argument("--steps", type=int, help=f"training steps per method (default {SIZES['default'][3]})")
    p.add_argument("--vertices", type=int, default=10, help="vertices of K_n")
    p.add_argument("--frames", type=int, default=10, help="frames T per trajectory")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--hidden", type=int, default=32, help="width of the graph networks")
    p.add_argument("--lr", type=float, default=5e-3, help="Adam learning rate (cosine decay to 0)")
    p.add_argument("--tau", type=float, default=1.0, help="temperature of every SST")
    p.add_argument("--sigma", type=float, default=0.05, help="scale of the Gaussian likelihood")
    p.add_argument("--eval-every", type=int, default=100, help="steps between validation evaluations")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--no-cache", action="store_true", help="do not read or write the simulated data cache")
    _common.add_run_arguments(p, "graph_layout", tiny=False)
    args = p.parse_args(argv)
    defaults = SIZES["full" if args.full else "tiny" if args.tiny else "default"]
    for name, value in zip(("train", "valid", "test", "steps"), defaults):
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.tiny:
        args.hidden, args.frames, args.eval_every = 16, min(args.frames, 4), 2
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    _common.apply_threads(args)
    out = _common.prepare_out(args.out)
    data = load_data(args, out.parent / "data")
    results, curves, recovered = {}, {}, {}
    x_test, trees_test = data["test"]
    for method in args.methods:
        start = time.perf_counter()
        model, curves[method] = train(method, data, args)
        model.eval()
        results[method] = evaluate(model, x_test, trees_test, args.seed + 2)
        results[method]["train_seconds"] = time.perf_counter() - start
        with torch.no_grad():  # a hard sample for the first test trajectory, drawn for the figure
            theta = model.encoder(x_test[:1])
            recovered[method] = sstcvx.sample(
                model.P, theta, mode="hard", generator=torch.Generator().manual_seed(args.seed)
            )[0]
    rows = [[m, r["elbo"], r["edge_precision"], r["edge_recall"], r["train_seconds"]] for m, r in results.items()]
    title = (
        f"Graph layout, n={args.vertices}, T={args.frames}, {args.train}/{args.valid}/{args.test} trajectories, "
        f"{args.steps} steps, tau={args.tau}; held-out ELBO and hard-sample edge precision/recall"
    )
    print(_common.format_table(["method", "ELBO", "edge precision", "edge recall", "train s"], rows, title))
    plot(out, curves, (x_test[0], trees_test[0], recovered), results, args.vertices)
    return _common.finish_run(args, out, results)


if __name__ == "__main__":
    main()
