"""Splice-in downstream loss on the embedded SmolLM2 (HF and TransformerLens hooks)."""

import pytest
import torch

from saekit.eval.splice import splice_lm_loss
from support.hooks import count_hooks

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def texts(tweets):
    return [d["text"] for d in tweets[:6]]


def test_identity_recovers_everything_and_ablation_nothing(smollm, texts):
    model, tok = smollm
    before = count_hooks(model)
    ident = splice_lm_loss(model, tok, "model.layers.6", texts=texts, reconstruct=lambda a: a.clone())
    assert ident["ce_spliced"] == pytest.approx(ident["ce_clean"], abs=1e-6)
    assert ident["loss_recovered"] == pytest.approx(1.0, abs=1e-6)
    assert ident["kl_spliced"] == pytest.approx(0.0, abs=1e-6)
    abl = splice_lm_loss(model, tok, "model.layers.6", texts=texts, reconstruct=torch.zeros_like)
    assert abl["loss_recovered"] == pytest.approx(0.0, abs=1e-6)
    assert abl["ce_zero_ablation"] > abl["ce_clean"] + 0.5  # ablating a middle layer hurts
    assert count_hooks(model) == before


def test_hf_and_lens_splice_give_the_same_ce(smollm, smollm_lens, texts):
    model, tok = smollm
    noisy = lambda a: a + 0.5 * torch.sin(torch.arange(a.shape[-1], dtype=a.dtype))  # deterministic edit
    hf = splice_lm_loss(model, tok, "model.layers.6", texts=texts, reconstruct=noisy)
    tl = splice_lm_loss(smollm_lens, tok, "blocks.6.hook_resid_post", texts=texts, reconstruct=noisy)
    assert hf["n_tokens"] == tl["n_tokens"]
    for key in ("ce_clean", "ce_spliced", "ce_zero_ablation"):
        assert abs(hf[key] - tl[key]) <= 1e-3, key


def test_mean_ablation_and_partial_recovery(smollm, texts):
    model, tok = smollm
    mean_D = torch.zeros(576)
    half = splice_lm_loss(model, tok, "model.layers.6", texts=texts, reconstruct=lambda a: 0.9 * a, mean_acts_D=mean_D)
    assert 0.0 < half["loss_recovered_vs_mean"] < 1.0
    assert half["kl_spliced"] > 0
