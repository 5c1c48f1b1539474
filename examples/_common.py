"""Small helpers shared by the example scripts: seeding, output paths, tables, JSON, progress bars."""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

#: Where the examples write their figures (and cached data) unless told otherwise.
OUT_DIR = Path(__file__).resolve().parent / "out"


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a torch.Generator seeded the same way."""
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002  (the examples seed the legacy global generator third-party code draws from)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def progress(iterable, desc: str, quiet: bool = False, **kwargs):
    """A tqdm progress bar (silent with ``quiet``)."""
    return tqdm(iterable, desc=desc, disable=quiet, dynamic_ncols=True, leave=False, **kwargs)


def train_classifier(model, x, labels, test, evaluate, args, gen, desc: str, metrics) -> dict:
    """Adam on the cross-entropy of ``model(x[idx], gen)`` over random minibatches, with ``evaluate(model, *test)``
    every ``args.eval_every`` steps; returns the curves (steps, losses, and each of ``metrics``)."""
    import torch.nn.functional as F

    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    curves = {"step": [], "loss": [], "eval_step": [], **{m: [] for m in metrics}}
    for step in progress(range(1, args.steps + 1), desc, args.quiet):
        idx = torch.randint(len(x), (args.batch_size,), generator=gen)
        loss = F.cross_entropy(model(x[idx], gen), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        curves["step"].append(step)
        curves["loss"].append(loss.item())
        if step % args.eval_every == 0 or step == args.steps:
            curves["eval_step"].append(step)
            for key, value in evaluate(model, *test).items():
                curves[key].append(value)
    return curves


def format_table(columns: list[str], rows: list[list], title: str | None = None) -> str:
    """A plain-text table (Markdown pipe syntax) with numbers formatted to 4 significant digits."""

    def cell(v):
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.1f}"
        return str(v)

    body = [[cell(v) for v in row] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in body)) for i, c in enumerate(columns)]
    line = lambda r: "| " + " | ".join(v.ljust(w) for v, w in zip(r, widths)) + " |"
    out = [line(columns), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in body]
    return "\n".join(([title, ""] if title else []) + out)


def write_json(path, obj) -> None:
    """Write ``obj`` as indented JSON, creating the parent folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def prepare_out(path) -> Path:
    """The figure path as a Path, with its folder created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def smooth(values, width: int = 25) -> np.ndarray:
    """A trailing moving average, for noisy learning curves."""
    values = np.asarray(values, dtype=float)
    if len(values) < 2 or width <= 1:
        return values
    cums = np.cumsum(np.insert(values, 0, 0.0))
    idx = np.arange(1, len(values) + 1)
    lo = np.maximum(idx - width, 0)
    return (cums[idx] - cums[lo]) / (idx - lo)


#: torch intra-op threads of the examples unless --threads says otherwise (see its help).
DEFAULT_THREADS = 1


def _positive_int(text):
    import argparse

    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def apply_threads(args) -> None:
    """Set torch's intra-op thread count from --threads (default ``DEFAULT_THREADS``)."""
    torch.set_num_threads(getattr(args, "threads", None) or DEFAULT_THREADS)


def add_run_arguments(parser, name: str, tiny: bool = True) -> None:
    """The options every example takes: --seed, --tiny, --out, --json, --threads, --quiet."""
    parser.add_argument("--seed", type=int, default=0)
    if tiny:
        parser.add_argument("--tiny", action="store_true", help="a seconds-long smoke test")
    parser.add_argument("--out", default=str(OUT_DIR / f"{name}.png"), help="PNG path")
    parser.add_argument("--json", help="write the results as JSON here")
    parser.add_argument(
        "--threads",
        type=_positive_int,
        default=DEFAULT_THREADS,
        help="torch CPU threads. Default 1: these models are small, and on a machine whose cores are "
        "busy with other work a second intra-op thread waits for a core at every operation, which "
        "can make a run ten times slower; raise it on an idle machine with cores to spare",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def start_run(args):
    """Apply --threads, create the figure's folder and seed everything; returns (figure path, generator)."""
    apply_threads(args)
    return prepare_out(args.out), seed_everything(args.seed)


def finish_run(args, out, results: dict) -> dict:
    """Say where the figure went and write --json; returns the results."""
    print(f"figure: {out}")
    if args.json:
        write_json(args.json, results)
        print(f"results: {args.json}")
    return results


def argument_parser(doc: str) -> argparse.ArgumentParser:
    """An argument parser described by the first paragraph of a script's docstring, showing defaults."""
    return argparse.ArgumentParser(
        description=doc.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (the examples write figures, they never open windows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path, dpi: int = 80, rect=None) -> None:
    """Lay out ``fig`` (within ``rect`` when given), write it to ``path`` and release it."""
    import matplotlib.pyplot as plt

    if rect is None:
        fig.tight_layout()
    else:
        fig.tight_layout(rect=rect)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
