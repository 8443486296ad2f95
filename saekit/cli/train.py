"""CLI of `saekit train CONFIG` and of `saekit cache CONFIG` under torchrun (printing happens here).

Which kind of run a config describes is `saekit.run.config.load_run_config`'s answer; this module
only sets up the process group, calls the run layer and prints one JSON line per trained SAE.
"""

from __future__ import annotations

import argparse
import json

from saekit.errors import StoreMissingError
from saekit.run.config import MultiConfig, load_run_config
from saekit.run.multi import train_multi
from saekit.run.outliers import read_training_rows
from saekit.run.seeds import run_seeds
from saekit.run.stages import cache_distributed, train_run
from saekit.train.distributed import current_sync, init_process_group, shutdown


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="run config YAML (saekit.run.config.RunConfig) or multi-SAE config (has `saes:`)")
    parser.add_argument("--resume", choices=["auto", "yes", "no"], default="auto",
                        help="continue from the latest checkpoint: auto (if any), yes (required), no (fresh run)")
    parser.add_argument("--backend", default="auto", choices=["auto", "gloo", "nccl"],
                        help="torch.distributed backend under torchrun (auto: nccl with CUDA, else gloo)")
    parser.add_argument("--seeds", type=int, default=1,
                        help="single runs: also retrain with N-1 further seeds (RUN/seeds/), evaluate each and print "
                             "the spread of the figures")


def cmd_train(args) -> int:
    """`saekit train CONFIG`: plain, or one process per rank under torchrun."""
    resume = {"auto": "auto", "yes": True, "no": False}[getattr(args, "resume", "auto")]
    init_process_group(getattr(args, "backend", "auto"))
    try:
        cfg = load_run_config(args.config)
        try:
            summary = _train(cfg, resume)
        except StoreMissingError as e:  # name the command with this config: `saekit cache CONFIG`
            raise e.with_fix(f"saekit cache {args.config}") from e
        if current_sync().is_main:
            for line in summary:
                print(json.dumps(line))
            if getattr(args, "seeds", 1) > 1 and not isinstance(cfg, MultiConfig):
                spread = run_seeds(cfg, args.seeds)
                print(json.dumps({"seed_spread": str(cfg.folder.seed_spread), **spread}))
        return 0
    finally:
        shutdown()


def _train(cfg, resume) -> list[dict]:
    if isinstance(cfg, MultiConfig):
        results = train_multi(cfg, resume=resume)
        return [{"name": n, "final_sae": str(r.final_sae), "steps": r.state.step, "tokens": r.state.tokens}
                for n, r in results.items()]
    r = train_run(cfg, resume=resume)
    return [{"final_sae": str(r.final_sae), "steps": r.state.step, "tokens": r.state.tokens,
             "training_rows": read_training_rows(cfg.folder.train_data()),
             "epochs": r.epochs, "exported_step": r.exported_step, "val_fvu": (r.validation or {}).get("val_fvu")}]


def cmd_cache_distributed(args) -> int:
    """`saekit cache CONFIG` under torchrun (WORLD_SIZE > 1): sharded caching over gloo."""
    cfg = load_run_config(args.config)
    rank, world = init_process_group("gloo")
    try:
        for summary in cache_distributed(cfg, rank, world).values():
            print(json.dumps(summary))
        return 0
    finally:
        shutdown()


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train the SAE(s) of a config on its store; torchrun-aware "
                                     "(`torchrun ... -m saekit train`)")
    add_train_arguments(p)
    p.set_defaults(fn=cmd_train)
