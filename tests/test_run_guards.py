"""Guards of the run layer against bad data, names and configs (issue 14): an interrupted cache is not
trained on, an empty corpus is refused by every stage, names cannot leave the run folder, and the
`sae:` section fails at load time."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from support.planted import PlantedSource
from support.runs import WORDS, llm_spec, synthetic_docs

from saekit.errors import EmptyDataError, IncompleteStoreError
from saekit.run.config import RunConfig
from saekit.run.stages import eval_stage, train_run
from saekit.store.writer import StoreConfig, cache_activations

TRAIN = {"total_steps": 4, "batch_size": 16, "log_every": 2, "checkpoint_every": 0, "progress_bar": False}


def _config(tmp_path: Path, **extra) -> RunConfig:
    data = {"name": "guard", "output_dir": str(tmp_path / "run"), "source": {"kind": "hf", "model": "m", "hooks": ["h"]},
            "store": {"path": str(tmp_path / "cache"), "docs_per_shard": 10},
            "sae": {"architecture": "topk", "d_sae": 32, "k": 4}, "train": TRAIN, **extra}
    return RunConfig.from_dict(data)


def _cache(tmp_path: Path, docs: list[dict], stop_after_shards: int | None = None) -> None:
    source = PlantedSource(llm_spec("m", "h", 16), len(WORDS) + 2, every=0)
    cache_activations(source, docs, tmp_path / "cache", StoreConfig(docs_per_shard=10),
                      stop_after_shards=stop_after_shards)


def test_training_refuses_an_interrupted_store_and_says_how_to_resume(tmp_path):
    _cache(tmp_path, synthetic_docs(30), stop_after_shards=1)
    with pytest.raises(IncompleteStoreError, match=r"incomplete: 1 of 3 shards cached \(shards \[0\]\).*saekit cache"):
        train_run(_config(tmp_path))
    assert not (tmp_path / "run" / "train" / "final_sae").exists()
    _cache(tmp_path, synthetic_docs(30))  # resumed: now it trains
    assert train_run(_config(tmp_path)) is not None


def test_caching_an_empty_corpus_is_refused(tmp_path):
    with pytest.raises(EmptyDataError, match="0 documents"):
        _cache(tmp_path, [])


def test_a_store_with_zero_rows_is_refused_by_train_and_eval(tmp_path):
    docs = [{"doc_id": i, "text": "", "labels": {}} for i in range(12)]  # no tokens: 0 rows
    _cache(tmp_path, docs)
    with pytest.raises(EmptyDataError, match="0 rows"):
        train_run(_config(tmp_path))
    with pytest.raises(EmptyDataError, match="0 rows"):
        eval_stage(_config(tmp_path))


def test_zero_rows_left_after_holding_out_is_refused(tmp_path):
    _cache(tmp_path, synthetic_docs(1))  # one document: holding it out leaves nothing
    with pytest.raises(EmptyDataError, match="0 rows left to train on"):
        train_run(_config(tmp_path, eval={"holdout": 0.5}))


# -- the run config's `sae:` section and top level ------------------------------------------------
def test_a_typo_in_the_sae_section_fails_when_the_config_loads(tmp_path):
    from saekit.errors import ConfigError
    from saekit.run.config import load_run_config

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"source": {"kind": "hf", "model": "m", "hooks": ["h"]},
                                    "sae": {"architecture": "topk", "d_sae": 32, "kk": 4}, "train": TRAIN}))
    with pytest.raises(ConfigError, match=r"sae: .*unknown key 'kk' \(did you mean 'k'\?\)"):
        load_run_config(path)
    multi = tmp_path / "multi.yaml"
    multi.write_text(yaml.safe_dump({"source": {"kind": "hf", "model": "m", "hooks": ["h"]},
                                     "saes": [{"name": "a", "sae": {"architecture": "topk", "d_sae": -3}}]}))
    with pytest.raises(ConfigError, match=r"saes\[a\]\.sae: .*d_sae"):
        load_run_config(multi)


@pytest.mark.parametrize("text", ["- a\n- b\n", "42\n", "just words\n"])
def test_a_top_level_list_or_scalar_is_a_named_config_error(tmp_path, text):
    from saekit.errors import ConfigError
    from saekit.run.config import load_run_config
    from saekit.train.config import TrainConfig

    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="expected a mapping"):
        TrainConfig.from_yaml(path)
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_run_config(path)


# -- names that become folders, and file names read from artifacts --------------------------------
BAD_NAMES = ["../escape", "/abs/path", "a/b", "a\\b", "", "..", ".", " x"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_run_and_sae_names_cannot_leave_the_run_folder(tmp_path, name):
    from saekit.errors import UnsafeNameError
    from saekit.layout import RunFolder
    from saekit.run.config import MultiConfig

    with pytest.raises(UnsafeNameError, match="name"):
        RunConfig.from_dict({"name": name})
    with pytest.raises(UnsafeNameError, match="name"):
        MultiConfig.from_dict({"saes": [{"name": name, "sae": {"architecture": "topk", "d_sae": 8, "k": 2}}]})
    with pytest.raises(UnsafeNameError):
        RunFolder(tmp_path).train(name or "..")
    with pytest.raises(UnsafeNameError):
        RunFolder(tmp_path, sae=name)
    assert not (tmp_path.parent / "escape").exists()


def test_a_shard_file_name_escaping_the_store_is_refused(tmp_path):
    import json

    from saekit.errors import CorruptArtifactError
    from saekit.store.reader import ActivationStore

    _cache(tmp_path, synthetic_docs(12))
    store = ActivationStore(tmp_path / "cache", hook="h")
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes((store.path / "shard-00000.safetensors").read_bytes())
    m = json.loads((store.path / "manifest.json").read_text())
    m["shards"][0]["file"] = "../../outside.safetensors"
    (store.path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CorruptArtifactError, match="leaves its folder"):
        ActivationStore(store.path, verify=False)[0:2]


def test_manifest_and_latest_pointer_names_escaping_their_folder_are_refused(tmp_path):
    import json

    from saekit.artifacts import MANIFEST, verify_manifest
    from saekit.errors import CorruptArtifactError
    from saekit.train.checkpoint import latest_checkpoint

    folder = tmp_path / "sae"
    folder.mkdir()
    (tmp_path / "secret.txt").write_text("x")
    (folder / MANIFEST).write_text(json.dumps({"format_version": 1, "files": {"../secret.txt": "0" * 64}}))
    with pytest.raises(CorruptArtifactError, match="leaves its folder"):
        verify_manifest(folder)
    ckpts = tmp_path / "run" / "checkpoints"
    (tmp_path / "run" / "step-00000001").mkdir(parents=True)
    ckpts.mkdir()
    (ckpts / "latest").write_text("../step-00000001\n")
    with pytest.raises(CorruptArtifactError, match="latest"):
        latest_checkpoint(tmp_path / "run")


# -- promise 29: hooks are gone after an exception inside a hooked forward ------------------------
def _raising_layer(model, index: int):
    """Make transformer block `index` raise when it runs (no hook of the test's own)."""
    block = model.transformer.h[index]

    def boom(*args, **kwargs):
        raise RuntimeError("inside the hooked forward")

    block.forward = boom


def test_cache_and_splice_leave_zero_hooks_after_an_exception_in_the_forward(tmp_path):
    from support.hooks import count_hooks
    from support.runs import tiny_lm

    from saekit.eval.splice import splice_lm_loss
    from saekit.sources.base import SourceConfig
    from saekit.sources.factory import make_source

    source = make_source(SourceConfig(kind="hf", model=str(tiny_lm(tmp_path / "lm")), hooks=["transformer.h.0"],
                                      batch_size=4, max_length=16))
    model = source.model
    assert count_hooks(model) == 0
    _raising_layer(model, 0)  # the hooked layer itself raises: the hook is already installed
    with pytest.raises(RuntimeError, match="inside the hooked forward"):
        cache_activations(source, synthetic_docs(6), tmp_path / "cache", StoreConfig(docs_per_shard=3))
    assert count_hooks(model) == 0
    del model.transformer.h[0].forward  # back to the class's forward
    _raising_layer(model, 1)  # a layer after the splice point raises while the splice hook is active
    with pytest.raises(RuntimeError, match="inside the hooked forward"):
        splice_lm_loss(model, source.tok, "transformer.h.0", texts=["the cat runs", "a dog sleeps"],
                       reconstruct=lambda a: a.clone(), max_length=16)
    assert count_hooks(model) == 0


def _hooks_left(model) -> list[str]:
    """Every module hook left anywhere (forward, pre-forward, backward, backward-pre, and torch's global
    module hooks): promise 29 says none, not "as many as before"."""
    from torch.nn.modules import module as torch_module

    left = [f"global {n}" for n in ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                                     "_global_backward_pre_hooks") if getattr(torch_module, n, None)]
    for name, m in model.named_modules():
        for kind in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"):
            if getattr(m, kind, None):
                left.append(f"{name or '<root>'}.{kind}")
    return left


