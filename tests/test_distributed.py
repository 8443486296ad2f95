"""Distributed training and caching on CPU with gloo: equal to one process, resumable, never hanging.

One spawn of two worker processes runs every two-rank training scenario (starting processes is the
slow part); the one-process references run in the test process.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml

from saekit.artifacts import load_tensors, save_tensors
from saekit.errors import ConfigError
from saekit.run.config import load_run_config
from saekit.run.stages import cache_distributed, cache_stage
from saekit.sae.registry import load_sae
from saekit.store.batches import TensorBatches
from saekit.store.reader import ActivationStore
from saekit.store.writer import merge_manifests
from saekit.train import Callback, train
from saekit.train.checkpoint import read_checkpoint
from saekit.train.distributed import DistributedSync

from train_helpers import make_data, make_setup

STEPS, CUT_AT = 20, 10
# The real top-k SAE; a latent silent for one global batch counts as dead, so AuxK runs.
DEAD = {"dead_tokens_threshold": 32}
TOPK = {"arch": "topk", "total_steps": STEPS, "checkpoint_every": 5, "sae_overrides": DEAD}


class Cut(Exception):
    """Stands in for a crash right after the checkpoint of step CUT_AT."""


class CutAfter(Callback):
    def on_checkpoint(self, run, path):
        if run.state.step == CUT_AT:
            raise Cut()


def _batches(x, rank, world):
    return TensorBatches(x, 32, seed=1, rank=rank, world_size=world)


def _state(sae) -> dict:
    return {n: t.detach().clone() for n, t in [*sae.named_parameters(), *sae.named_buffers()]}


def _train_worker(rank: int, world: int, root: str) -> None:
    """Every two-rank scenario, in one process group."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{root}/pg", rank=rank, world_size=world)
    root = Path(root)
    try:
        for name, extra in [("full", {}), ("btopk", {"sae_overrides": {**DEAD, "batch_topk": True}}),
                            ("matry", {"arch": "matryoshka"})]:
            sae, _, cfg = make_setup(**{**TOPK, **extra})
            res = train(sae, _batches(make_data(), rank, world), cfg, root / name)
            save_tensors(root / f"{name}-rank{rank}.safetensors", _state(res.sae))
        sae, _, cfg = make_setup(**TOPK)
        try:
            train(sae, _batches(make_data(), rank, world), cfg, root / "cut", callbacks=[CutAfter()])
        except Cut:
            pass
        sae, _, cfg = make_setup(**TOPK)
        train(sae, _batches(make_data(), rank, world), cfg, root / "cut", resume=True)
        # 1001 rows, global batch 33: neither divides by the world size; 40 steps cross epochs.
        sae, _, cfg = make_setup(data=make_data(1001), batch_size=33, total_steps=40, checkpoint_every=0)
        train(sae, TensorBatches(make_data(1001), 33, seed=1, rank=rank, world_size=world), cfg, root / "ragged")
        (root / f"done-{rank}").write_text("ok")
    finally:
        dist.destroy_process_group()


def _spawn(fn, world: int, root: Path, timeout_s: float = 120) -> None:
    """Start `world` processes running fn(rank, world, root); fail (and kill them) if they hang."""
    ctx = mp.start_processes(fn, args=(world, str(root)), nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"distributed workers still running after {timeout_s} s (hang)")


