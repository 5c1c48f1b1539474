"""``sstcvx lab``: the estimator lab from the command line (the parser and the command).

Prints the table and writes ``lab.json``, ``lab.csv`` and ``lab.png`` (|bias|, std and MSE
against tau) into ``--out``.  Exit status as the other commands: 0 done, 1 the run failed (a
solver error, a loss returning non-finite values), 2 a wrong option or target.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys

from .estimators import BASELINES
from .losses import LOSSES

ESTIMATOR_NAMES = ("relaxed", "straight_through", "score_function")
NOISES = ("gumbel", "gaussian", "logistic")


def _names(allowed, what):
    """An argparse type: comma-separated names from ``allowed`` (FILE.py:FUNCTION too when what == 'estimator')."""

    def parse(text):
        names = [part.strip() for part in text.split(",") if part.strip()]
        bad = [n for n in names if n not in allowed and not (what == "estimator" and ".py:" in n)]
        if bad or not names:
            extra = " or FILE.py:FUNCTION" if what == "estimator" else ""
            raise argparse.ArgumentTypeError(
                f"unknown {what} {', '.join(map(repr, bad)) or repr(text)}; expected {', '.join(allowed)}{extra}"
            )
        return names

    return parse


def _probability(text):
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}")
    return value


def add_lab_parser(commands, common, listed: str = ""):
    """Add the ``lab`` subcommand to the ``sstcvx`` subparsers ``commands`` (``common``: the shared options)."""
    from ..cli import _positive_float, _positive_int, _regularizers, _temperatures

    lab = commands.add_parser(
        "lab",
        parents=[common],
        help="estimator lab: bias, variance and cost of gradient estimators of E[L(X)] against a reference",
        description="Measure estimators of grad_theta E[L(X)], X = argmax_{x in P} <theta + noise, x> (relaxed, "
        "straight-through, score function with baselines, or your own) against an unbiased reference gradient "
        "(score function with control variates over many hard samples; exact on a simplex or hypercube): "
        "bias with its confidence interval, cosine, variance, MSE, time per sample and samples needed for a "
        "target error. Prints a table and writes lab.json, lab.csv and lab.png (bias, std and MSE vs tau) into --out.",
        epilog="Examples: 'sstcvx lab ksubset --n 10 --k 3 --tau 0.1,0.3,1'; 'sstcvx lab simplex --loss linear "
        "--estimators relaxed,score_function'; 'sstcvx lab my.py:make_polytope --loss my.py:my_loss'.",
    )
    lab.add_argument(
        "target",
        metavar="FAMILY|FILE.py:FUNCTION",
        help=f"a registered family{listed} or FILE.py:FUNCTION returning an sstcvx.Polytope",
    )
    lab.add_argument("--n", type=_positive_int, help="size of the family (default: the family's)")
    lab.add_argument("--k", type=_positive_int, help="subset size for ksubset (default n // 3)")
    lab.add_argument(
        "--loss",
        default="quadratic",
        metavar="NAME|FILE.py:FUNCTION",
        help=f"the loss L: {', '.join(LOSSES)} (coefficients c ~ N(0, 1) from the seed; quadratic is "
        "(<c, X> - 1)^2) or FILE.py:FUNCTION, a function loss(X) -> (B,) of a batch X (B, *event_shape) "
        "(default quadratic)",
    )
    lab.add_argument(
        "--tau",
        type=_temperatures,
        default=[0.1, 0.3, 1.0],
        help="temperatures of the relaxed and straight-through estimators, separated by commas (default 0.1,0.3,1)",
    )
    lab.add_argument(
        "--regularizer",
        type=_regularizers,
        action="append",
        help="regularizer of the relaxed and straight-through estimators; repeat it or separate by commas "
        "(default: the family's list; for a user polytope its specialized ones, else euclidean)",
    )
    lab.add_argument(
        "--estimators",
        type=_names(ESTIMATOR_NAMES, "estimator"),
        default=list(ESTIMATOR_NAMES),
        help="estimators to measure, separated by commas: relaxed, straight_through, score_function, or "
        "FILE.py:FUNCTION, a function fn(P, theta, loss, noise, num, generator) returning per-sample "
        "gradients (num, *event_shape) (default: the three)",
    )
    lab.add_argument(
        "--baselines",
        type=_names(BASELINES, "baseline"),
        default=list(BASELINES),
        help=f"baselines of the score function, separated by commas (default {','.join(BASELINES)})",
    )
    lab.add_argument(
        "--loo-k", type=_int_at_least_2, default=8, help="group size of the leave-one-out baseline (default 8)"
    )
    lab.add_argument(
        "--noise",
        choices=NOISES,
        default="gumbel",
        help="noise law (default gumbel; the score function needs a smooth density on R, so no exponential)",
    )
    lab.add_argument(
        "--samples",
        type=_positive_int,
        default=2000,
        help="per-sample gradients per estimator and setting (default 2000)",
    )
    lab.add_argument(
        "--reference-samples",
        type=_int_at_least_2,
        default=200_000,
        help="hard samples behind the Monte Carlo reference (default 200000)",
    )
    lab.add_argument("--batch", type=_positive_int, default=2000, help="samples per estimator call (default 2000)")
    lab.add_argument("--confidence", type=_probability, default=0.95, help="level of the intervals (default 0.95)")
    lab.add_argument(
        "--target-error",
        type=_positive_float,
        default=0.1,
        help="relative RMS error (x ||grad||) for the samples-needed column (default 0.1)",
    )
    lab.add_argument(
        "--seed", type=int, default=0, help="seed of theta, the loss coefficients and every sample (default 0)"
    )
    lab.add_argument("--out", metavar="DIR", default="lab_out", help="output directory (default lab_out)")
    lab.add_argument("--no-progress", action="store_true", help="do not show the progress bar")
    return lab


def _int_at_least_2(text):
    from ..cli import _int_at_least

    return _int_at_least(2, "an integer >= 2")(text)


def load_function(spec: str, what: str):
    """The function FUNCTION of FILE.py (``spec`` = "FILE.py:FUNCTION"); UsageError naming ``what`` otherwise."""
    from ..cli import UsageError

    path, _, name = spec.rpartition(":")
    if not path or not name.isidentifier():
        raise UsageError(f"{what} {spec!r}: expected FILE.py:FUNCTION")
    if not os.path.isfile(path):
        raise UsageError(f"{what} {spec!r}: no such file {path!r}")
    module_name = f"sstcvx_lab_user_{abs(hash(os.path.abspath(path)))}"
    module = sys.modules.get(module_name)
    if module is None:
        loader_spec = importlib.util.spec_from_file_location(module_name, path)
        if loader_spec is None or loader_spec.loader is None:
            raise UsageError(f"{what} {spec!r}: cannot load {path!r} as a Python file")
        module = importlib.util.module_from_spec(loader_spec)
        try:
            loader_spec.loader.exec_module(module)
        except Exception as error:
            raise UsageError(f"{what} {spec!r}: importing {path} failed: {type(error).__name__}: {error}") from None
        sys.modules[module_name] = module
    fn = getattr(module, name, None)
    if not callable(fn):
        raise UsageError(f"{what} {spec!r}: {path} defines no function {name!r}")
    return fn


def lab_command(args) -> int:
    """Run ``sstcvx lab`` with parsed ``args``; returns the exit status (raises UsageError for status 2)."""
    import torch

    from ...registry import find_argmax
    from ..cli import UsageError, load_target
    from .estimators import CustomEstimator, LossError
    from .run import run_lab

    P, family = load_target(args.target, args.n, args.k)
    default_regs = list(family.regularizers) if family is not None else None
    regs = list(dict.fromkeys(r for group in args.regularizer for r in group)) if args.regularizer else default_regs
    loss = load_function(args.loss, "--loss") if ".py:" in args.loss else args.loss
    if isinstance(loss, str) and loss not in LOSSES:
        raise UsageError(f"--loss: unknown loss {loss!r}; expected {', '.join(LOSSES)} or FILE.py:FUNCTION")
    estimators = [
        CustomEstimator(load_function(e, "--estimators"), name=e.rpartition(":")[2]) if ".py:" in e else e
        for e in dict.fromkeys(args.estimators)
    ]
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"--out {args.out!r} exists and is not a directory")
    if find_argmax(P) is None:
        print(
            f"note: {P.name} has no specialized argmax, so the {args.reference_samples} hard samples of the reference "
            "go through the generic LP path (milliseconds each); lower --reference-samples for a first look"
        )
    try:
        report = run_lab(
            P,
            loss,
            taus=args.tau,
            regularizers=regs,
            estimators=estimators,
            baselines=args.baselines,
            loo_k=args.loo_k,
            noise=args.noise,
            samples=args.samples,
            reference_samples=args.reference_samples,
            batch=args.batch,
            confidence=args.confidence,
            target_error=args.target_error,
            seed=args.seed,
            progress=not args.no_progress,
        )
    except LossError as error:
        print(f"sstcvx lab: {error}", file=sys.stderr)
        return 1
    except (TypeError, ValueError) as error:
        raise UsageError(str(error).splitlines()[0]) from None
    print(f"estimator lab on {P!r}: seed {args.seed}, {torch.get_num_threads()} torch thread(s)")
    print(report.table())
    os.makedirs(args.out, exist_ok=True)
    written = [os.path.join(args.out, "lab.json"), os.path.join(args.out, "lab.csv")]
    report.to_json(written[0])
    report.to_csv(written[1])
    try:
        written.append(report.plot(os.path.join(args.out, "lab.png")))
    except ImportError as error:
        print(f"plot skipped: {error} (pip install matplotlib)")
    print("wrote " + ", ".join(written))
    failed = [r.key for r in report if r.error]
    if failed:
        print(f"sstcvx lab: {len(failed)} setting(s) failed: {'; '.join(failed)}", file=sys.stderr)
        return 1
    return 0
