"""`saekit <stage> ...`: thin — parses arguments, calls the library, prints results."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from saekit.errors import SaekitError


def _cmd_cache(args) -> int:
    from saekit.pipeline import cache_stage, load_run_config, store_summary

    cfg = load_run_config(args.config)
    stores = cache_stage(cfg)
    for store in stores.values():
        print(json.dumps(store_summary(store)))
    return 0


COMMANDS = {
    "cache": (_cmd_cache, "cache activations for a run config", [("config", {})]),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="saekit", description="Sparse autoencoders: cache, train, evaluate, browse.")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)
    for name, (fn, help_, arguments) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_)
        for arg, kw in arguments:
            sp.add_argument(arg, **kw)
        sp.set_defaults(fn=fn)
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
