"""``sstcvx bench``: sweep sizes, batch sizes and temperatures of every family; JSON and PNG plots.

For each registered family (:mod:`sstcvx.families`) and each of its default
regularizers, three sweeps of :func:`sstcvx.compare`:

* ``n``: time of both paths against the size n at a fixed batch (the generic path
  only up to the family's ``max_generic_n``, and for ``exp_family_entropy`` only
  where the vertex list exists);
* ``batch``: time against the batch size at the default n (the generic path only
  up to a capped batch size: it costs milliseconds per instance);
* ``tau``: the difference between the paths against the temperature.

Writes ``bench.json`` (every configuration's figures, plus the settings) and
``time_vs_n.png``, ``time_vs_batch.png``, ``error_vs_tau.png`` into the output
directory.  Plots need matplotlib (the Agg backend; no display).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import sys
import time
import warnings
from typing import Any

import torch

from ..families import families as registered_families
from ..families import load_errors
from .compare import compare
from .progress import progress_bar
from .report import ComparisonReport

SETTINGS: dict[str, dict[str, Any]] = {
    "quick": {
        "batch": 8,
        "max_generic_batch": 8,
        "batches": (1, 8, 64, 512),
        "repeats": 1,
        "taus": (0.1, 0.3, 1.0, 3.0),
        "sizes": "quick_sizes",
    },
    "full": {
        "batch": 16,
        "max_generic_batch": 64,
        "batches": (1, 4, 16, 64, 256, 1024),
        "repeats": 3,
        "taus": (0.03, 0.1, 0.3, 1.0, 3.0, 10.0),
        "sizes": "sizes",
    },
}
_FLOOR = 1e-17  # zero differences are drawn here on log axes


def _tasks(families, settings):
    """[(family, regularizer, sweep, value)] in run order."""
    tasks = []
    for family in families:
        for reg in family.regularizers:
            for n in getattr(family, settings["sizes"]):
                tasks.append((family, reg, "n", n))
            for b in settings["batches"]:
                tasks.append((family, reg, "batch", b))
            tasks.append((family, reg, "tau", tuple(settings["taus"])))
    return tasks


def speedup_report(cases, batches=(1, 32, 256), tau=0.5, max_generic_batch=32, repeats=3, backend="cvxpylayers"):
    """The specialized solver against the generic path on the same utilities, for benchmark scripts.

    ``cases``: ``(P, regularizer)`` pairs; each is compared at every batch size with
    :func:`sstcvx.compare` (reference ``"specialized"``), the generic path running on at most
    ``max_generic_batch`` rows of the batch on the given ``backend`` (``"cvxpylayers"``,
    ``"fast"`` or ``"generic"``).  The report's ``speedup`` columns are per-instance ratios; its
    ``max|dX|`` and ``max|dVJP|`` the agreement.  Returns one :class:`ComparisonReport`.
    """
    report = ComparisonReport()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for P, regularizer in cases:
            for batch in batches:
                report = report + compare(
                    P,
                    regularizer,
                    tau=tau,
                    batch=batch,
                    repeats=repeats,
                    reference="specialized",
                    max_generic_batch=max_generic_batch,
                    generic_backend=backend,
                    hard=False,
                )
    return report


def _run_generic(family, reg, P, n):
    """Whether the generic path is run at this size (and why not)."""
    if n > family.max_generic_n:
        return False, f"n > {family.max_generic_n}"
    if reg == "exp_family_entropy":
        try:
            if P.vertices is None:
                return False, "no vertex list (the generic exp_family_entropy is a problem over the vertex weights)"
        except Exception as error:
            return False, f"vertex enumeration failed ({error})"
    return True, ""


def run_bench(out_dir="bench_out", quick: bool = False, families=None, progress: bool = True, echo=print) -> dict:
    """Run the sweeps, write ``bench.json`` and the PNG plots into ``out_dir``; return the JSON data."""
    registered = registered_families()

    mode = "quick" if quick else "full"
    settings = SETTINGS[mode]
    names = list(families) if families is not None else list(registered)
    available = [registered[name] for name in names if name in registered]
    skipped = {name: "not registered" for name in names if name not in registered}
    skipped.update({f"package {name}": error for name, error in load_errors().items()})

    os.makedirs(out_dir, exist_ok=True)
    echo(
        f"sstcvx bench ({mode}): {len(available)} families, torch {torch.__version__} with "
        f"{torch.get_num_threads()} threads, float64, median of {settings['repeats']} timed run(s) after a warm-up"
    )
    echo(
        f"the generic path runs on at most {settings['max_generic_batch']} rows per call (larger batches: "
        "specialized path only) and only up to each family's max_generic_n: "
        + ", ".join(f"{f.name} n<={f.max_generic_n}" for f in available)
    )
    for name, why in skipped.items():
        echo(f"skipped {name}: {why}")
    load = _load_average()
    if torch.get_num_threads() > 1:
        echo(
            f"note: {torch.get_num_threads()} torch threads, load average {load if load is not None else '?'} on "
            f"{os.cpu_count()} CPUs; when another process holds a core, a torch thread waiting for it stalls "
            "a microsecond call for milliseconds: --threads 1 gives steadier times for the fast solvers"
        )

    tasks = _tasks(available, settings)
    records = []
    cache = {}
    start = time.perf_counter()
    bar = _progress(len(tasks), progress)
    try:
        for family, reg, sweep, value in tasks:
            bar.set_description(f"{family.name}/{reg}/{sweep}")
            n = value if sweep == "n" else family.n
            key = (family.name, n)
            record = {"family": family.name, "regularizer": reg, "sweep": sweep, "n": n}
            try:
                if key not in cache:  # one polytope per (family, n): the generic layer is built once
                    cache[key] = family(n)
                P = cache[key]
                run_generic, why = _run_generic(family, reg, P, n)
                batch = value if sweep == "batch" else settings["batch"]
                if sweep == "batch" and batch > settings["max_generic_batch"]:
                    run_generic, why = False, f"batch > {settings['max_generic_batch']}"
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", DeprecationWarning)
                    warnings.simplefilter("ignore", FutureWarning)
                    report = compare(
                        P,
                        reg,
                        tau=list(value) if sweep == "tau" else 1.0,
                        batch=batch,
                        repeats=settings["repeats"],
                        max_generic_batch=settings["max_generic_batch"],
                        generic=run_generic,
                        hard=(sweep == "tau"),
                        seed=0,
                    )
                record["generic_skipped"] = why or None
                record["configurations"] = [dataclasses.asdict(r) for r in report]
            except Exception as error:
                record["error"] = f"{type(error).__name__}: {error}"
            records.append(record)
            bar.update(1)
    finally:
        bar.close()
    elapsed = time.perf_counter() - start

    data = {
        "format": "sstcvx.bench/1",
        "mode": mode,
        "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()},
        "families": {
            f.name: {"regularizers": list(f.regularizers), "n": f.n, "max_generic_n": f.max_generic_n}
            for f in available
        },
        "skipped": skipped,
        "machine": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "load_average_before": load,
            "load_average_after": _load_average(),
        },
        "seconds": round(elapsed, 1),
        "records": records,
    }
    json_path = os.path.join(out_dir, "bench.json")
    with open(json_path, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=1, allow_nan=False)
        fh.write("\n")

    for line in summary(data):
        echo(line)
    written = [json_path]
    try:
        written += plot(data, out_dir)
    except ImportError as error:
        echo(f"plots skipped: {error} (pip install matplotlib)")
    echo(f"done in {elapsed:.0f} s; wrote " + ", ".join(written))
    return data


def _load_average():
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def _progress(total, enabled):
    return progress_bar(total, enabled, unit="config")


# ----------------------------------------------------------------------------------------------
# reading the records
# ----------------------------------------------------------------------------------------------


def _rows(data, sweep):
    for record in data["records"]:
        if record["sweep"] == sweep and "configurations" in record:
            for row in record["configurations"]:
                yield record, row


def summary(data) -> list:
    """Text lines: per family and regularizer at its default n and tau = 1, the per-instance times and errors."""
    lines = [
        f"{'family':<14}{'regularizer':<20}{'n':>5}{'generic ms/inst':>17}{'specialized ms/inst':>21}"
        f"{'speedup':>10}{'fwd+bwd':>10}{'max|dX|':>10}{'max|dVJP|':>10}{'hard=':>7}"
    ]
    lines.append("-" * len(lines[0]))
    for record, row in _rows(data, "tau"):
        if row["tau"] != 1.0:
            continue

        def per(t, b):
            return "-" if t is None or not b else f"{t / b * 1e3:.4g}"

        def ratio(v):
            return "-" if v is None else f"{v:.3g}x" if v < 1000 else f"{v:.0f}x"

        def sci(v):
            return "-" if v is None else f"{v:.1e}"

        lines.append(
            f"{record['family']:<14}{row['regularizer']:<20}{record['n']:>5}"
            f"{per(row['time_generic'], row['generic_batch']):>17}{per(row['time_reference'], row['batch']):>21}"
            f"{ratio(row['speedup']):>10}{ratio(row['speedup_backward']):>10}{sci(row['max_abs_diff']):>10}"
            f"{sci(row['max_abs_grad_diff']):>10}"
            f"{'-' if row['hard_agreement'] is None else format(row['hard_agreement'], '.0%'):>7}"
        )
    failures = sum(row["failures"] for record in data["records"] for row in record.get("configurations", []))
    errors = [r for r in data["records"] if "error" in r]
    if failures or errors:
        lines.append(f"{failures} solver failure(s) counted, {len(errors)} configuration(s) raised; see bench.json")
    return lines


def plot(data, out_dir) -> list:
    """Write the three PNG figures; returns their paths.  Raises ImportError without matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = list(data["families"])
    if not families:
        return []
    cols = min(3, len(families))
    rows_ = (len(families) + cols - 1) // cols
    colors = {"entropy": "C0", "binary_entropy": "C1", "euclidean": "C2", "exp_family_entropy": "C3"}
    paths = []

    def figure(title):
        fig, axes = plt.subplots(rows_, cols, figsize=(4.6 * cols, 3.6 * rows_), squeeze=False)
        fig.suptitle(title, fontsize=11)
        for ax in axes.flat[len(families) :]:
            ax.axis("off")
        return fig, dict(zip(families, axes.flat))

    def ticks(ax, values):
        """Plain tick labels at the swept values (log axes otherwise print 3x10^0)."""
        from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

        values = sorted(set(values))
        if values:
            ax.xaxis.set_major_locator(FixedLocator(values))
            ax.xaxis.set_minor_locator(NullLocator())
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.tick_params(axis="x", labelsize=7)

    def finish(fig, name):
        fig.tight_layout(rect=(0, 0, 1, 0.95))
        path = os.path.join(out_dir, name)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)

    cap = data["settings"]["max_generic_batch"]

    # time against n: per-instance forward time at a fixed batch
    fig, axes = figure(
        f"forward time per instance vs size n (batch {data['settings']['batch']}; solid: specialized, dashed: generic)"
    )
    for family in families:
        ax = axes[family]
        for reg in data["families"][family]["regularizers"]:
            sized = [
                (rec["n"], row)
                for rec, row in _rows(data, "n")
                if rec["family"] == family and row["regularizer"] == reg
            ]
            spec = [(n, r["time_reference"] / r["batch"] * 1e3) for n, r in sized if r["time_reference"]]
            gen = [(n, r["time_generic"] / r["generic_batch"] * 1e3) for n, r in sized if r["time_generic"]]
            if spec:
                ax.plot(*zip(*spec), "-s", color=colors.get(reg), ms=3, label=f"{reg} (specialized)")
            if gen:
                ax.plot(*zip(*gen), "--o", color=colors.get(reg), ms=3, label=f"{reg} (generic)")
        ax.set(xscale="log", yscale="log", title=family, xlabel="n", ylabel="ms per instance")
        ticks(ax, [rec["n"] for rec in data["records"] if rec["family"] == family and rec["sweep"] == "n"])
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=6)
    finish(fig, "time_vs_n.png")

    # time against batch size: time of one call on the whole batch
    fig, axes = figure(f"forward time per call vs batch size (default n; generic path capped at batch {cap})")
    for family in families:
        ax = axes[family]
        for reg in data["families"][family]["regularizers"]:
            pts = [row for rec, row in _rows(data, "batch") if rec["family"] == family and row["regularizer"] == reg]
            spec = [(r["batch"], r["time_reference"] * 1e3) for r in pts if r["time_reference"]]
            gen = [(r["generic_batch"], r["time_generic"] * 1e3) for r in pts if r["time_generic"]]
            if spec:
                ax.plot(*zip(*spec), "-s", color=colors.get(reg), ms=3, label=f"{reg} (specialized)")
            if gen:
                ax.plot(*zip(*gen), "--o", color=colors.get(reg), ms=3, label=f"{reg} (generic)")
        ax.set(
            xscale="log",
            yscale="log",
            title=f"{family} (n={data['families'][family]['n']})",
            xlabel="batch size",
            ylabel="ms per call",
        )
        ticks(ax, data["settings"]["batches"])
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=6)
    finish(fig, "time_vs_batch.png")

    # error against tau
    fig, axes = figure("max |generic - reference| vs temperature (solid: X_tau, dotted: VJP; 1e-17 = exact)")
    for family in families:
        ax = axes[family]
        for reg in data["families"][family]["regularizers"]:
            pts = [row for rec, row in _rows(data, "tau") if rec["family"] == family and row["regularizer"] == reg]
            err = [(r["tau"], max(r["max_abs_diff"], _FLOOR)) for r in pts if r["max_abs_diff"] is not None]
            grad = [(r["tau"], max(r["max_abs_grad_diff"], _FLOOR)) for r in pts if r["max_abs_grad_diff"] is not None]
            if err:
                ax.plot(*zip(*err), "-o", color=colors.get(reg), ms=3, label=f"{reg} X_tau")
            if grad:
                ax.plot(*zip(*grad), ":", color=colors.get(reg), label=f"{reg} VJP")
        ax.set(
            xscale="log",
            yscale="log",
            title=f"{family} (n={data['families'][family]['n']})",
            xlabel="tau",
            ylabel="max abs difference",
        )
        ticks(ax, data["settings"]["taus"])
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=6)
    finish(fig, "error_vs_tau.png")
    return paths