def _raising_while_hooked(model, index: int, hooked) -> None:
    """Make block `index` raise only while `hooked` (a module) holds a forward hook: the exception then
    comes from inside the steered forward, never from the unsteered one before it."""
    block = model.transformer.h[index]
    plain = type(block).forward.__get__(block)

    def forward(*args, **kwargs):
        if hooked._forward_hooks:
            raise RuntimeError("inside the steered forward")
        return plain(*args, **kwargs)

    block.forward = forward


def test_steering_leaves_zero_hooks_on_every_module_after_an_exception(tmp_path):
    """Promise 29 for steering: `steer`, `steer_conditional` and `generate_steered` raise from the body,
    from the edit itself and from a later layer, and afterwards no module holds any hook."""
    import torch
    from support.runs import tiny_lm

    from saekit.analysis.conditional import steer_conditional
    from saekit.analysis.steering import FeatureEdit, generate_steered, steer
    from saekit.errors import ShapeMismatchError
    from saekit.sae.registry import create
    from saekit.sources.models import load_lm

    model, tok = load_lm(str(tiny_lm(tmp_path / "lm")))
    hook, d = "transformer.h.0", model.config.n_embd
    ids = tok("the cat runs", return_tensors="pt").input_ids
    sae = create({"architecture": "topk", "d_in": d, "d_sae": 4 * d, "k": 4, "seed": 0}).eval()
    wrong_sae = create({"architecture": "topk", "d_in": d + 1, "d_sae": 8, "k": 2, "seed": 0}).eval()
    assert _hooks_left(model) == []
    with pytest.raises(RuntimeError, match="in the body"), steer(model, hook, vector=torch.randn(d), alpha=1.0):
        assert _hooks_left(model) == [f"{hook}._forward_hooks"]  # the steering hook is really installed
        raise RuntimeError("in the body")
    assert _hooks_left(model) == []
    with pytest.raises(ShapeMismatchError), torch.no_grad():  # the SAE's own check raises inside the hook
        with steer(model, hook, sae=wrong_sae, edits=[FeatureEdit(0, "clamp", value=1.0)]):
            model(ids)
    assert _hooks_left(model) == []
    with pytest.raises(RuntimeError, match="in the body"):
        with steer_conditional(model, hook, sae=sae, detector=0, edits=[FeatureEdit(1, alpha=2.0)]):
            raise RuntimeError("in the body")
    assert _hooks_left(model) == []
    _raising_while_hooked(model, 1, model.transformer.h[0])  # a layer after the steered one raises
    with pytest.raises(RuntimeError, match="inside the steered forward"), torch.no_grad():
        with steer(model, hook, sae=sae, edits=[FeatureEdit(2, alpha=3.0)]):
            model(ids)
    assert _hooks_left(model) == []
    with pytest.raises(RuntimeError, match="inside the steered forward"):
        generate_steered(model, tok, "the cat", hook, vector=torch.randn(d), alpha=2.0, max_new_tokens=3)
    assert _hooks_left(model) == []
    del model.transformer.h[1].forward  # the model still generates, unsteered and steered
    out = generate_steered(model, tok, "the cat", hook, vector=torch.randn(d), alpha=2.0, max_new_tokens=3)
    assert set(out) >= {"default", "steered"} and _hooks_left(model) == []


