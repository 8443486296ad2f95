"""bf16 autocast: fp32 parameters and Adam state, quality close to fp32, small updates not lost."""

from __future__ import annotations

import pytest
import torch

from saekit.errors import ConfigError
from saekit.train import train
from saekit.train.callbacks import fvu
from saekit.train.checkpoint import read_checkpoint
from saekit.train.precision import autocast_for, bf16_resolution, resolve_precision

from train_helpers import make_data, make_setup

RUN = {"total_steps": 200, "checkpoint_every": 0, "lr": 1e-4, "warmup_steps": 0, "decay": "none"}


def _run(tmp_path, precision: str, **extra):
    sae, batches, cfg = make_setup(precision=precision, **{**RUN, **extra})
    before = {n: p.detach().clone() for n, p in sae.named_parameters()}
    res = train(sae, batches, cfg, tmp_path / precision)
    return res, before


def _fvu(sae, x) -> float:
    """FVU on raw rows: after train() the SAE has its input normalisation folded in."""
    sae.eval()
    with torch.no_grad():
        return fvu(x, sae(x).recon)


def test_bf16_keeps_fp32_state_and_matches_fp32_quality(tmp_path):
    x = make_data()
    bf, _ = _run(tmp_path, "bf16", lr=3e-3)
    fp, _ = _run(tmp_path, "fp32", lr=3e-3)
    assert all(p.dtype == torch.float32 for p in bf.sae.parameters())
    opt = read_checkpoint(tmp_path / "bf16").optimizer_tensors
    assert opt and all(t.dtype == torch.float32 for k, t in opt.items() if not k.startswith("step/"))
    assert not torch.equal(bf.sae.W_enc, fp.sae.W_enc), "autocast had no effect: the test would prove nothing"
    f_bf, f_fp = _fvu(bf.sae, x), _fvu(fp.sae, x)
    assert f_fp < 0.5  # it learned something
    assert abs(f_bf - f_fp) < 0.02, (f_bf, f_fp)


def test_biases_move_by_more_than_bf16_resolution_in_200_steps(tmp_path):
    """docs/RELIABILITY.md 24: the encoder bias starts in [1, 1.5), where the bf16 spacing is 2^-7 ≈ 0.0078,
    far above any single Adam step at lr 1e-4, so a bf16 parameter would round every step away and
    never move; fp32 master parameters accumulate the steps."""
    sae, batches, cfg = make_setup(precision="bf16", **RUN)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        sae.b_enc.copy_(1.0 + 0.5 * torch.rand(sae.b_enc.shape, generator=g))
    b0 = sae.b_enc.detach().clone()
    res_b = bf16_resolution(b0)
    # an Adam step is at most about lr * (1 - beta1) / sqrt(1 - beta2) ≈ 3.2 lr; bf16 swallows all of them:
    step = 3.2 * RUN["lr"]
    assert torch.equal((b0.bfloat16() + step).bfloat16(), b0.bfloat16())
    assert torch.equal((b0.bfloat16() - step).bfloat16(), b0.bfloat16())
    b1 = train(sae, batches, cfg, tmp_path / "bf16").sae.b_enc.detach()
    assert b1.dtype == torch.float32
    moved = (b1 - b0).abs() > res_b
    assert moved.float().mean() > 0.5, moved.float().mean()  # most of them moved by more than a bf16 spacing


def test_batchtopk_threshold_stays_fp32_under_autocast(tmp_path):
    res, _ = _run(tmp_path, "bf16", arch="topk", total_steps=20, sae_overrides={"batch_topk": True})
    assert res.sae.threshold.dtype == torch.float32 and float(res.sae.threshold) > 0


def test_precision_resolution():
    assert resolve_precision("fp32", "cpu") == "fp32" and resolve_precision("bf16", "cpu") == "bf16"
    assert resolve_precision("auto", "cpu") in ("fp32", "bf16")
    with autocast_for("bf16", "cpu"):
        assert (torch.ones(4, 4) @ torch.ones(4, 4)).dtype == torch.bfloat16
    with autocast_for("fp32", "cpu"):
        assert (torch.ones(4, 4) @ torch.ones(4, 4)).dtype == torch.float32
    with pytest.raises(ConfigError):
        resolve_precision("fp8", "cpu")
    assert float(bf16_resolution(torch.tensor(1.0))) == 2**-7
