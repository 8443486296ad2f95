"""`saekit <stage> ...`: thin — parses arguments, calls the library, prints results.

Each `saekit/cli/<stage>.py` registers its own sub-commands (`register(subparsers)`), next to the
code that prints their results; this module only loops over them. A module that fails to import is
an error, never a silently missing sub-command.
"""

from __future__ import annotations

import argparse
import logging
import sys

from saekit.cli import analysis, browse, mdl, run, train
from saekit.errors import SaekitError

MODULES = (run, train, browse, analysis, mdl)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="saekit", description="Sparse autoencoders: cache, train, evaluate, browse.")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)
    for module in MODULES:
        module.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.fn(args)
    except SaekitError as e:
        print(f"saekit {args.command}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
