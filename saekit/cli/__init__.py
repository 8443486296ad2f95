"""`saekit <stage> ...`: thin — parses arguments, calls the library, prints results."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from saekit.errors import SaekitError

QUICKSTART_CONFIGS = ("configs/quickstart.yaml", "configs/quickstart_embeddings.yaml")


def _cmd_cache(args) -> int:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from saekit.cli.train import cmd_cache_distributed

        return cmd_cache_distributed(args)
    from saekit.pipeline import cache_stage, load_run_config, store_summary

    cfg = load_run_config(args.config)
    for store in cache_stage(cfg).values():
        print(json.dumps(store_summary(store)))
    return 0


def _cmd_eval(args) -> int:
    from saekit.eval.report import evaluate_sae, format_report, write_report
    from saekit.pipeline import eval_stage, load_run_config
    from saekit.sae.registry import load_sae
    from saekit.store.reader import ActivationStore

    target = Path(args.target)
    if target.suffix in (".yaml", ".yml"):
        cfg = load_run_config(target)
        report = eval_stage(cfg)
        out = cfg.run_dir / "eval"
    elif (target / "config.yaml").exists() and args.store is None:  # a run folder
        cfg = load_run_config(target / "config.yaml")
        report = eval_stage(cfg)
        out = cfg.run_dir / "eval"
    else:  # a bare SAE folder + a store
        if args.store is None:
            raise SaekitError(f"{target}: not a run folder; pass --store STORE to evaluate a bare SAE folder")
        sae, store = load_sae(target), ActivationStore(args.store)
        chunks = [c for _, c in store.iter_chunks(4096, stop=min(len(store), args.max_rows or len(store)))]
        report = evaluate_sae(sae, chunks, description_length=True,
                              retrieval_rows=2000 if store.kind == "embedding" else 0)
        out = Path(args.out or target / "eval")
    print(format_report(report))
    write_report(report, out)
    print(f"report: {out / 'report.json'}")
    return 0


def _cmd_compare(args) -> int:
    from saekit.artifacts import read_json
    from saekit.eval.report import compare_table, write_comparison

    reports = {}
    for run in args.runs:
        path = Path(run) / "eval" / "report.json"
        if not path.exists():
            path = Path(run) / "report.json"
        if not path.exists():
            raise SaekitError(f"{run}: no eval/report.json (run `saekit eval {run}` first)")
        reports[Path(run).name] = read_json(path)
    print(compare_table(reports))
    if args.out:
        write_comparison(reports, args.out)
        print(f"comparison written to {args.out}")
    return 0


def _cmd_run(args) -> int:
    from saekit.pipeline import load_run_config, run_all

    for config in args.configs:
        cfg = load_run_config(config)
        result = run_all(cfg)
        _print_run(cfg, result)
    return 0


def _print_run(cfg, result) -> None:
    from saekit.eval.report import format_report

    print(f"\n== {cfg.name}: results in {cfg.run_dir}")
    print(format_report(result["report"]))
    print(f"SAE: {result['final_sae']}   (python: saekit.load_sae('{result['final_sae']}'))")
    probe = Path(cfg.run_dir) / "probe" / "report.json"
    if probe.exists():
        from saekit.analysis.probing import format_probe_table
        from saekit.artifacts import read_json

        print(f"sparse probing ({cfg.probe.label} = {cfg.probe.positive or 'majority'} vs rest), test accuracy:")
        print(format_probe_table(read_json(probe)))
    if result.get("bundle"):
        print(f"browser bundle: {result['bundle']}")


def _cmd_quickstart(args) -> int:
    from saekit.pipeline import load_run_config, run_all

    runs = []
    for config in QUICKSTART_CONFIGS:
        cfg = load_run_config(config)
        result = run_all(cfg)
        _print_run(cfg, result)
        runs.append(str(cfg.run_dir))
    print("\nAll done. Results:\n" + "\n".join(f"  {r}/eval/report.txt" for r in runs))
    print("Open the feature browser with:\n  .venv/bin/saekit browse " + " ".join(runs))
    return 0


COMMANDS = {
    "cache": (_cmd_cache, "cache activations for a run config", [("config", {})]),
    "eval": (_cmd_eval, "evaluate a run (folder or config) or an SAE folder with --store",
             [("target", {}), ("--store", {"default": None}), ("--out", {"default": None}),
              ("--max-rows", {"type": int, "default": 0})]),
    "compare": (_cmd_compare, "side-by-side table of several evaluated runs",
                [("runs", {"nargs": "+"}), ("--out", {"default": None})]),
    "run": (_cmd_run, "the main job for configs: cache → train → evaluate", [("configs", {"nargs": "+"})]),
    "quickstart": (_cmd_quickstart, "the main job on the embedded defaults (LLM + embeddings)", []),
}


# Stages whose argument parsing lives beside their library code: name -> (module, add_fn, cmd_fn, help).
EXTERNAL = {
    "train": ("saekit.cli.train", "add_train_arguments", "cmd_train",
              "train the SAE(s) of a config on its store; torchrun-aware (`torchrun ... -m saekit train`)"),
    "analyze": ("saekit.cli.browse", "add_analyze_arguments", "cmd_analyze",
                "build the feature-browser bundle of a run"),
    "browse": ("saekit.cli.browse", "add_browse_arguments", "cmd_browse",
               "open the Streamlit feature browser on runs (127.0.0.1)"),
    "probe": ("saekit.cli.analysis", "add_probe_arguments", "cmd_probe",
              "sparse probing: SAE features vs neurons for a sweep of k"),
    "steer": ("saekit.cli.analysis", "add_steer_arguments", "cmd_steer",
              "steered vs default generation (LLM runs) with the same seed"),
    "mdl-select": ("saekit.cli.mdl", "add_mdl_select_arguments", "cmd_mdl_select",
                   "train/take a grid of SAEs and pick the minimum-description-length one"),
}


def _external(module: str, fn: str):
    import importlib

    return getattr(importlib.import_module(module), fn)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="saekit", description="Sparse autoencoders: cache, train, evaluate, browse.")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)
    for name, (fn, help_, arguments) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_)
        for arg, kw in arguments:
            sp.add_argument(arg, **kw)
        sp.set_defaults(fn=fn)
    for name, (module, add_fn, cmd_fn, help_) in EXTERNAL.items():
        try:
            add_arguments = _external(module, add_fn)
        except (ImportError, AttributeError) as e:  # a stage whose optional parts are missing
            logging.getLogger(__name__).warning("saekit %s unavailable: %s", name, e)
            continue
        sp = sub.add_parser(name, help=help_)
        add_arguments(sp)
        sp.set_defaults(fn=lambda args, m=module, c=cmd_fn: _external(m, c)(args))
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
