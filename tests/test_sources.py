"""Activation sources on the embedded default models (offline)."""

import pytest
import torch

from saekit.errors import HookNotFoundError
from saekit.sources.base import SourceConfig
from saekit.sources.embeddings import EmbeddingSource
from saekit.sources.hf import HFSource, tokenize
from saekit.sources.hooks import hook_point
from support.hooks import count_hooks
from saekit.sources.lens import LensSource

pytestmark = pytest.mark.slow


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_hf_and_lens_agree_at_the_same_layer(smollm, smollm_lens, tweets):
    model, tok = smollm
    docs = tweets[:12]
    hf = HFSource(SourceConfig(kind="hf", hooks=["model.layers.8"], batch_size=6), model, tok)
    lens = LensSource(SourceConfig(kind="lens", hooks=["blocks.8.hook_resid_post"], batch_size=6), smollm_lens, tok)
    a = list(hf.iter_batches(docs))
    b = list(lens.iter_batches(docs))
    acts_hf = torch.cat([x.acts["model.layers.8"] for x in a])
    acts_tl = torch.cat([x.acts["blocks.8.hook_resid_post"] for x in b])
    assert acts_hf.shape == acts_tl.shape and acts_hf.shape[1] == 576
    assert _rel(acts_tl, acts_hf) <= 1e-4
    assert torch.equal(torch.cat([x.token_id for x in a]), torch.cat([x.token_id for x in b]))


def test_padding_never_enters_and_left_right_agree(smollm, tweets):
    model, tok = smollm
    docs = sorted(tweets[:8], key=lambda d: len(d["text"]))  # very different lengths in one batch
    rows = {}
    for side in ("right", "left"):
        src = HFSource(SourceConfig(kind="hf", hooks=["model.layers.5"], batch_size=8, padding_side=side), model, tok)
        (batch,) = list(src.iter_batches(docs))
        rows[side] = batch
    enc = tokenize(tok, [d["text"] for d in docs], SourceConfig(hooks=["x"]))
    special = torch.isin(enc["input_ids"], torch.tensor(tok.all_special_ids))
    assert int((special & enc["attention_mask"].bool()).sum()) == len(docs)  # one BOS per document
    assert rows["right"].n == int((enc["attention_mask"].bool() & ~special).sum())  # exactly the real tokens
    assert not torch.isin(rows["right"].token_id, torch.tensor(tok.all_special_ids)).any()
    assert torch.equal(rows["right"].token_id, rows["left"].token_id)
    assert torch.equal(rows["right"].pos, rows["left"].pos)
    assert _rel(rows["left"].acts["model.layers.5"], rows["right"].acts["model.layers.5"]) <= 1e-4


def test_forward_stops_after_last_hooked_layer(smollm, tweets):
    model, tok = smollm
    calls = []
    before = count_hooks(model)
    src = HFSource(SourceConfig(kind="hf", hooks=["model.layers.2", "model.layers.4"], batch_size=4), model, tok)
    with hook_point(model, "model.layers.5", lambda t: calls.append(1)):
        batch = next(src.iter_batches(tweets[:4]))
    assert calls == []  # layer 5 never ran
    assert set(batch.acts) == {"model.layers.2", "model.layers.4"}
    assert count_hooks(model) == before


def test_hooks_removed_after_exception(smollm, smollm_lens):
    model, tok = smollm
    ids = tok(["hello world"], return_tensors="pt").input_ids

    def boom(t):
        raise ValueError("inside the hook")

    for m, name in ((model, "model.layers.3"), (smollm_lens, "blocks.3.hook_resid_post")):
        before = count_hooks(m)
        with pytest.raises(ValueError, match="inside the hook"):
            with hook_point(m, name, boom):
                m(ids)
        assert count_hooks(m) == before


def test_unknown_hook_lists_nearest(smollm, smollm_lens):
    model, tok = smollm
    with pytest.raises(HookNotFoundError, match=r"model\.layers\.15"):
        HFSource(SourceConfig(kind="hf", hooks=["model.layer.15"]), model, tok)
    with pytest.raises(HookNotFoundError, match=r"blocks\.8\.hook_resid_post"):
        LensSource(SourceConfig(kind="lens", hooks=["blocks.8.hook_resid_pots"]), smollm_lens, tok)


def test_embedding_batch_equals_each_alone(minilm, tweets):
    src = EmbeddingSource(SourceConfig(kind="embedding", batch_size=16), minilm)
    docs = tweets[:16]
    (batch,) = list(src.iter_batches(docs))
    alone = torch.cat([src.embed([d["text"]]) for d in docs])
    assert batch.acts["sentence_embedding"].shape == (16, 384)
    assert (batch.acts["sentence_embedding"] - alone).abs().max() <= 1e-5
    assert (batch.pos == -1).all() and (batch.token_id == -1).all()
