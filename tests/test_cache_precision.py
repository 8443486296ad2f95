"""`source.forward_dtype`: the caching forward in bf16 autocast, recorded in the store, refused on a mixed resume.

The error bounds come from `scripts/bench_cache.py --part precision` (README, "Speed on the path users
take"): the per-row relative error ||a_bf16 - a_fp32|| / ||a_fp32|| of SmolLM2 layer-15 rows had median
0.0076 over 31.7k rows (0.0074 on this test's 16 documents) and p99 0.020, with a heavy tail on the
first token after BOS, where the massive activations form (worst rows 0.28-0.68); of MiniLM pooled
vectors median 0.0056, worst 0.010. Casting the weights to bf16 instead of autocast measured medians
0.012 (SmolLM2) and 0.010 (MiniLM): the median bounds below (0.01, 0.008) sit between the two, so they
also say that the weights, the residual stream and the norms stayed fp32. bf16 keeps 8 mantissa bits
(unit roundoff 2^-9), one bf16 matmul of these widths errs ~0.3 % a row, and CPU bf16 kernels accumulate
in fp32, so the median moves little between CPUs. A lower bound checks that the option changed the
forward at all (an ignored option gives bit-identical rows).
"""

from __future__ import annotations

import pytest
import torch

from saekit.errors import ConfigError, StoreExistsError
from saekit.run.folders import store_summary
from saekit import hardware
from saekit.sources import precision
from saekit.sources.base import ActivationBatch, SourceConfig
from saekit.sources.embeddings import EmbeddingSource
from saekit.sources.hf import HFSource
from saekit.store.reader import ActivationStore
from saekit.store.writer import StoreConfig, cache_activations

HOOK = "model.layers.15"


def relative_errors(a_ND: torch.Tensor, ref_ND: torch.Tensor) -> torch.Tensor:
    return (a_ND.float() - ref_ND.float()).norm(dim=1) / ref_ND.float().norm(dim=1)


# -- the option ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", ["bf16", "fp32", "float16", "BFLOAT16"])
def test_bad_forward_dtype_is_a_config_error_naming_field_expected_and_found(bad):
    with pytest.raises(ConfigError, match=r"forward_dtype.*expected.*bfloat16.*found") as e:
        SourceConfig.from_dict({"kind": "embedding", "forward_dtype": bad})
    assert repr(bad) in str(e.value)


def test_run_config_names_the_section_and_field():
    from saekit.run.config import ActivationRunConfig

    with pytest.raises(ConfigError, match=r"^source\.forward_dtype: expected one of \['float32', 'bfloat16', 'auto'\], "
                                          r"found 'bf16'"):
        ActivationRunConfig.from_dict({"source": {"kind": "embedding", "forward_dtype": "bf16"}})
    cfg = ActivationRunConfig.from_dict({"source": {"kind": "embedding", "forward_dtype": "bfloat16"}})
    assert cfg.source.forward_dtype == "bfloat16" and cfg.to_dict()["source"]["forward_dtype"] == "bfloat16"


def test_default_stays_float32():
    assert SourceConfig().forward_dtype == "float32"
    assert SourceConfig.from_dict({"kind": "embedding", "forward_dtype": "auto"}).forward_dtype == "auto"


