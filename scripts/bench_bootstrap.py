"""What the error bars cost: the eval of a run's held-out documents with and without the bootstrap.

Two measures, both in CPU seconds (process time; run it with one thread), so the shared machine's
other jobs do not count:

* `eval_stage`: the whole eval stage (`saekit eval RUN`: held-out pass, description length,
  outliers, training-row gap, splice-in loss for an LLM run, report and figures) on a copy of the run
  under `--work` (its config pointed at the run's store, which is only read), with the CPU time spent
  inside the bootstrap's code (per-document sums, resampled statistics, intervals) added up: the
  bootstrap's share of the eval.
* `evaluate_sae`: the held-out pass alone. Runs `saekit.eval.report.evaluate_sae` on the run's held-out ordinary rows exactly as the eval stage
does (same batches, doc ids, retrieval rows for an embedding store; the splice-in pass, an LLM
forward that would only dilute the share, is left out), once with the default 1,000 resamples and
once with `bootstrap_resamples=0`, interleaved, after one warm-up of each. Prints ONE JSON line:
the median CPU seconds of each (process time, one thread) and the bootstrap's share of the eval with intervals,
(t_with - t_without) / t_with.

    python scripts/bench_bootstrap.py RUN_FOLDER [RUN_FOLDER ...] --work /tmp/bench [--repeats 5] [--no-stage]
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from saekit.eval.report import evaluate_sae  # noqa: E402
from saekit.layout import RunFolder  # noqa: E402
from saekit.run.config import load_run_config  # noqa: E402
from saekit.run.outliers import eval_rows  # noqa: E402
from saekit.run.stages import checked_sae_and_store, heldout_batches  # noqa: E402


def eval_inputs(run: Path):
    """(sae, batch factory, retrieval rows) for the run's held-out ordinary rows, as eval_stage builds them."""
    cfg = load_run_config(RunFolder(run).config)
    sae, store, _ = checked_sae_and_store(RunFolder(run))
    _, held = store.split_by_document(cfg.eval.holdout, seed=cfg.seed)
    held = held[: cfg.eval.max_rows] if cfg.eval.max_rows else held
    chunks = heldout_batches(eval_rows(store, held).ordinary, cfg.eval.batch_rows)
    doc_N = store.meta("doc_id")
    data = [(store[c], doc_N[c]) for c in chunks]  # read once: the bench times the eval, not the disk
    retrieval = cfg.eval.retrieval_rows if store.kind == "embedding" else 0
    return sae, data, retrieval, cfg.eval.retrieval_k


def once(sae, data, retrieval: int, k: int, resamples: int) -> float:
    t0 = time.process_time()  # CPU seconds: the shared machine's other jobs do not count (one thread)
    evaluate_sae(sae, data, retrieval_rows=retrieval, retrieval_k=k, bootstrap_resamples=resamples)
    return time.process_time() - t0


def bench(run: Path, repeats: int) -> dict:
    sae, data, retrieval, k = eval_inputs(run)
    with_s, without_s = [], []
    for i in range(repeats + 1):  # the first round is the warm-up
        a = once(sae, data, retrieval, k, 1000)
        b = once(sae, data, retrieval, k, 0)
        if i:
            with_s.append(a)
            without_s.append(b)
    share = [(a - b) / a for a, b in zip(with_s, without_s)]
    return {"run": str(run), "rows": sum(len(x) for x, _ in data), "with_bootstrap_s": statistics.median(with_s),
            "without_bootstrap_s": statistics.median(without_s), "bootstrap_share": statistics.median(share),
            "share_min_max": [min(share), max(share)]}


class Attribution:
    """CPU seconds spent inside the wrapped functions (outermost calls only: nested ones are inside)."""

    def __init__(self):
        self.seconds, self.depth = 0.0, 0

    def wrap(self, fn):
        @functools.wraps(fn)
        def timed(*a, **kw):
            self.depth += 1
            t0 = time.process_time()
            try:
                return fn(*a, **kw)
            finally:
                self.depth -= 1
                if self.depth == 0:
                    self.seconds += time.process_time() - t0
        return timed


def patch_bootstrap(att: Attribution) -> None:
    """Route the bootstrap's entry points through `att` (module attributes, looked up at call time)."""
    from saekit.eval import bootstrap, report, splice

    bootstrap.Bootstrap.values = att.wrap(bootstrap.Bootstrap.values)
    bootstrap.Bootstrap.__init__ = att.wrap(bootstrap.Bootstrap.__init__)
    for mod in (bootstrap, report):
        mod.percentile_interval = att.wrap(bootstrap.percentile_interval)
    report.add_unit_sums = att.wrap(report.add_unit_sums)
    splice.splice_intervals = att.wrap(splice.splice_intervals)


def copy_run(run: Path, work: Path):
    """A copy of the run's config and trained SAE under `work`, reading the run's store in place."""
    from saekit.config import read_yaml_mapping
    from saekit.run.config import RunConfig

    data = read_yaml_mapping(RunFolder(run).config, "a run config")
    dest = work / run.name
    shutil.rmtree(dest, ignore_errors=True)
    data["output_dir"] = str(dest)
    data["store"]["path"] = str(RunFolder(run).store.resolve())
    shutil.copytree(RunFolder(run).train(), dest / "train", ignore=shutil.ignore_patterns("checkpoints"))
    return RunConfig.from_dict(data)


def stage(run: Path, work: Path) -> dict:
    from saekit.run.stages import eval_stage

    cfg = copy_run(run, work)
    att = Attribution()
    patch_bootstrap(att)
    t0 = time.process_time()
    eval_stage(cfg)
    total = time.process_time() - t0
    return {"run": str(run), "eval_stage_cpu_s": total, "bootstrap_cpu_s": att.seconds,
            "bootstrap_share": att.seconds / total}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--work", type=Path, required=True, help="where the eval stage's run copies are written")
    ap.add_argument("--no-stage", action="store_true", help="skip the whole-stage measure (the LLM's is minutes)")
    args = ap.parse_args()
    torch.manual_seed(0)
    pairs = [bench(r, args.repeats) for r in args.runs]  # before the stage patches its functions
    stages = [] if args.no_stage else [stage(r, args.work) for r in args.runs]
    print(json.dumps({"bench": "bootstrap", "torch_threads": torch.get_num_threads(),
                      "evaluate_sae": pairs, "eval_stage": stages}))


if __name__ == "__main__":
    main()