# -- promise 30: repeated extractions hold on to nothing ------------------------------------------
def test_fifty_extractions_leave_no_tensors_or_python_memory_behind(tmp_path):
    import gc
    import tracemalloc
    import weakref

    from support.hooks import count_hooks
    from support.runs import tiny_lm

    from saekit.sources.base import SourceConfig
    from saekit.sources.factory import make_source

    source = make_source(SourceConfig(kind="hf", model=str(tiny_lm(tmp_path / "lm")), hooks=["transformer.h.0"],
                                      batch_size=4, max_length=16))
    docs = synthetic_docs(8)
    refs = []

    def extract() -> None:
        for batch in source.iter_batches(docs):
            refs.append(weakref.ref(batch.acts["transformer.h.0"]))

    for _ in range(10):  # warm caches (tokenizer, allocator) before measuring
        extract()
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    for _ in range(50):
        extract()
    gc.collect()
    growth = sum(s.size_diff for s in tracemalloc.take_snapshot().compare_to(before, "filename"))
    tracemalloc.stop()
    assert all(r() is None for r in refs), "an extraction's activations are still referenced"
    assert growth < 512 * 1024, f"python memory grew by {growth} bytes over 50 extractions"
    assert count_hooks(source.model) == 0


# -- promise 30: the shuffle buffer's memory estimate against what it really holds ------------------
D_BUF, CAPACITY, BATCH, BLOCK = 64, 4096, 256, 1000


