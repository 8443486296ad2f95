"""bf16 on CPU: `precision: auto` picks bf16 only where the CPU has bf16 instructions; the encoder
product runs in bf16 into a bf16 workspace, the native top-k reads it directly, and the results stay
close to float32 (parameters and gradients float32)."""

from __future__ import annotations

import pytest
import torch

import saekit.train.precision as precision
from saekit import hardware
from saekit.sae.kernels import native
from saekit.sae.kernels.sparse import compute_dtype, sparse_encode, topk_select
from saekit.sae.topk import TopKConfig, TopKSAE


@pytest.mark.parametrize("has_bf16, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_on_cpu_follows_the_cpu_flags(monkeypatch, has_bf16, expected):
    monkeypatch.setattr(hardware, "cpu_has_bf16", lambda: has_bf16)
    assert precision.resolve_precision("auto", "cpu") == expected
    assert precision.resolve_precision("fp32", "cpu") == "fp32"  # explicit choices are kept
    assert precision.resolve_precision("bf16", "cpu") == "bf16"
    inside = precision.autocast_for("auto", "cpu")
    with inside:
        assert compute_dtype(torch.device("cpu")) == (torch.bfloat16 if has_bf16 else None)


@pytest.mark.skipif(native.library() is None, reason="no C compiler: the torch path is tested elsewhere")
def test_native_topk_reads_bf16_exactly():
    g = torch.Generator().manual_seed(0)
    pre = torch.randn(96, 512, generator=g).bfloat16()
    pre[3, :] = -1.0  # ties and a row without positive values
    vals, idx = native.topk_rows(pre, 8)
    assert vals.dtype == torch.float32
    assert torch.equal(vals, pre.float().gather(1, idx))  # the bf16 values, exactly
    ref = pre.float().topk(8, dim=1).values
    assert torch.equal(vals.sort(1).values, ref.sort(1).values)


def _encode_grads(x, W, b_enc, b_dec, bf16: bool):
    W, b_enc = W.clone().requires_grad_(), b_enc.clone().requires_grad_()
    ws = torch.empty(x.shape[0] * W.shape[1], dtype=torch.bfloat16 if bf16 else torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        vals, idx = sparse_encode(x, W, b_enc, b_dec, topk_select(8), ws.view(x.shape[0], W.shape[1]))
    (vals * torch.linspace(0.5, 1.5, vals.numel()).view_as(vals)).sum().backward()
    return vals, idx, W.grad, b_enc.grad


def test_bf16_encode_selects_on_the_bf16_product_and_stays_close_to_fp32():
    g = torch.Generator().manual_seed(1)
    x, W = torch.randn(512, 64, generator=g), torch.randn(64, 256, generator=g) / 8  # enough rows for stable ratios
    b_enc, b_dec = torch.randn(256, generator=g) / 10, torch.randn(64, generator=g) / 10
    v16, i16, gW16, gb16 = _encode_grads(x, W, b_enc, b_dec, bf16=True)
    v32, i32, gW32, gb32 = _encode_grads(x, W, b_enc, b_dec, bf16=False)
    assert v16.dtype == gW16.dtype == torch.float32
    pre16 = ((x - b_dec).bfloat16() @ W.bfloat16()).float() + b_enc  # bf16 product, float32 bias (added in top-k)
    assert torch.equal(v16, pre16.gather(1, i16).clamp_min(0))  # the values are the bf16 product's
    assert not torch.equal(v16, v32)  # bf16 really ran: otherwise this test proves nothing
    same = (i16.sort(1).values == i32.sort(1).values).float().mean()
    assert same > 0.95  # near-ties may swap, nearly every selection agrees
    rel = (v16.sum() - v32.sum()).abs() / v32.abs().sum()
    assert rel < 1e-2
    assert (gb16 - gb32).norm() / gb32.norm() < 0.1 and (gW16 - gW32).norm() / gW32.norm() < 0.1


def test_topk_sae_workspace_follows_the_autocast_dtype():
    sae = TopKSAE(TopKConfig(d_in=32, d_sae=128, k=4, seed=0))
    x = torch.randn(16, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sae(x)
    assert sae._workspace.dtype == torch.bfloat16 and out.recon.dtype == torch.float32
    sae(x)
    assert sae._workspace.dtype == torch.float32


def _topk_ref_lowest_index(pre_f32: torch.Tensor, k: int) -> torch.Tensor:
    """Row-wise top-k indices, ties at the k-th value broken by the lower index (a stable descending sort)."""
    order = torch.sort(pre_f32, dim=1, descending=True, stable=True).indices
    return order[:, :k].sort(1).values


def _tie_heavy_rows(g: torch.Generator, n: int, F: int) -> torch.Tensor:
    pre = torch.randn(n, F, generator=g).bfloat16()
    pre[1] = torch.randint(-3, 4, (F,), generator=g).bfloat16()  # seven values: ties at every threshold
    pre[2] = -1.0  # one value
    pre[3, ::3] = float("-inf")
    pre[4, 5] = float("inf")
    pre[5] = -pre[5].abs()  # no positive value
    return pre


@pytest.mark.skipif(native.library() is None, reason="no C compiler: the torch path is tested elsewhere")
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("k", [1, 5, 32])
def test_bisection_topk_is_the_exact_topk_with_lower_index_ties(monkeypatch, with_bias, k):
    g = torch.Generator().manual_seed(k)
    F = 1024  # a multiple of 256: the bisection kernel (native_bf16.c)
    pre = _tie_heavy_rows(g, 64, F)
    bias = (torch.randint(-2, 3, (F,), generator=g) / 4).float() if with_bias else None
    vals, idx = native.topk_rows(pre, k, bias)
    full = pre.float() + (bias if bias is not None else 0)
    assert torch.equal(vals, full.gather(1, idx))  # bf16 value + float32 bias, exactly
    assert torch.equal(idx.sort(1).values, _topk_ref_lowest_index(full, k))
    monkeypatch.setitem(native.BISECT, "on", False)  # native.c's heap kernel: the same values (ties may differ)
    vals_h, _ = native.topk_rows(pre, k, bias)
    assert torch.equal(vals.sort(1).values, vals_h.sort(1).values)


@pytest.mark.skipif(native.library() is None, reason="no C compiler: the torch path is tested elsewhere")
def test_bisection_topk_gives_nan_rows_back_and_other_widths_take_the_heap_kernel():
    g = torch.Generator().manual_seed(3)
    pre = torch.randn(8, 512, generator=g).bfloat16()
    pre[6, 100] = float("nan")
    assert native.topk_rows(pre, 4) is None  # the caller's torch.topk then decides how NaN ranks
    odd = torch.randn(8, 288, generator=g).bfloat16()  # 9 blocks of 32: not a multiple of 256
    vals, idx = native.topk_rows(odd, 4)
    assert torch.equal(vals.sort(1).values, odd.float().topk(4, dim=1).values.sort(1).values)


@pytest.mark.skipif(native.library() is None, reason="no C compiler: the torch path is tested elsewhere")
@pytest.mark.parametrize("d", [512, 40])
def test_bf16_gather_reads_whole_rows_and_sums_in_float32(d):
    g = torch.Generator().manual_seed(d)
    table = torch.randn(300, d, generator=g).bfloat16()
    idx, w = torch.randint(0, 300, (70, 9), generator=g), torch.randn(70, 9, generator=g)
    out = native.embed_sum(idx, w, table)
    ref = (w.double().unsqueeze(-1) * table.double()[idx]).sum(1)
    assert out.dtype == torch.float32
    assert torch.allclose(out.double(), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(IndexError):
        native.embed_sum(idx.clone().fill_(300), w, table)
