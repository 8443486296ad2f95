"""The training loop's shortcuts (saekit/train/loop.py) give exactly what the long way gives."""

from __future__ import annotations

import pytest
import torch

from saekit.sae.topk import TopKConfig, TopKSAE
from saekit.train.step import bad_rows as _bad_rows, batch_bad_rows as _batch_bad_rows, clip_ as _clip_


def _sae_with_grads(scale: float) -> TopKSAE:
    sae = TopKSAE(TopKConfig(d_in=8, d_sae=16, k=2, seed=0))
    g = torch.Generator().manual_seed(1)
    for p in sae.parameters():
        p.grad = torch.randn(p.shape, generator=g) * scale
    return sae


@pytest.mark.parametrize("scale", [1e-4, 0.05, 10.0])
def test_clip_matches_torch_bit_for_bit(scale):
    a, b = _sae_with_grads(scale), _sae_with_grads(scale)
    norm_a = torch.nn.utils.get_total_norm([p.grad for p in a.parameters()])
    norm_b = torch.nn.utils.get_total_norm([p.grad for p in b.parameters()])
    _clip_(a, 1.0, norm_a)
    torch.nn.utils.clip_grads_with_norm_(list(b.parameters()), 1.0, norm_b)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa.grad, pb.grad)
    clipped = torch.nn.utils.get_total_norm([p.grad for p in a.parameters()])
    assert float(clipped) <= 1.0 + 1e-5  # large gradients were really clipped


def test_batch_bad_rows_finds_every_non_finite_row():
    x = torch.randn(64, 8)
    assert _batch_bad_rows(x) == []
    x[3, 1], x[40, 0], x[41, 7] = float("nan"), float("inf"), -float("inf")
    assert _batch_bad_rows(x) == _bad_rows(x) == [3, 40, 41]


def test_batch_bad_rows_overflowing_sum_is_not_a_bad_row():
    x = torch.full((64, 8), 3e37)  # every element finite, the sum overflows to inf
    assert not torch.isfinite(x.sum())
    assert _batch_bad_rows(x) == []


def _train_topk(tmp_path, name: str, callbacks=None):
    from saekit.store.batches import TensorBatches
    from saekit.train import TrainConfig, train

    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 32, generator=g)
    sae = TopKSAE(TopKConfig(d_in=32, d_sae=128, k=4, seed=0))
    cfg = TrainConfig(total_steps=12, batch_size=64, progress_bar=False, checkpoint_every=5)
    return train(sae, TensorBatches(x, 64), cfg, tmp_path / name, callbacks=callbacks).sae


def test_training_skips_the_nan_fill_of_fresh_memory_and_gets_the_same_weights(tmp_path):
    """Deterministic mode NaN-fills every torch.empty; the trainer turns that off (a write pass per new
    gradient) and restores it after. The fill never mattered: a run that keeps it gets the same bits."""
    from saekit.train import Callback

    seen = {}

    class Look(Callback):
        def on_train_start(self, run):
            seen["fill"] = torch.utils.deterministic.fill_uninitialized_memory
            seen["det"] = torch.are_deterministic_algorithms_enabled()

    class KeepFill(Callback):
        def on_train_start(self, run):
            torch.utils.deterministic.fill_uninitialized_memory = True

    before = torch.utils.deterministic.fill_uninitialized_memory
    fast = _train_topk(tmp_path, "fast", [Look()])
    assert seen == {"fill": False, "det": True}
    assert torch.utils.deterministic.fill_uninitialized_memory == before  # restored
    filled = _train_topk(tmp_path, "filled", [KeepFill()])
    for (name, a), (_, b) in zip(fast.state_dict().items(), filled.state_dict().items()):
        assert torch.equal(a, b), name


def test_kept_gradients_change_nothing_and_are_gone_after_training(tmp_path, monkeypatch):
    """The trainer keeps a step's gradients until the next step frees them before its backward (memory
    reuse); they are never accumulated, so a run that frees them after every step gets the same bits,
    and the trained SAE holds no gradients."""
    import saekit.train.loop as loop

    kept = _train_topk(tmp_path, "kept")
    assert all(p.grad is None for p in kept.parameters())
    real = loop.train_step
    monkeypatch.setattr(loop, "train_step", lambda *a, **kw: real(*a[:6], keep_grads=False))
    freed = _train_topk(tmp_path, "freed")
    for (name, a), (_, b) in zip(kept.state_dict().items(), freed.state_dict().items()):
        assert torch.equal(a, b), name
