"""The lab's report: one :class:`LabRow` per estimator and setting, as a table, JSON, CSV and plots."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field

from ..report import csv_text, fixed_width_table, json_text


@dataclass
class LabRow:
    """The measurement of one estimator in one setting against the reference gradient g.

    With N samples (in groups of ``group_size``) of per-sample estimates G_k, mean m and
    per-sample covariance S:

    * ``bias_norm`` = ||m - g||, ``bias_ci`` its interval (the confidence ball of m - g,
      whose covariance is S / N plus the reference's), ``relative_bias`` = ||m - g|| / ||g||;
    * ``cosine`` = cos(m, g) with ``cosine_ci`` (delta method);
    * ``variance`` = tr S, the expected squared distance of one sample to its mean (``std``
      its square root);
    * ``mse`` = ||E G - g||^2 + tr S, one sample's expected squared error, with the squared
      bias estimated without the noise of m (||m - g||^2 - tr Cov(m - g), floored at 0);
    * ``seconds_per_sample``: wall time of the estimator calls / N;
    * ``samples_to_target``: the number n of samples whose average has root mean squared error
      ``target_error`` (absolute; the report's relative target times ||g||):
      n = variance / (target^2 - b^2) with b the lower end of ``bias_ci`` (the smallest bias
      the data allow, so n is optimistic for a biased estimator), ``None`` ("never") when even
      that bias exceeds the target.

    ``error`` holds the message when the estimator failed in this setting (then the metrics are None).
    """

    estimator: str
    tau: float | None = None
    regularizer: str | None = None
    baseline: str | None = None
    k: int | None = None
    samples: int = 0
    group_size: int = 1
    bias_norm: float | None = None
    bias_ci: list | None = None
    relative_bias: float | None = None
    cosine: float | None = None
    cosine_ci: list | None = None
    variance: float | None = None
    std: float | None = None
    mse: float | None = None
    seconds_per_sample: float | None = None
    samples_to_target: int | None = None
    target_error: float | None = None
    bias: list | None = None
    error: str | None = None

    @property
    def key(self) -> str:
        """A readable identifier: the name and the settings that are set."""
        parts = [self.estimator]
        if self.regularizer is not None:
            parts.append(self.regularizer)
        if self.tau is not None:
            parts.append(f"tau={self.tau:g}")
        if self.baseline is not None:
            parts.append(f"baseline={self.baseline}" + (f"(k={self.k})" if self.k else ""))
        return " | ".join(parts)

    @property
    def line(self) -> str:
        """The line this row belongs to in the plots against tau (the key without the temperature)."""
        parts = [self.estimator] + [p for p in (self.regularizer, self.baseline) if p is not None]
        return " ".join(parts)


def _fmt(v, spec=".3g"):
    return "-" if v is None else format(v, spec)


_COLUMNS = [  # (header, width, formatter)
    ("estimator", 17, lambda r: r.estimator),
    ("regularizer", 18, lambda r: r.regularizer or "-"),
    ("tau", 6, lambda r: _fmt(r.tau, "g")),
    ("baseline", 13, lambda r: (r.baseline or "-") + (f"/{r.k}" if r.k else "")),
    ("|bias|", 8, lambda r: _fmt(r.bias_norm)),
    ("bias CI", 17, lambda r: "-" if r.bias_ci is None else f"[{r.bias_ci[0]:.2g}, {r.bias_ci[1]:.2g}]"),
    ("rel.bias", 8, lambda r: _fmt(r.relative_bias, ".1%")),
    ("cosine", 7, lambda r: _fmt(r.cosine, ".3f")),
    ("std", 8, lambda r: _fmt(r.std)),
    ("MSE", 8, lambda r: _fmt(r.mse)),
    ("us/sample", 9, lambda r: "-" if r.seconds_per_sample is None else f"{r.seconds_per_sample * 1e6:.3g}"),
    (
        "N(target)",
        9,
        lambda r: "-" if r.error else ("never" if r.samples_to_target is None else str(r.samples_to_target)),
    ),
]


@dataclass
class LabReport:
    """The result of :func:`sstcvx.harness.lab.run_lab`.

    ``rows``: one :class:`LabRow` per estimator and setting; ``reference``: the reference
    gradient's summary (kind ``"exact"`` or ``"score_function"``, norm, radius, samples);
    ``reference_check``: where the exact gradient is known, the Monte Carlo reference's
    distance to it and its ball radius (``agrees``: distance <= radius); ``settings``: the
    run's arguments.  ``print(report)`` shows the table; :meth:`to_json`, :meth:`to_csv` and
    :meth:`plot` export it.
    """

    polytope: str
    loss: str
    noise: str
    theta: list
    confidence: float
    target_error: float
    reference: dict
    reference_check: dict | None = None
    rows: list = field(default_factory=list)
    settings: dict = field(default_factory=dict)

    def __iter__(self):
        return iter(self.rows)

    def __len__(self):
        return len(self.rows)

    def find(self, estimator: str, tau=None, regularizer=None, baseline=None) -> LabRow:
        """The row of ``estimator`` with the given settings (those left None are not matched)."""
        for r in self.rows:
            if r.estimator == estimator and all(
                want is None
                or (got is not None and (math.isclose(got, want) if isinstance(want, float) else got == want))
                for want, got in ((tau, r.tau), (regularizer, r.regularizer), (baseline, r.baseline))
            ):
                return r
        raise KeyError(f"no row for estimator={estimator!r}, tau={tau}, regularizer={regularizer}, baseline={baseline}")

    def table(self) -> str:
        """A fixed-width text table with a header line on the reference and footnotes."""
        ref = self.reference
        lines = [
            f"{self.polytope}, loss {self.loss}, noise {self.noise}; reference: {ref['kind']}"
            + (f" ({ref['samples']} samples, ball radius {ref['radius']:.2g})" if ref["kind"] != "exact" else "")
            + f", ||grad|| = {ref['norm']:.4g}"
        ]
        if self.reference_check:
            c = self.reference_check
            lines.append(
                f"Monte Carlo reference vs exact gradient: distance {c['distance']:.2g}, "
                f"{c['confidence']:.0%} ball radius {c['radius']:.2g} ({'agrees' if c['agrees'] else 'DISAGREES'})"
            )
        lines += fixed_width_table(_COLUMNS, self.rows, left_aligned=4)
        lines.append(
            f"|bias| = ||E[estimate] - grad|| with its {self.confidence:.0%} interval; std = sqrt(tr Cov) of one sample; "
            f"MSE = |bias|^2 + std^2 per sample; N(target): samples whose average reaches RMS error "
            f"{self.target_error:g} x ||grad|| if the bias is at its interval's low end (never: even that exceeds it)"
        )
        for r in self.rows:
            if r.error:
                lines.append(f"  error [{r.key}]: {r.error}")
        return "\n".join(lines)

    def __str__(self):
        return self.table()

    def to_dict(self) -> dict:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "rows"}
        data["results"] = [dict(dataclasses.asdict(r), key=r.key) for r in self.rows]
        return {"format": "sstcvx.lab/1", **data}

    def to_json(self, path=None, indent: int = 2) -> str:
        """The report as JSON (``results``: a list of rows with every :class:`LabRow` field); written to ``path`` if given."""
        return json_text(self.to_dict(), path, indent)

    def to_csv(self, path=None) -> str:
        """The rows as CSV (lists such as ``bias_ci`` as 'low;high')."""
        rows = []
        for r in self.rows:
            row = dict(dataclasses.asdict(r), key=r.key)
            for name, value in row.items():
                if isinstance(value, list):
                    row[name] = ";".join(f"{v:.6g}" for v in value)
            rows.append(row)
        return csv_text(["key"] + [f.name for f in dataclasses.fields(LabRow)], rows, path)

    def plot(self, path=None, title: str | None = None, axes=None):
        """Three panels against tau (log axes): |bias| (with its interval), std and MSE of one sample.

        One line per estimator and regularizer; estimators without a temperature (the score
        function) are horizontal dashed lines.  Writes a PNG to ``path`` and returns it, or,
        with ``axes`` (three matplotlib axes), draws into them and returns them (``path`` is
        then ignored).  Needs matplotlib (Agg backend when it makes the figure).
        """
        import matplotlib

        if axes is None:
            matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        ok = [r for r in self.rows if r.error is None]
        taus = sorted({r.tau for r in ok if r.tau is not None})
        lines = list(dict.fromkeys(r.line for r in ok))
        own = axes is None
        if own:
            if path is None:
                raise ValueError("path: expected a PNG path (or axes to draw into)")
            fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
            fig.suptitle(
                title or f"{self.polytope}, loss {self.loss}: estimators of grad E[L(X)] against tau", fontsize=11
            )
        positive = [v for r in ok for v in (r.bias_norm, r.std, r.mse) if v and v > 0]
        floor = 0.3 * min(positive) if positive else 1e-12  # where an interval reaching 0 ends on the log axis
        for index, name in enumerate(lines):
            color = f"C{index % 10}"
            rows = sorted((r for r in ok if r.line == name), key=lambda r: -1 if r.tau is None else r.tau)
            for ax, metric in zip(axes, ("bias_norm", "std", "mse")):
                values = [getattr(r, metric) for r in rows]
                if rows[0].tau is None:  # no temperature: a horizontal line
                    ax.axhline(max(values[0], floor), color=color, ls="--", lw=1.2, label=name)
                    continue
                x = [r.tau for r in rows]
                ax.plot(x, [max(v, floor) for v in values], "-o", ms=3, color=color, label=name)
                if metric == "bias_norm":
                    ax.fill_between(
                        x,
                        [max(r.bias_ci[0], floor) for r in rows],
                        [max(r.bias_ci[1], floor) for r in rows],
                        color=color,
                        alpha=0.15,
                        lw=0,
                    )
        labels = {
            "bias_norm": f"|bias| ({self.confidence:.0%} interval shaded; dashed: no tau)",
            "std": "std of one sample",
            "mse": "MSE of one sample",
        }
        for ax, metric in zip(axes, ("bias_norm", "std", "mse")):
            ax.set(
                xscale="log",
                yscale="log",
                xlabel="tau",
                ylabel={"bias_norm": "|bias|"}.get(metric, metric),
                title=labels[metric],
            )
            if taus:
                from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

                ax.xaxis.set_major_locator(FixedLocator(taus))
                ax.xaxis.set_minor_locator(NullLocator())
                ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.grid(True, which="major", alpha=0.3)
        axes[0].legend(fontsize=7)
        if not own:
            return axes
        fig.tight_layout(rect=(0, 0, 1, 0.94))
        directory = os.path.dirname(os.fspath(path))
        if directory:
            os.makedirs(directory, exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return os.fspath(path)
