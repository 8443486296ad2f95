"""CLI logic of `saekit train CONFIG` and of `saekit cache CONFIG` under torchrun (printing happens here)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from saekit.train.distributed import cache_distributed, current_sync, init_process_group, shutdown, train_run


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="run config YAML (saekit.pipeline.RunConfig) or multi-SAE config (has `saes:`)")
    parser.add_argument("--resume", choices=["auto", "yes", "no"], default="auto",
                        help="continue from the latest checkpoint: auto (if any), yes (required), no (fresh run)")
    parser.add_argument("--backend", default="auto", choices=["auto", "gloo", "nccl"],
                        help="torch.distributed backend under torchrun (auto: nccl with CUDA, else gloo)")


def cmd_train(args) -> int:
    """`saekit train CONFIG`: plain, or one process per rank under torchrun."""
    import yaml

    resume = {"auto": "auto", "yes": True, "no": False}[getattr(args, "resume", "auto")]
    init_process_group(getattr(args, "backend", "auto"))
    try:
        data = yaml.safe_load(Path(args.config).read_text()) or {}
        if "saes" in data:
            from saekit.train.multi import MultiConfig, train_multi

            results = train_multi(MultiConfig.from_yaml(args.config), resume=resume)
            summary = [{"name": n, "final_sae": str(r.final_sae), "steps": r.state.step, "tokens": r.state.tokens}
                       for n, r in results.items()]
        else:
            from saekit.pipeline import load_run_config

            r = train_run(load_run_config(args.config), resume=resume)
            summary = [{"final_sae": str(r.final_sae), "steps": r.state.step, "tokens": r.state.tokens}]
        if current_sync().is_main:
            for line in summary:
                print(json.dumps(line))
        return 0
    finally:
        shutdown()



def cmd_cache_distributed(args) -> int:
    """`saekit cache CONFIG` under torchrun (WORLD_SIZE > 1): sharded caching over gloo."""
    from saekit.pipeline import load_run_config

    cfg = load_run_config(args.config)
    rank, world = init_process_group("gloo")
    try:
        for summary in cache_distributed(cfg, rank, world).values():
            print(json.dumps(summary))
        return 0
    finally:
        shutdown()
