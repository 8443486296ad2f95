"""Many SAEs from one forward pass: identical to separate runs, from the store and from a stream."""

from __future__ import annotations

import pytest
import torch

from saekit.data.synthetic import planted_features
from saekit.sae.registry import create, load_sae
from saekit.sources.base import ActivationBatch, SourceConfig
from saekit.sources.embeddings import EmbeddingSource
from saekit.store.reader import ActivationStore
from saekit.train import TrainConfig, train
from saekit.run.config import MultiConfig
from saekit.run.multi import train_multi
from saekit.train.multi import MemoryBudgetError, SharedBatches, ShuffleBuffer, stream_blocks

TRAIN = {"total_steps": 12, "batch_size": 32, "lr": 2e-3, "checkpoint_every": 6, "log_every": 4,
         "progress_bar": False}
SAES = [
    {"name": "narrow", "sae": {"architecture": "topk", "d_sae": 128, "k": 4}},
    {"name": "wide-batchtopk", "sae": {"architecture": "topk", "d_sae": 256, "k": 8, "batch_topk": True},
     "train": {"normalize_activations": "expected_average_only_in", "norm_batches": 3}},  # reads 3 warm-up batches
    {"name": "mp", "sae": {"architecture": "mp", "d_sae": 128, "k": 3}},
]


def _state(sae) -> dict:
    return {n: t.detach() for n, t in [*sae.named_parameters(), *sae.named_buffers()]}


