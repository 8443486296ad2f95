"""CLI of `saekit explain RUN`: explanations in words and their scores for a run's features.

The run's `explain:` section (config.yaml) gives the defaults; flags override them. The API key is
never a flag: `--api-key-env` names the environment variable that holds it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from saekit.analysis.explain.protocol import ExplainConfig
from saekit.errors import ConfigError
from saekit.layout import RunFolder

FLAGS = {"backend": "backend", "judge": "judge", "model": "model", "base_url": "base_url",
         "api_key_env": "api_key_env", "embedding_features": "embedding_features", "concurrency": "concurrency",
         "requests_per_minute": "requests_per_minute", "min_examples": "min_examples"}


def parse_features(text: str | None) -> list[int] | None:
    """'0,5,10-19' -> [0, 5, 10, ..., 19]; None when not given."""
    if not text:
        return None
    out: list[int] = []
    try:
        for part in text.replace(" ", "").split(","):
            if "-" in part:
                lo, hi = part.split("-")
                out += list(range(int(lo), int(hi) + 1))
            elif part:
                out.append(int(part))
    except ValueError as e:
        raise ConfigError(f"--features: expected ids and ranges like 0,5,10-19, found '{text}'") from e
    return out


def config_for(args, folder: RunFolder) -> ExplainConfig:
    """The run config's `explain:` section, with the given flags on top."""
    base: dict = {}
    if folder.config.exists():
        from saekit.run.config import load_run_config

        try:
            base = dict(load_run_config(folder.config).explain)
        except ConfigError:
            base = {}  # a multi-SAE or foreign config: the defaults
    base.update({key: getattr(args, flag) for flag, key in FLAGS.items() if getattr(args, flag) is not None})
    return ExplainConfig.from_dict(base, where="explain")


def summary_lines(s: dict) -> list[str]:
    """What one SAE's explanation run did: counts, mean scores with intervals, requests and tokens."""
    scores = ", ".join(f"{k} {v['mean']:.3f} [{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}] (n={v['n']})"
                       for k, v in s["scores"].items() if v["mean"] is not None)
    skipped = ", ".join(f"{n} {why}" for why, n in s["skipped"].items()) or "none"
    led = s["ledger"]
    return [f"{s['run']}: {s['explained']} features explained ({s['backend']}, judge {s['judge']}) in "
            f"{s['wall_seconds']:.1f} s; skipped: {skipped}",
            f"  scores: {scores or 'none'}",
            f"  requests sent {s['requests_sent']}, cache hits {s['cache_hits']}, tokens "
            f"{led['prompt_tokens']} + {led['completion_tokens']}" + (f", cost {led['cost']}" if led["cost"] is not None else "")]


def cmd_explain(args) -> int:
    from saekit.run.explain import explain_run

    folder = RunFolder(Path(args.run)).require_run()
    folder = folder.for_sae(args.sae) if args.sae else folder
    cfg = config_for(args, folder)
    for s in explain_run(folder, cfg, parse_features(args.features), out=args.out, attach=not args.no_bundle):
        print("\n".join(summary_lines(s)))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("explain", help="explain features in words and score the explanations")
    p.add_argument("run", help="run folder with a browser bundle (saekit analyze RUN)")
    p.add_argument("--sae", default=None, help="only this SAE of a multi-SAE run")
    p.add_argument("--backend", default=None, choices=["ngram", "openai", "local"], help="explainer (default ngram)")
    p.add_argument("--judge", default=None, choices=["keyword", "openai", "local"], help="detection/fuzzing judge")
    p.add_argument("--features", default=None, help="ids and ranges, e.g. 0,5,10-19 (default: every feature)")
    p.add_argument("--model", default=None, help="chat model (openai) or local model (local)")
    p.add_argument("--base-url", dest="base_url", default=None, help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--api-key-env", dest="api_key_env", default=None, help="environment variable holding the API key")
    p.add_argument("--embedding-features", dest="embedding_features", type=int, default=None,
                   help="features also scored by the MiniLM embedding scorer (0: none)")
    p.add_argument("--concurrency", type=int, default=None, help="chat requests in flight at once")
    p.add_argument("--requests-per-minute", dest="requests_per_minute", type=float, default=None)
    p.add_argument("--min-examples", dest="min_examples", type=int, default=None)
    p.add_argument("--out", default=None, help="output folder (default: the run's explanations folder)")
    p.add_argument("--no-bundle", action="store_true", help="do not add the table to the bundle")
    p.set_defaults(fn=cmd_explain)
