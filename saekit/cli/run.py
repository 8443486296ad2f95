"""CLI of the run stages: `saekit cache | eval | compare | run | quickstart` (printing happens here).

The decisions (which config kind, what an eval target is, where a report lives) are the run
layer's (`saekit.run`); this module parses arguments, calls it and prints.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from saekit.errors import MissingArtifactError, StoreMissingError
from saekit.layout import RunFolder

QUICKSTART_CONFIGS = ("configs/quickstart.yaml", "configs/quickstart_embeddings.yaml")


def cmd_cache(args) -> int:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from saekit.cli.train import cmd_cache_distributed

        return cmd_cache_distributed(args)
    from saekit.run.config import load_run_config
    from saekit.run.stages import cache_stage, store_summary

    for store in cache_stage(load_run_config(args.config)).values():
        print(json.dumps(store_summary(store)))
    return 0


def cmd_eval(args) -> int:
    from saekit.eval.preflight import format_preflight
    from saekit.eval.report_text import format_report
    from saekit.run.stages import eval_target

    try:
        report, out = eval_target(args.target, store=args.store, max_rows=args.max_rows, out=args.out,
                                  force=args.force)
    except StoreMissingError as e:  # a run config or folder whose store was never cached
        if args.store is not None:
            raise
        raise e.with_fix(f"saekit cache {args.target}") from e
    print(format_preflight(report["preflight"]))
    print(format_report(report))
    print(f"report: {out / 'report.json'}")
    return 0


def cmd_compare(args) -> int:
    from saekit.artifacts import read_json
    from saekit.eval.report import write_comparison
    from saekit.eval.report_text import compare_table

    reports = {}
    for run in args.runs:
        path = RunFolder(Path(run)).eval / "report.json"
        if not path.exists():
            path = Path(run) / "report.json"
        if not path.exists():
            found = "no such folder" if not Path(run).exists() else "none"
            raise MissingArtifactError(f"{run}: expected an eval report {RunFolder(Path(run)).eval / 'report.json'} "
                                       f"(or report.json), found {found}", fix=f"saekit eval {run}")
        reports[Path(run).name] = read_json(path)
    print(compare_table(reports))
    if args.out:
        write_comparison(reports, args.out)
        print(f"comparison written to {args.out}")
    return 0


def cmd_run(args) -> int:
    for config in args.configs:
        cfg, result = _run_one(config)
        if getattr(args, "seeds", 1) > 1:
            print_seed_spread(cfg, args.seeds, result["report"])
    return 0


def print_seed_spread(cfg, n: int, main_report: dict | None = None) -> None:
    """Retrain with seeds cfg.seed+1 .. cfg.seed+n-1 and print the spread of the headline figures."""
    from saekit.eval.report_text import format_seed_spread
    from saekit.run.seeds import run_seeds

    spread = run_seeds(cfg, n, main_report)
    print(f"\n{format_seed_spread(spread)}\n(written to {cfg.folder.seed_spread})")


def _run_one(config: str):
    from saekit.errors import ConfigError
    from saekit.run.config import RunConfig, load_run_config
    from saekit.run.stages import run_all

    cfg = load_run_config(config)
    if not isinstance(cfg, RunConfig):
        raise ConfigError(f"{config}: a multi-SAE config; run `saekit train {config}` then `saekit analyze RUN`")
    result = run_all(cfg)
    _print_run(cfg, result)
    return cfg, result


def _print_run(cfg, result) -> None:
    from saekit.eval.preflight import format_preflight
    from saekit.eval.report_text import format_report

    print(f"\n== {cfg.name}: results in {cfg.run_dir}")
    if result.get("training_rows"):
        print(f"training rows: {_describe_training_rows(result['training_rows'])}")
    print(format_preflight(result["report"]["preflight"]))
    print(format_report(result["report"]))
    print(f"SAE: {result['final_sae']}   (python: saekit.load_sae('{result['final_sae']}'))")
    warning = (result["report"].get("generalisation") or {}).get("warning")
    if warning:
        print(f"WARNING ({cfg.name}): {warning}")
    probe = cfg.folder.probe / "report.json"
    if probe.exists():
        from saekit.analysis.probing import format_probe_table
        from saekit.artifacts import read_json

        print(f"sparse probing ({cfg.probe.label} = {cfg.probe.positive or 'majority'} vs rest), test accuracy:")
        print(format_probe_table(read_json(probe)))
    if result.get("bundle"):
        print(f"browser bundle: {result['bundle']}")
    for summary in result.get("explanations") or []:
        from saekit.cli.explain import summary_lines

        print("explanations " + "\n".join(summary_lines(summary)))


def _describe_training_rows(rows: dict) -> str:
    """One line on what the SAE was trained on (the run's `train/data.json`)."""
    if not rows["exclude_outliers"]:
        return (f"{rows['rows_used']} (all rows of the training documents; {rows['outliers_in_training_docs']} "
                "massive-activation outliers kept: train.exclude_outliers is false)")
    return (f"{rows['rows_used']} of {rows['train_rows']}: excluded {rows['excluded_outliers']} massive-activation "
            f"outlier rows ({rows['outlier_rule'].get('description')})")


def cmd_quickstart(args) -> int:
    runs = [_run_one(config)[0] for config in QUICKSTART_CONFIGS]
    print("\nAll done. Results:\n" + "\n".join(f"  {c.folder.eval / 'report.txt'}" for c in runs))
    print("Open the feature browser with:\n  .venv/bin/saekit browse " + " ".join(str(c.run_dir) for c in runs))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cache", help="cache activations for a run config")
    p.add_argument("config")
    p.set_defaults(fn=cmd_cache)
    p = sub.add_parser("eval", help="evaluate a run (folder or config) or an SAE folder with --store")
    p.add_argument("target")
    p.add_argument("--store", default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--max-rows", type=int, default=0)
    p.add_argument("--force", action="store_true",
                   help="run even when the SAE's model name differs from the store's (an alias); recorded")
    p.set_defaults(fn=cmd_eval)
    p = sub.add_parser("compare", help="side-by-side table of several evaluated runs")
    p.add_argument("runs", nargs="+")
    p.add_argument("--out", default=None)
    p.set_defaults(fn=cmd_compare)
    p = sub.add_parser("run", help="the main job for configs: cache → train → evaluate")
    p.add_argument("configs", nargs="+")
    p.add_argument("--seeds", type=int, default=1,
                   help="also retrain with N-1 further seeds (RUN/seeds/) and print the spread of the figures")
    p.set_defaults(fn=cmd_run)
    p = sub.add_parser("quickstart", help="the main job on the embedded defaults (LLM + embeddings)")
    p.set_defaults(fn=cmd_quickstart)