def _assert_same(a, b) -> None:
    sa, sb = _state(a), _state(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def _separate(spec: dict, batches, d_in: int, hook: str, run_dir):
    sae = create({"d_in": d_in, "hook_name": hook, "seed": 0, **spec["sae"]})
    return train(sae, batches, TrainConfig.from_dict({**TRAIN, **spec.get("train", {})}), run_dir)


def test_one_pass_feeding_three_saes_equals_three_separate_store_runs(tmp_path, minilm, tweets):
    source = EmbeddingSource(SourceConfig(kind="embedding", batch_size=32), minilm)
    cfg = MultiConfig.from_dict({"name": "m", "output_dir": str(tmp_path / "m"), "source": {"kind": "embedding"},
                                 "store": {"docs_per_shard": 64}, "train": TRAIN, "saes": SAES})
    results = train_multi(cfg, source=source, docs=tweets[:120])
    store = ActivationStore(cfg.store_dir)
    assert len(store) == 120
    for spec in SAES:
        sep = _separate(spec, store.batches(32, seed=0), store.d_in, store.hook, tmp_path / spec["name"])
        _assert_same(results[spec["name"]].sae, sep.sae)
        assert (cfg.run_dir / "train" / spec["name"] / "final_sae").is_dir()
        load_sae(cfg.run_dir / "train" / spec["name"])


class TwoHookSource:
    """A deterministic 'model' with two hook points; counts its forward passes."""

    hooks = ["layer.a", "layer.b"]
    d_in = {"layer.a": 12, "layer.b": 20}

    def __init__(self):
        self.forwards = 0
        self.a = planted_features(4000, 12, 24, avg_active=3, seed=1).x_ND
        self.b = planted_features(4000, 20, 40, avg_active=3, seed=2).x_ND

    def iter_batches(self, docs):
        for i in range(0, len(docs), 4):  # 4 documents of 10 "tokens" per forward pass
            self.forwards += 1
            ids = torch.tensor([d["doc_id"] for d in docs[i:i + 4]])
            rows = (ids[:, None] * 10 + torch.arange(10)).flatten() % 4000
            yield ActivationBatch({"layer.a": self.a[rows], "layer.b": self.b[rows]}, ids.repeat_interleave(10),
                                  torch.arange(10).repeat(len(ids)), torch.zeros(len(rows), dtype=torch.int32))

    def spec(self):
        return {"kind": "test", "model": "two-hook", "hooks": self.hooks, "d_in": self.d_in}


STREAM_SAES = [
    {"name": "a-topk", "hook": "layer.a", "sae": {"architecture": "topk", "d_sae": 48, "k": 3}},
    {"name": "a-wide", "hook": "layer.a", "sae": {"architecture": "topk", "d_sae": 96, "k": 6},
     "train": {"normalize_activations": "expected_average_only_in", "norm_batches": 2}},
    {"name": "b-topk", "hook": "layer.b", "sae": {"architecture": "topk", "d_sae": 64, "k": 4}},
]
DOCS = [{"doc_id": i, "text": "", "labels": {}} for i in range(60)]  # 600 rows per epoch: the run wraps around


def test_streaming_multi_run_equals_separate_runs_fed_the_same_stream(tmp_path):
    src = TwoHookSource()
    cfg = MultiConfig.from_dict({"name": "s", "output_dir": str(tmp_path / "s"), "mode": "stream",
                                 "buffer": {"capacity_rows": 256}, "train": TRAIN, "saes": STREAM_SAES})
    results = train_multi(cfg, source=src, docs=DOCS)
    shared_forwards = src.forwards
    assert not (cfg.run_dir / "store").exists()
    for spec in STREAM_SAES:
        h = spec["hook"]
        ref_src = TwoHookSource()
        buf = ShuffleBuffer(lambda s=ref_src, h=h: (b[h] for b in stream_blocks(s, DOCS)), ref_src.d_in[h], 256, 32)
        sep = _separate(spec, buf, ref_src.d_in[h], h, tmp_path / spec["name"])
        _assert_same(results[spec["name"]].sae, sep.sae)
    # one pass fed all three: no more forwards than the hungriest single SAE needed
    assert shared_forwards <= ref_src.forwards + 1


def test_shuffle_buffer_resume_replays_exactly():
    src = TwoHookSource()

    def make():
        return ShuffleBuffer(lambda: (b["layer.a"] for b in stream_blocks(src, DOCS)), 12, 100, 16, seed=3)

    a = make()
    first = [a.next_batch() for _ in range(30)]
    state = a.state_dict()
    b = make()
    b.load_state_dict(state)
    assert torch.equal(torch.cat([a.next_batch() for _ in range(5)]), torch.cat([b.next_batch() for _ in range(5)]))
    rows = torch.cat(first)
    assert len(torch.unique(rows, dim=0)) > 0.9 * len(rows)  # sampling without replacement from the buffer


def test_buffer_memory_is_checked_before_allocating():
    with pytest.raises(MemoryBudgetError, match="buffer.max_gb"):
        ShuffleBuffer(lambda: iter([]), 4096, 10**6, 32, max_bytes=2**30)
    with pytest.raises(MemoryBudgetError, match="available"):
        ShuffleBuffer(lambda: iter([]), 10**6, 10**9, 32)  # 4 PB


def test_shared_batches_serve_each_batch_once_and_views_resume():
    class Counting:
        d_in, fingerprint, batch_size = 2, "c", 1

        def __init__(self):
            self.pos = 0

        def next_batch(self):
            self.pos += 1
            return torch.full((1, 2), float(self.pos - 1))

        def state_dict(self):
            return {"pos": self.pos}

        def load_state_dict(self, s):
            self.pos = s["pos"]

    shared = SharedBatches(Counting())
    v1, v2 = shared.view(), shared.view()
    got1 = [int(v1.next_batch()[0, 0]) for _ in range(5)]
    got2 = [int(v2.next_batch()[0, 0]) for _ in range(3)]
    assert got1 == [0, 1, 2, 3, 4] and got2 == [0, 1, 2] and shared.source.pos == 5
    assert sorted(shared.cache) == [3, 4]  # only what the slower view still needs
    s1, s2 = v1.state_dict(), v2.state_dict()
    fresh = SharedBatches(Counting())
    w1, w2 = fresh.view(), fresh.view()
    w1.load_state_dict(s1)
    w2.load_state_dict(s2)
    assert int(w2.next_batch()[0, 0]) == 3 and int(w1.next_batch()[0, 0]) == 5