def _held_bytes(obj) -> int:
    """Bytes of every distinct tensor storage an object holds in its attributes (lists, deques and dicts
    included): the memory the object keeps alive, views counted by the storage they pin."""
    import collections

    import torch

    storages, todo = {}, list(vars(obj).values())
    while todo:
        v = todo.pop()
        if isinstance(v, torch.Tensor):
            st = v.untyped_storage()
            storages[st.data_ptr()] = st.nbytes()
        elif isinstance(v, (list, tuple, collections.deque)):
            todo.extend(v)
        elif isinstance(v, dict):
            todo.extend(v.values())
    return sum(storages.values())


def _buffer_and_estimate(monkeypatch):
    """A ShuffleBuffer over a stream of BLOCK-row blocks, and the byte count it checked before allocating."""
    import torch

    from saekit.train import multi

    estimates, check = [], multi.check_memory

    def spy(n_bytes, max_bytes, what):
        estimates.append(n_bytes)
        return check(n_bytes, max_bytes, what)

    monkeypatch.setattr(multi, "check_memory", spy)

    def stream():
        g = torch.Generator().manual_seed(0)
        while True:
            yield torch.randn(BLOCK, D_BUF, generator=g)

    buf = multi.ShuffleBuffer(stream, D_BUF, CAPACITY, BATCH, seed=0)
    assert len(estimates) == 1
    return buf, estimates[0]


def test_the_buffer_holds_what_its_estimate_says_in_steady_state(monkeypatch):
    """The estimate (capacity x d_in x 4 bytes, checked against buffer.max_gb before allocating) is the
    buffer tensor exactly; beyond it the buffer may keep only the stream's leftover rows (the carry: fewer
    than one block plus one batch). Stated tolerance: estimate + (BLOCK + BATCH) x d_in x 4 bytes."""
    buf, estimate = _buffer_and_estimate(monkeypatch)
    assert estimate == CAPACITY * D_BUF * 4 == buf.buf_CD.nbytes
    slack = (BLOCK + BATCH) * D_BUF * 4
    for _ in range(20):
        buf.next_batch()
        held = _held_bytes(buf)
        assert estimate <= held <= estimate + slack, f"held {held} bytes, estimate {estimate}, slack {slack}"


def test_the_buffer_holds_what_its_estimate_says_right_after_filling(monkeypatch, caplog):
    """Right after the first fill too (the carry once was a view pinning the whole fill: 2x the estimate);
    and the estimate is logged before the buffer is allocated."""
    import logging

    with caplog.at_level(logging.INFO, logger="saekit.train.multi"):
        buf, estimate = _buffer_and_estimate(monkeypatch)
    assert f"shuffle buffer [{CAPACITY}, {D_BUF}] float32: {estimate / 2**30:.3f} GiB" in caplog.text
    held = _held_bytes(buf)
    assert held <= estimate + (BLOCK + BATCH) * D_BUF * 4, f"held {held} bytes, estimate {estimate}"