def test_auto_follows_the_hardware(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_has_bf16", lambda: True)
    assert precision.resolve_forward_dtype("auto", "cpu") == "bfloat16"
    monkeypatch.setattr(hardware, "cpu_has_bf16", lambda: False)
    assert precision.resolve_forward_dtype("auto", "cpu") == "float32"
    assert precision.resolve_forward_dtype("bfloat16", "cpu") == "bfloat16"  # asked for explicitly: honoured
    with precision.forward_context("auto", "cpu"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    with pytest.raises(ConfigError, match="expected one of"):
        precision.resolve_forward_dtype("half")


def test_autocast_only_inside_the_forward_context():
    x, W = torch.randn(4, 8), torch.randn(8, 8)
    with precision.forward_context("bfloat16", "cpu"):
        assert (x @ W).dtype == torch.bfloat16
    assert (x @ W).dtype == torch.float32


# -- MiniLM pooled vectors (fast) -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def emb_pair(minilm):
    fp32 = EmbeddingSource(SourceConfig(kind="embedding", batch_size=32), minilm)
    bf16 = EmbeddingSource(SourceConfig(kind="embedding", batch_size=32, forward_dtype="bfloat16"), minilm)
    return fp32, bf16


def test_bf16_embedding_cache_is_close_but_not_identical_and_recorded(tmp_path, emb_pair, tweets):
    fp32, bf16 = emb_pair
    docs, cfg = tweets[:64], StoreConfig(docs_per_shard=32)
    ref = ActivationStore(cache_activations(fp32, docs, tmp_path / "fp32", cfg)["sentence_embedding"])
    low = ActivationStore(cache_activations(bf16, docs, tmp_path / "bf16", cfg)["sentence_embedding"])
    a, r = low[:], ref[:]
    assert a.dtype == r.dtype == torch.float32  # rows keep the store's dtype
    assert torch.equal(low.meta("doc_id"), ref.meta("doc_id"))
    err = relative_errors(a, r)
    assert not torch.equal(a, r) and err.median() > 1e-4  # the option really changed the forward
    assert err.median() < 0.008 and err.max() < 0.03
    assert low.manifest.source["forward_dtype"] == "bfloat16"
    assert ref.manifest.source["forward_dtype"] == "float32"
    assert store_summary(low)["forward_dtype"] == "bfloat16"  # what `saekit cache` prints


def test_resume_with_another_forward_dtype_is_refused(tmp_path, emb_pair, tweets):
    fp32, bf16 = emb_pair
    docs, cfg = tweets[:64], StoreConfig(docs_per_shard=16)
    cache_activations(bf16, docs, tmp_path / "s", cfg, stop_after_shards=1)  # interrupted after 1 of 4 shards
    with pytest.raises(StoreExistsError) as e:
        cache_activations(fp32, docs, tmp_path / "s", cfg)
    msg = str(e.value)
    assert 'source.forward_dtype: expected "bfloat16" (the store\'s), found "float32" (this job\'s)' in msg
    assert "corpus_fingerprint" not in msg  # only what differs is named
    done = ActivationStore(cache_activations(bf16, docs, tmp_path / "s", cfg)["sentence_embedding"])
    assert done.complete and len(done) == 64  # the same forward dtype resumes


class _FakeSource:
    """A model-free source whose spec may lack `forward_dtype`, as stores cached before it existed."""

    hooks, d_in = ["pooled"], {"pooled": 4}

    def __init__(self, forward_dtype: str | None):
        self.forward_dtype = forward_dtype

    def spec(self) -> dict:
        spec = {"kind": "embedding", "model": "fake", "hooks": self.hooks, "d_in": self.d_in, "dtype": "float32"}
        return spec if self.forward_dtype is None else {**spec, "forward_dtype": self.forward_dtype}

    def iter_batches(self, docs):
        n = len(docs)
        ids = torch.tensor([d["doc_id"] for d in docs])
        yield ActivationBatch(acts={"pooled": torch.stack([ids.float() + 1] * 4, 1)}, doc_id=ids,
                              pos=torch.full((n,), -1, dtype=torch.int32), token_id=torch.full((n,), -1, dtype=torch.int32))


def test_store_cached_before_the_option_resumes_as_float32_only(tmp_path):
    docs = [{"doc_id": i, "text": f"document {i}", "labels": {}} for i in range(8)]
    cfg = StoreConfig(docs_per_shard=4)
    cache_activations(_FakeSource(None), docs, tmp_path / "old", cfg, stop_after_shards=1)
    done = cache_activations(_FakeSource("float32"), docs, tmp_path / "old", cfg)["pooled"]
    assert ActivationStore(done).complete
    cache_activations(_FakeSource(None), docs, tmp_path / "old2", cfg, stop_after_shards=1)
    with pytest.raises(StoreExistsError, match=r'forward_dtype: expected "float32".*found "bfloat16"'):
        cache_activations(_FakeSource("bfloat16"), docs, tmp_path / "old2", cfg)


# -- SmolLM2 layer 15, as the main job -----------------------------------------------------------------
@pytest.mark.slow
def test_bf16_llm_cache_is_close_but_not_identical_and_recorded(tmp_path, smollm, tweets):
    model, tok = smollm
    kw = dict(kind="hf", hooks=[HOOK], max_length=32, batch_size=8)
    fp32 = HFSource(SourceConfig(**kw), model, tok)
    bf16 = HFSource(SourceConfig(**kw, forward_dtype="bfloat16"), model, tok)
    docs, cfg = tweets[:16], StoreConfig(docs_per_shard=16)
    ref = ActivationStore(cache_activations(fp32, docs, tmp_path / "fp32", cfg)[HOOK])
    low = ActivationStore(cache_activations(bf16, docs, tmp_path / "bf16", cfg)[HOOK])
    a, r = low[:], ref[:]
    assert a.dtype == torch.float32 and a.shape == r.shape
    assert torch.equal(low.meta("token_id"), ref.meta("token_id"))
    err = relative_errors(a, r)
    assert not torch.equal(a, r) and err.median() > 1e-4
    assert err.median() < 0.01 and torch.quantile(err, 0.95) < 0.04
    assert torch.isfinite(a).all() and err.max() < 1.0  # the tail (pos 1) is large but bounded
    assert low.manifest.source["forward_dtype"] == "bfloat16"
    assert next(model.parameters()).dtype == torch.float32  # autocast: the shared model's weights untouched


@pytest.mark.slow
def test_bf16_lens_cache_is_close_and_recorded(tmp_path, smollm, smollm_lens, tweets):
    from saekit.sources.lens import LensSource

    _, tok = smollm
    kw = dict(kind="lens", hooks=["blocks.15.hook_resid_post"], max_length=32, batch_size=8)
    fp32 = LensSource(SourceConfig(**kw), smollm_lens, tok)
    bf16 = LensSource(SourceConfig(**kw, forward_dtype="bfloat16"), smollm_lens, tok)
    docs, cfg = tweets[:8], StoreConfig(docs_per_shard=8)
    ref = ActivationStore(cache_activations(fp32, docs, tmp_path / "fp32", cfg)["blocks.15.hook_resid_post"])
    low = ActivationStore(cache_activations(bf16, docs, tmp_path / "bf16", cfg)["blocks.15.hook_resid_post"])
    err = relative_errors(low[:], ref[:])
    assert not torch.equal(low[:], ref[:]) and 1e-4 < err.median() < 0.01
    assert low.manifest.source["forward_dtype"] == "bfloat16"
