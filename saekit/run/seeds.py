"""Seed sweeps (`saekit run CONFIG --seeds N`, `saekit train CONFIG --seeds N`): how much do the figures
move between retrainings that differ only by seed?

Why: a difference between two SAEs means little unless it exceeds what a reseeded retraining of the
same SAE gives. The main run keeps its folder and seed s0; seeds s0+1 .. s0+N-1 each train and
evaluate into `RUN/seeds/seed-<s>/` (RunFolder.seed_run), reading the main run's store, and
`RUN/seeds/spread.json` holds per headline figure the per-seed values, mean, std and range.
A seed sets initialisation, batch order and the held-out document split alike (the split is seeded by
the run's seed), so the spread includes which documents were held out.
"""

from __future__ import annotations

import dataclasses
import logging

from saekit.artifacts import atomic_write_json
from saekit.errors import ConfigError
from saekit.eval.report_text import seed_spread
from saekit.run.config import RunConfig
from saekit.run.stages import eval_stage, save_resolved, train_stage

log = logging.getLogger(__name__)


def seed_config(cfg: RunConfig, seed: int) -> RunConfig:
    """The config of one extra seed: its own run folder, the main run's store."""
    store = dataclasses.replace(cfg.store, path=str(cfg.store_dir))
    return dataclasses.replace(cfg, seed=int(seed), output_dir=str(cfg.folder.seed_run(seed)), store=store)


def run_seeds(cfg: RunConfig, n: int, main_report: dict | None = None) -> dict:
    """Train and evaluate seeds cfg.seed+1 .. cfg.seed+n-1 (the main run is seed cfg.seed, evaluated
    already when `main_report` is given); write and return the spread."""
    if n < 1:
        raise ConfigError(f"--seeds: expected N >= 1, found {n}")
    reports = {f"seed-{cfg.seed}": main_report if main_report is not None else eval_stage(cfg)}
    for s in range(cfg.seed + 1, cfg.seed + n):
        c = seed_config(cfg, s)
        save_resolved(c)
        log.info("seed sweep: training seed %d into %s", s, c.run_dir)
        train_stage(c)
        reports[f"seed-{s}"] = eval_stage(c)
    spread = seed_spread(reports)
    atomic_write_json(cfg.folder.seed_spread, spread)
    return spread
