"""The ``sstcvx`` command line: ``compare``, ``bench`` and ``demo``.

``main(argv)`` returns the exit status instead of exiting (0: done; 1: the run
failed or, with ``--fail-above``, a check failed; 2: a wrong option or target),
so tests can call it in process; ``python -m sstcvx`` and the ``sstcvx`` console
script exit with it.  The polytope families are found through the family registry
(:mod:`sstcvx.families`), never by name.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys

from .._version import __version__
from ..families import families

REGULARIZER_NAMES = ("entropy", "binary_entropy", "euclidean", "exp_family_entropy")


def _family_names() -> tuple:
    """The registered families' names (loads the ``sstcvx.families`` entry-point group)."""
    return tuple(families())


def _names_with_k() -> list:
    return [name for name, family in families().items() if family.uses_k]


class UsageError(Exception):
    """A wrong option or target: reported in one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit status 2) instead of usage + error."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _int_at_least(minimum: int, expected: str):
    """An argparse type: an integer >= minimum, with a one-line error naming what was expected."""

    def parse(text):
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


_positive_int = _int_at_least(1, "a positive integer")
_nonnegative_int = _int_at_least(0, "an integer >= 0")


def _temperatures(text):
    taus = []
    for part in text.split(","):
        try:
            tau = float(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected temperatures > 0 separated by commas, got {text!r}") from None
        if not (math.isfinite(tau) and tau > 0):
            raise argparse.ArgumentTypeError(f"expected temperatures > 0 separated by commas, got {text!r}")
        taus.append(tau)
    return taus


def _positive_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _regularizers(text):
    names = [part.strip() for part in text.split(",") if part.strip()]
    bad = [name for name in names if name not in REGULARIZER_NAMES]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"unknown regularizer {', '.join(map(repr, bad)) or repr(text)}; expected {', '.join(REGULARIZER_NAMES)}"
        )
    return names


def build_parser(family_names: tuple | None = None) -> argparse.ArgumentParser:
    """The parser; ``family_names`` (listed in the help of compare and bench) are only loaded
    by :func:`main` for those commands, so that ``sstcvx --help`` imports no family."""
    listed = f" ({', '.join(family_names)})" if family_names else ""
    parser = _Parser(
        prog="sstcvx",
        description="Stochastic softmax tricks on polytopes: compare the generic CVXPY path with "
        "specialized solvers, benchmark them, or take the tour.",
        epilog="Run 'sstcvx COMMAND --help' for a command's options. Exit status: 0 done; 1 the run failed "
        "(or a --fail-above check did); 2 a wrong option or target, with a one-line error.",
    )
    parser.add_argument("--version", action="version", version=f"sstcvx {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    common = _Parser(add_help=False)
    common.add_argument(
        "--threads",
        type=_positive_int,
        help="torch intra-op threads (default: torch's choice). On a busy machine, 1 avoids the "
        "millisecond stalls of threads waiting for a core, which distort the specialized solvers' times",
    )

    commands.add_parser(
        "demo",
        parents=[common],
        help="the main job, about a minute: declare a polytope, sample it three ways, compare every family",
        description="Declare the 3-subsets of 8 items with CVXPY, draw relaxed, hard and straight-through "
        "samples, compare a user polytope with brute force, then print the generic-vs-specialized "
        "comparison table of every registered family at a small size.",
    )

    compare = commands.add_parser(
        "compare",
        parents=[common],
        help="generic CVXPY path vs specialized solver (or brute force) on the same utilities",
        description="Run the generic CVXPY path and a reference (the specialized solver; for a polytope "
        "without one, brute force over its vertices or a second conic solver) on the same random "
        "utilities U = theta + Gumbel noise, and print their differences (relaxed samples, "
        "vector-Jacobian products, hard samples) and timings as a table.",
        epilog="Examples: 'sstcvx compare ksubset --n 20 --k 5'; 'sstcvx compare simplex --tau 0.1,1 "
        "--json out.json'; 'sstcvx compare my_polytopes.py:make_polytope' where make_polytope() returns "
        "an sstcvx.Polytope.",
    )
    compare.add_argument(
        "target",
        metavar="FAMILY|FILE.py:FUNCTION",
        help=f"a registered family{listed} or FILE.py:FUNCTION, a function of a Python file "
        "returning an sstcvx.Polytope (called with no arguments, or with n=/k= when --n/--k are given)",
    )
    compare.add_argument(
        "--n", type=_positive_int, help="size of the family (default: the family's, e.g. 10 for ksubset)"
    )
    compare.add_argument("--k", type=_positive_int, help="subset size for ksubset (default n // 3)")
    compare.add_argument("--batch", type=_positive_int, default=16, help="rows of utilities U (default 16)")
    compare.add_argument(
        "--tau", type=_temperatures, default=[1.0], help="temperature, or several separated by commas (default 1)"
    )
    compare.add_argument(
        "--regularizer",
        type=_regularizers,
        action="append",
        help=f"regularizer to compare ({', '.join(REGULARIZER_NAMES)}); repeat it or separate by commas "
        "(default: the family's list; for a user polytope euclidean and entropy, plus "
        "exp_family_entropy when it lists its vertices)",
    )
    compare.add_argument("--json", metavar="PATH", help="also write the report as JSON to PATH")
    compare.add_argument("--csv", metavar="PATH", help="also write the report as CSV to PATH")
    compare.add_argument(
        "--repeats",
        type=_nonnegative_int,
        default=3,
        help="timed repetitions after the warm-up (default 3; 0: no timing)",
    )
    compare.add_argument("--seed", type=int, default=0, help="seed of the utilities and the cotangent (default 0)")
    compare.add_argument(
        "--reference",
        choices=("auto", "specialized", "brute_force", "second_solver"),
        default="auto",
        help="what the generic path is compared with (default auto: specialized if registered, else "
        "brute force over the vertices, else a second conic solver)",
    )
    compare.add_argument(
        "--backend",
        choices=("generic", "fast", "cvxpylayers", "moreau"),
        default="generic",
        help="the compared path's solver= (default generic: the fast torch solver where it applies, "
        "cvxpylayers otherwise; moreau needs the moreau extra)",
    )
    compare.add_argument(
        "--max-generic-batch",
        type=_positive_int,
        default=64,
        help="run the generic path on at most this many rows (default 64; it costs ms per row)",
    )
    compare.add_argument(
        "--fail-above",
        type=_positive_float,
        metavar="TOL",
        help="exit with status 1 if a configuration failed or its max |X_generic - X_reference| exceeds TOL",
    )

    bench = commands.add_parser(
        "bench",
        parents=[common],
        help="sweep sizes, batch sizes and temperatures for every family; write JSON and PNG plots",
        description="For every family and its default regularizers, time the generic and the specialized "
        "path against the size n and the batch size, and measure their difference against the "
        "temperature tau. Writes bench.json (every figure) and time_vs_n.png, time_vs_batch.png, "
        "error_vs_tau.png into DIR. The generic path costs milliseconds per instance, so it runs "
        "only up to a capped batch size and size n (printed).",
    )
    bench.add_argument("--quick", action="store_true", help="fewer sizes, batch sizes and repetitions (a few minutes)")
    bench.add_argument("--out", metavar="DIR", default="bench_out", help="output directory (default bench_out)")
    bench.add_argument(
        "--families",
        metavar="NAMES",
        help=f"comma-separated subset of the registered families (default all{': ' + ','.join(family_names) if family_names else ''})",
    )
    bench.add_argument("--no-progress", action="store_true", help="do not show the progress bar")
    from .lab.command import add_lab_parser

    add_lab_parser(commands, common, listed)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(_family_names() if argv and argv[0] in ("compare", "bench", "lab") else None)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help (0) or a wrong option (2)
        return int(exit_.code or 0)
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    try:
        if args.command == "demo":
            from .demo import run_demo

            run_demo()
            return 0
        if args.command == "compare":
            return _compare(args)
        if args.command == "bench":
            return _bench(args)
        if args.command == "lab":
            from .lab.command import lab_command

            return lab_command(args)
    except UsageError as error:
        print(f"sstcvx {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sstcvx {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


# ----------------------------------------------------------------------------------------------
# sstcvx compare
# ----------------------------------------------------------------------------------------------


def load_user_polytope(target: str, n=None, k=None):
    """Call FUNCTION of FILE.py (``target`` = "FILE.py:FUNCTION") and check it returns a Polytope."""
    import sstcvx

    path, _, function = target.rpartition(":")
    if not path or not function.isidentifier():
        raise UsageError(f"target {target!r}: expected a family ({', '.join(_family_names())}) or FILE.py:FUNCTION")
    if not os.path.isfile(path):
        raise UsageError(f"target {target!r}: no such file {path!r}")
    spec = importlib.util.spec_from_file_location(f"sstcvx_user_{abs(hash(os.path.abspath(path)))}", path)
    if spec is None or spec.loader is None:
        raise UsageError(f"target {target!r}: cannot load {path!r} as a Python file")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as error:
        raise UsageError(f"target {target!r}: importing {path} failed: {type(error).__name__}: {error}") from None
    make = getattr(module, function, None)
    if not callable(make):
        raise UsageError(f"target {target!r}: {path} defines no function {function!r}")
    kwargs = {name: value for name, value in (("n", n), ("k", k)) if value is not None}
    try:
        P = make(**kwargs)
    except Exception as error:
        raise UsageError(
            f"target {target!r}: {function}({', '.join(f'{a}={b}' for a, b in kwargs.items())}) "
            f"raised {type(error).__name__}: {error}"
        ) from None
    if not isinstance(P, sstcvx.Polytope):
        raise UsageError(f"target {target!r}: {function}() returned {type(P).__name__}, expected an sstcvx.Polytope")
    return P


def load_family(name: str, n=None, k=None):
    """(polytope, family) for a registered family name (see :mod:`sstcvx.families`)."""
    family = families()[name]
    if k is not None and not family.uses_k:
        raise UsageError(f"--k: family {name} takes no k (families with one: {', '.join(_names_with_k())})")
    try:
        return family(n, k), family
    except (TypeError, ValueError) as error:
        raise UsageError(f"{name} with n={n if n is not None else family.n}: {error}") from None


def load_target(target: str, n=None, k=None):
    """``(polytope, family)`` for a command's FAMILY|FILE.py:FUNCTION target.

    ``family`` is the registered family: the named one, or for a user's declaration the family it
    was recognized as (``None`` when it was not).  Wrong targets raise :class:`UsageError`.
    """
    if target in _family_names():
        return load_family(target, n, k)
    if ":" in target:
        P = load_user_polytope(target, n, k)
        recognized = getattr(P, "recognized", None)
        return P, None if recognized is None else families().get(recognized.family)
    raise UsageError(f"unknown family {target!r}; expected one of {', '.join(_family_names())} or FILE.py:FUNCTION")


def check_output_file(option: str, path: str) -> None:
    """A file the run will write at the end: its directory must exist and be writable, and the
    path must not be a directory (checked before the run, so a typo does not cost the run)."""
    if os.path.isdir(path):
        raise UsageError(f"{option} {path!r} is a directory; expected a file path")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UsageError(f"{option} {path!r}: the directory {folder!r} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise UsageError(f"{option} {path!r}: not writable")


def check_output_dir(option: str, path: str) -> None:
    """A directory the run will write into (created if missing): it, or else its parent, must be a
    writable directory."""
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise UsageError(f"{option} {path!r} exists and is not a directory")
        if not os.access(path, os.W_OK | os.X_OK):
            raise UsageError(f"{option} {path!r}: the directory is not writable")
        return
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UsageError(f"{option} {path!r}: the parent directory {parent!r} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{option} {path!r}: cannot create it, the parent directory {parent!r} is not writable")


def _compare(args) -> int:
    import sstcvx

    for option, path in (("--json", args.json), ("--csv", args.csv)):
        if path:
            check_output_file(option, path)

    # a family, or a declaration recognized as one: its generic path against the family's solvers
    P, family = load_target(args.target, args.n, args.k)
    if family is not None:
        default_regs = list(family.regularizers)
    else:
        default_regs = ["euclidean", "entropy"]
        if args.reference != "second_solver" and P.vertices is not None:
            default_regs.append("exp_family_entropy")
    regs = [r for group in args.regularizer for r in group] if args.regularizer else default_regs
    regs = list(dict.fromkeys(regs))
    try:
        report = sstcvx.compare(
            P,
            regs,
            tau=args.tau,
            batch=args.batch,
            seed=args.seed,
            repeats=args.repeats,
            reference=args.reference,
            max_generic_batch=args.max_generic_batch,
            generic_backend=args.backend,
        )
    except (TypeError, ValueError, ImportError) as error:
        raise UsageError(str(error)) from None
    import torch

    timing = (
        f"median of at least {args.repeats} timed runs after a warm-up, {torch.get_num_threads()} torch thread(s)"
        if args.repeats
        else "no timing (--repeats 0)"
    )
    print(f"comparing on {P!r}: batch {args.batch}, seed {args.seed}, {timing}")
    print(report.table())
    if args.json:
        report.to_json(args.json)
        print(f"wrote JSON to {args.json}")
    if args.csv:
        report.to_csv(args.csv)
        print(f"wrote CSV to {args.csv}")
    if report.failures or report.warnings:
        print(f"{report.failures} failure(s), {report.warnings} solver warning(s): see the notes above")
    if args.fail_above is not None:
        bad = [r.key for r in report if r.failures or r.max_abs_diff is None or r.max_abs_diff > args.fail_above]
        if bad:
            print(f"FAILED --fail-above {args.fail_above:g}: {'; '.join(bad)}", file=sys.stderr)
            return 1
    return 0


# ----------------------------------------------------------------------------------------------
# sstcvx bench
# ----------------------------------------------------------------------------------------------


def _bench(args) -> int:
    names = list(_family_names())
    if args.families:
        names = [name.strip() for name in args.families.split(",") if name.strip()]
        bad = [name for name in names if name not in _family_names()]
        if bad or not names:
            raise UsageError(
                f"--families: unknown {', '.join(map(repr, bad))}; expected names from {', '.join(_family_names())}"
            )
    check_output_dir("--out", args.out)
    from .bench import run_bench

    try:
        run_bench(args.out, quick=args.quick, families=names, progress=not args.no_progress)
    except RuntimeError as error:
        print(f"sstcvx bench: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