@pytest.fixture(scope="module")
def two_rank(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ddp")
    _spawn(_train_worker, 2, root)
    return root


def _weights(run_dir: Path) -> dict:
    return {n: t for n, t in _state(load_sae(run_dir / "final_sae")).items()}


def _assert_close(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for n in a:
        assert a[n].shape == b[n].shape, n
        assert torch.allclose(a[n].double(), b[n].double(), atol=atol, rtol=0), (n, (a[n] - b[n]).abs().max())


def _one_process(tmp_path: Path, name: str, **extra):
    sae, batches, cfg = make_setup(**{**TOPK, **extra})
    return train(sae, batches, cfg, tmp_path / name)


def test_two_processes_equal_one_process_with_the_same_global_batch(two_rank, tmp_path):
    one = _one_process(tmp_path, "one")
    _assert_close(_weights(two_rank / "full"), _weights(one.run_dir), atol=1e-5)
    # the training statistics (dead-latent counters) are global too, and AuxK was engaged
    rank0 = load_tensors(two_rank / "full-rank0.safetensors")
    assert torch.equal(rank0["tokens_since_fired"], one.sae.tokens_since_fired)
    assert (one.sae.tokens_since_fired >= 32).any(), "no latent was dead: AuxK never ran"
    assert read_checkpoint(two_rank / "full").state.tokens == one.state.tokens == STEPS * 32


def test_ranks_hold_identical_state_including_batchtopk_threshold(two_rank):
    for name in ("full", "matry", "btopk"):
        r0, r1 = (load_tensors(two_rank / f"{name}-rank{r}.safetensors") for r in (0, 1))
        assert r0.keys() == r1.keys()
        assert all(torch.equal(r0[k], r1[k]) for k in r0), name
    assert float(r0["threshold"]) > 0


def test_matryoshka_two_processes_equal_one_process(two_rank, tmp_path):
    """The matryoshka SAE's prefix losses and per-level AuxK need nothing new from distributed training."""
    one = _one_process(tmp_path, "matry", arch="matryoshka")
    _assert_close(_weights(two_rank / "matry"), _weights(one.run_dir), atol=1e-5)


def test_checkpoints_written_once_and_resumed_two_rank_run_equals_uninterrupted(two_rank):
    names = sorted(p.name for p in (two_rank / "cut" / "checkpoints").iterdir())
    assert names == ["latest", "step-00000005", "step-00000010", "step-00000015", "step-00000020"]
    assert not list((two_rank / "cut").rglob("*.tmp"))
    cut, full = _weights(two_rank / "cut"), _weights(two_rank / "full")
    assert all(torch.equal(cut[k], full[k]) for k in full)
    lines = (two_rank / "cut" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(ln)["step"] for ln in lines] == list(range(5, STEPS + 1, 5))  # rank 0 only, no duplicates


def test_resume_with_a_different_world_size(two_rank, tmp_path):
    """The 2-rank checkpoint of step 10, continued by one process, equals an uninterrupted 1-process run."""
    run = tmp_path / "resumed"
    shutil.copytree(two_rank / "cut" / "checkpoints" / "step-00000010", run / "checkpoints" / "step-00000010")
    (run / "checkpoints" / "latest").write_text("step-00000010\n")
    sae, batches, cfg = make_setup(**TOPK)
    res = train(sae, batches, cfg, run, resume=True)
    assert res.start_step == CUT_AT
    _assert_close(_weights(run), _weights(_one_process(tmp_path, "one").run_dir), atol=1e-5)


def test_non_divisible_dataset_finishes_and_saves(two_rank):
    """docs/RELIABILITY.md 26: the workers finished within the spawn timeout and rank 0 saved."""
    assert (two_rank / "done-0").exists() and (two_rank / "done-1").exists()
    assert (two_rank / "ragged" / "final_sae").is_dir()
    assert read_checkpoint(two_rank / "ragged").state.tokens == 40 * 33


def test_sliced_batch_source_must_match_the_process_group():
    class FakeSync(DistributedSync):
        def __init__(self):
            self.rank, self.world_size, self.is_main = 0, 2, True

    with pytest.raises(ConfigError, match="world_size=1"):
        FakeSync().check_batches(TensorBatches(make_data(64), 32), 32)
    with pytest.raises(ConfigError, match="smaller than world_size"):
        FakeSync().check_batches(TensorBatches(make_data(64), 1, world_size=2), 1)


# -- caching ----------------------------------------------------------------------------------------
def _cache_config(tmp: Path, name: str) -> Path:
    cfg = {"name": name, "output_dir": str(tmp / name), "corpus": {"max_docs": 100},
           "source": {"kind": "embedding", "batch_size": 32}, "store": {"docs_per_shard": 16}}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _cache_worker(rank: int, world: int, root: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{root}/pg-cache", rank=rank, world_size=world)
    try:
        cache_distributed(load_run_config(Path(root) / "two.yaml"), rank, world)
    finally:
        dist.destroy_process_group()


def _row_hashes(store: ActivationStore) -> list[str]:
    acts, doc = store[:], store.meta("doc_id")
    return sorted(hashlib.sha256(a.numpy().tobytes() + d.numpy().tobytes()).hexdigest() for a, d in zip(acts, doc))


def test_two_rank_caching_gives_the_rows_of_one_rank_caching(tmp_path, one_thread):
    """Bitwise equal rows, so the one-rank reference runs with the workers' thread count: the embedder's
    matmuls reduce in a thread-count-dependent order (1 vs 2 threads moves a few values by ~1e-7)."""
    one_cfg = load_run_config(_cache_config(tmp_path, "one"))
    one = next(iter(cache_stage(one_cfg).values()))
    _cache_config(tmp_path, "two")
    _spawn(_cache_worker, 2, tmp_path, timeout_s=150)
    two = ActivationStore(tmp_path / "two" / "store")
    assert two.complete and len(two) == len(one) and len(two.shards) == len(one.shards) == 7
    assert _row_hashes(two) == _row_hashes(one)
    parts = sorted(p.name for p in two.path.glob("manifest.rank-*.json"))
    assert parts == ["manifest.rank-0.json", "manifest.rank-1.json"]
    by_rank = [json.loads((two.path / p).read_text())["shards"] for p in parts]
    assert [[e["index"] for e in s] for s in by_rank] == [[0, 2, 4, 6], [1, 3, 5]]


def test_distributed_cache_resumes_per_rank(tmp_path):
    """Rank 1 lost its last shard (killed mid-job): re-running rank 1 redoes only that shard."""
    cfg = load_run_config(_cache_config(tmp_path, "r"))
    for rank in (0, 1):
        cache_stage(cfg, rank, 2)
    merge_manifests(cfg.store_dir)
    full = _row_hashes(ActivationStore(cfg.store_dir))
    part = cfg.store_dir / "sentence_embedding" / "manifest.rank-1.json"
    m = json.loads(part.read_text())
    lost = m["shards"].pop()
    m["rows"] -= lost["rows"]
    part.write_text(json.dumps(m))
    (cfg.store_dir / "sentence_embedding" / lost["file"]).unlink()
    before = {p.name: p.stat().st_mtime_ns for p in (cfg.store_dir / "sentence_embedding").glob("shard-*")}
    cache_stage(cfg, 1, 2)
    merge_manifests(cfg.store_dir)
    after = {p.name: p.stat().st_mtime_ns for p in (cfg.store_dir / "sentence_embedding").glob("shard-*")}
    assert {k for k in after if before.get(k) != after[k]} == {lost["file"]}
    store = ActivationStore(cfg.store_dir)
    assert store.complete and _row_hashes(store) == full