class _TwoHookSource:
    """A stand-in model with two hooks of different widths: 4 documents x 10 rows per forward."""

    hooks, d_in = ["layer.a", "layer.b"], {"layer.a": 12, "layer.b": 20}

    def iter_batches(self, docs):
        import torch

        from saekit.sources.base import ActivationBatch

        g = torch.Generator().manual_seed(0)
        for i in range(0, len(docs), 4):
            n = 10 * len(docs[i:i + 4])
            ids = torch.tensor([d["doc_id"] for d in docs[i:i + 4]]).repeat_interleave(10)
            yield ActivationBatch({h: torch.randn(n, d, generator=g) for h, d in self.d_in.items()}, ids,
                                  torch.arange(10).repeat(n // 10), torch.zeros(n, dtype=torch.int32))

    def spec(self):
        return {"kind": "test", "model": "two-hook", "hooks": self.hooks, "d_in": self.d_in}


def test_a_stream_runs_buffer_estimate_matches_the_buffers_it_makes(tmp_path, monkeypatch):
    """The run-level estimate (`run/multi.py`: capacity x 4 bytes x the hooks' summed d_in, checked against
    buffer.max_gb before any buffer exists) against the buffers the run really made, after training: their
    tensors are the estimate exactly, and with the carries within estimate + (one forward's rows + one
    batch) x d_in x 4 per hook. A run whose estimate exceeds max_gb is refused before it allocates."""
    from saekit.run import multi as run_multi
    from saekit.run.config import MultiConfig
    from saekit.train.multi import MemoryBudgetError

    made, estimates, check = [], [], run_multi.check_memory

    class Recorded(run_multi.ShuffleBuffer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    def spy(n_bytes, max_bytes, what):
        estimates.append(n_bytes)
        return check(n_bytes, max_bytes, what)

    monkeypatch.setattr(run_multi, "ShuffleBuffer", Recorded)
    monkeypatch.setattr(run_multi, "check_memory", spy)
    saes = [{"name": "a", "hook": "layer.a", "sae": {"architecture": "topk", "d_sae": 24, "k": 2}},
            {"name": "a2", "hook": "layer.a", "sae": {"architecture": "topk", "d_sae": 36, "k": 3}},
            {"name": "b", "hook": "layer.b", "sae": {"architecture": "topk", "d_sae": 40, "k": 2}}]
    train = {"total_steps": 6, "batch_size": 16, "checkpoint_every": 0, "log_every": 3, "progress_bar": False}
    docs = [{"doc_id": i, "text": "", "labels": {}} for i in range(40)]
    base = {"mode": "stream", "train": train, "saes": saes}
    cfg = MultiConfig.from_dict({**base, "name": "s", "output_dir": str(tmp_path / "s"), "buffer": {"capacity_rows": 128}})
    run_multi.train_multi(cfg, source=_TwoHookSource(), docs=docs)
    assert estimates[0] == 128 * 4 * (12 + 20) and len(made) == 2  # one buffer per hook, shared by its SAEs
    assert sum(b.buf_CD.nbytes for b in made) == estimates[0]
    slack = sum((40 + 16) * b.d_in * 4 for b in made)
    held = sum(_held_bytes(b) for b in made)
    assert estimates[0] <= held <= estimates[0] + slack, f"held {held}, estimate {estimates[0]}, slack {slack}"
    small = MultiConfig.from_dict({**base, "name": "t", "output_dir": str(tmp_path / "t"),
                                   "buffer": {"capacity_rows": 128, "max_gb": 0.5 * estimates[0] / 2**30}})
    made.clear()
    with pytest.raises(MemoryBudgetError, match="buffer.max_gb"):
        run_multi.train_multi(small, source=_TwoHookSource(), docs=docs)
    assert made == []  # refused before any buffer was allocated
