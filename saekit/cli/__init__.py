"""`saekit <stage> ...`: thin — parses arguments, calls the library, prints results.

Each `saekit/cli/<stage>.py` registers its own sub-commands (`register(subparsers)`), next to the
code that prints their results; this module only loops over them. A module that fails to import is
an error, never a silently missing sub-command.
"""

from __future__ import annotations

import argparse
import logging
import sys

from saekit.cli import analysis, browse, explain, mdl, run, steer_sweep, train
from saekit.cli import retrieval  # noqa: E402  (one line per added module keeps merges apart)
from saekit.cli import compare_features  # noqa: E402
from saekit.cli import geometry  # noqa: E402
from saekit.errors import SaekitError, UsageError

MODULES = (run, train, browse, analysis, mdl, explain, steer_sweep, retrieval, compare_features, geometry)


class Parser(argparse.ArgumentParser):
    """argparse with the same last stderr line as every other mistake: `PROG: UsageError: ...`, exit 2."""

    def error(self, message: str):
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: {UsageError.__name__}: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="saekit", description="Sparse autoencoders: cache, train, evaluate, browse.")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)
    for module in MODULES:
        module.register(sub)
    return p


def parse(argv: list[str] | None) -> argparse.Namespace:
    """Arguments a sub-command does not know are reported by that sub-command (`saekit quickstart: ...`)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        sub.choices[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def one_line(error: Exception) -> str:
    """The message on one line (a dependency's multi-line text included), so it is stderr's last line."""
    return " ".join(line.strip() for line in str(error).splitlines() if line.strip())


def main(argv: list[str] | None = None) -> int:
    """Run one sub-command. A SaekitError is the user's mistake: one stderr line, exit 2. Anything
    else is a bug in saekit and propagates with its traceback (exit 1)."""
    args = parse(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.fn(args)
    except SaekitError as e:
        print(f"saekit {args.command}: {type(e).__name__}: {one_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
