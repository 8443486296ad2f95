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
