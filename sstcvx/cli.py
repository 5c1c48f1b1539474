"""The ``sstcvx`` command line."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sstcvx", description="Stochastic softmax tricks on polytopes.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("demo", help="a short tour: declare a polytope and sample it three ways")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        from .demo import run_tour

        run_tour()
    return 0


if __name__ == "__main__":
    sys.exit(main())
