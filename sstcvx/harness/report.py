"""The comparison report: one :class:`Comparison` per configuration, a :class:`ComparisonReport`
that prints as a table and converts to and from JSON and CSV.

The data model of :func:`sstcvx.compare` (``sstcvx.harness.compare``) and of ``sstcvx bench``.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from dataclasses import dataclass, field


def fixed_width_table(columns, rows, left_aligned: int) -> list[str]:
    """Lines of a text table: a header, a rule, one line per row.

    ``columns``: ``(header, width, formatter)`` triples, the formatter mapping a row to its cell
    text (cut to the width with a trailing ``~``); the first ``left_aligned`` columns are aligned
    left, the others right.
    """

    def line(cells):
        return " ".join(f"{t:<{w}}" if i < left_aligned else f"{t:>{w}}" for i, (t, w) in enumerate(cells))

    header = line((name, width) for name, width, _ in columns)
    lines = [header, "-" * len(header)]
    for row in rows:
        cells = []
        for _, width, formatter in columns:
            text = formatter(row)
            cells.append((text if len(text) <= width else text[: width - 1] + "~", width))
        lines.append(line(cells))
    return lines


@dataclass
class Comparison:
    """One configuration (polytope, regularizer, tau, batch) of a comparison.

    Differences are max / mean absolute entrywise differences between the generic
    path and the reference on the same utilities U (``*_grad_*``: of the
    vector-Jacobian products with the same random cotangent, i.e. the gradients
    of <G, X_tau(U)> with respect to U).  Times are medians in seconds of one call
    on the whole batch (``generic_batch`` rows for the generic path, ``batch`` for
    the others); ``*_backward`` times are forward + backward.  ``speedup`` is the
    generic path's time per instance over the reference's (forward), and
    ``speedup_backward`` the same for forward + backward.  ``None`` means not
    measured (see ``messages``).
    """

    polytope: str
    regularizer: str
    tau: float
    batch: int
    generic_batch: int
    size: int
    reference: str
    max_abs_diff: float | None = None
    mean_abs_diff: float | None = None
    max_abs_grad_diff: float | None = None
    mean_abs_grad_diff: float | None = None
    brute_force_max_abs_diff: float | None = None
    hard_agreement: float | None = None
    hard_is_vertex: bool | None = None
    time_generic: float | None = None
    time_generic_backward: float | None = None
    time_specialized: float | None = None
    time_specialized_backward: float | None = None
    time_reference: float | None = None
    time_reference_backward: float | None = None
    time_generic_argmax: float | None = None
    time_reference_argmax: float | None = None
    speedup: float | None = None
    speedup_backward: float | None = None
    build_time_generic: float | None = None
    warnings: int = 0
    failures: int = 0
    messages: list = field(default_factory=list)

    @property
    def key(self) -> str:
        """A readable identifier of the configuration."""
        return f"{self.polytope} | {self.regularizer} | tau={self.tau:g} | batch={self.batch}"


_COLUMNS = [  # (header, width, formatter)
    ("polytope", 26, lambda r: r.polytope),
    ("regularizer", 18, lambda r: r.regularizer),
    ("tau", 6, lambda r: f"{r.tau:g}"),
    ("batch", 6, lambda r: str(r.batch) if r.generic_batch == r.batch else f"{r.generic_batch}/{r.batch}"),
    ("reference", 13, lambda r: r.reference),
    ("max|dX|", 9, lambda r: _sci(r.max_abs_diff)),
    ("max|dVJP|", 9, lambda r: _sci(r.max_abs_grad_diff)),
    ("hard=", 6, lambda r: "-" if r.hard_agreement is None else f"{r.hard_agreement:.0%}"),
    ("vertex", 6, lambda r: "-" if r.hard_is_vertex is None else ("yes" if r.hard_is_vertex else "NO")),
    ("gen ms", 8, lambda r: _ms(r.time_generic)),
    ("ref ms", 8, lambda r: _ms(r.time_reference)),
    ("speedup", 8, lambda r: _ratio(r.speedup)),
    ("fwd+bwd", 8, lambda r: _ratio(r.speedup_backward)),
    ("build ms", 8, lambda r: _ms(r.build_time_generic)),
    ("warn/fail", 9, lambda r: f"{r.warnings}/{r.failures}"),
]


def _sci(v):
    return "-" if v is None else f"{v:.1e}"


def _ms(v):
    return "-" if v is None else (f"{v * 1e3:.3g}" if v * 1e3 < 100 else f"{v * 1e3:.0f}")


def _ratio(v):
    return "-" if v is None else (f"{v:.3g}x" if v < 1000 else f"{v:.0f}x")


@dataclass
class ComparisonReport:
    """The result of :func:`compare`: one :class:`Comparison` per configuration.

    ``str(report)`` (or ``print(report)``) is a table; :meth:`to_json` /
    :meth:`from_json` and :meth:`to_csv` export it.  Reports add up with ``+``.
    """

    rows: list = field(default_factory=list)

    def __iter__(self):
        return iter(self.rows)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]

    def __add__(self, other: ComparisonReport) -> ComparisonReport:
        return ComparisonReport(list(self.rows) + list(other.rows))

    @property
    def warnings(self) -> int:
        return sum(r.warnings for r in self.rows)

    @property
    def failures(self) -> int:
        return sum(r.failures for r in self.rows)

    def table(self, messages: bool = True) -> str:
        """The report as a fixed-width text table (times in ms per batch), with footnotes."""
        lines = fixed_width_table(_COLUMNS, self.rows, left_aligned=5)
        lines.append(
            "max|dX|, max|dVJP|: generic path vs reference on the same U; hard=: hard samples agreeing; "
            "speedup: generic time per instance / reference's (fwd+bwd: with the backward pass); "
            "batch g/b: generic path capped at g rows"
        )
        if messages:
            for r in self.rows:
                for m in r.messages:
                    lines.append(f"  note [{r.key}]: {m}")
        return "\n".join(lines)

    def __str__(self):
        return self.table()

    def to_dict(self) -> dict:
        configurations = {}
        for r in self.rows:
            key, copy = r.key, 1
            while key in configurations:  # the same configuration twice (reports added up)
                copy += 1
                key = f"{r.key} #{copy}"
            configurations[key] = dataclasses.asdict(r)
        return {"format": "sstcvx.compare/1", "configurations": configurations}

    def to_json(self, path=None, indent: int = 2) -> str:
        """The report as JSON: ``{"configurations": {key: {field: value}}}``; written to ``path`` if given."""
        return json_text(self.to_dict(), path, indent)

    @classmethod
    def from_dict(cls, data: dict) -> ComparisonReport:
        names = {f.name for f in dataclasses.fields(Comparison)}
        rows = []
        for key, values in data["configurations"].items():
            unknown = set(values) - names
            if unknown:
                raise ValueError(f"configuration {key!r}: unknown fields {sorted(unknown)}")
            rows.append(Comparison(**values))
        return cls(rows)

    @classmethod
    def from_json(cls, text_or_path) -> ComparisonReport:
        """The report written by :meth:`to_json` (a JSON string or a path to a file)."""
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            with open(text_or_path, encoding="utf-8") as fh:
                text = fh.read()
        return cls.from_dict(json.loads(text))

    def to_csv(self, path=None) -> str:
        """The report as CSV, one row per configuration (``messages`` joined by ' | ')."""
        rows = []
        for r in self.rows:
            row = dataclasses.asdict(r)
            row["messages"] = " | ".join(row["messages"])
            rows.append(row)
        return csv_text([f.name for f in dataclasses.fields(Comparison)], rows, path)


def json_text(data: dict, path=None, indent: int = 2) -> str:
    """``data`` as strict JSON (no NaN); also written to ``path`` (with a final newline) if given."""
    text = json.dumps(data, indent=indent, allow_nan=False)
    if path is not None:
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(text + "\n")
    return text


def csv_text(names: list, rows: list, path=None) -> str:
    """The dicts ``rows`` as CSV with the columns ``names`` (None as an empty cell); also written to ``path``."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=names, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if v is None else v for k, v in row.items()})
    text = buffer.getvalue()
    if path is not None:
        with open(path, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
    return text
