"""The optional native kernels (saekit/sae/kernels/native.c) against their torch references, and the fallbacks."""

from __future__ import annotations

import logging

import pytest
import torch

from saekit.sae.kernels import native
from saekit.sae.kernels import sparse as kernels

needs_native = pytest.mark.skipif(native.library() is None, reason="no C compiler: the torch fallbacks are used")


def _same_topk(pre, vals, idx, k):
    ref_vals, _ = pre.topk(k, dim=1)
    assert torch.equal(vals.sort(1, descending=True).values, ref_vals)  # the same k values per row
    assert torch.equal(pre.gather(1, idx), vals)  # and the indices point at them
    assert (idx.sort(1).values.diff(dim=1) > 0).all()  # no latent twice


@needs_native
@pytest.mark.parametrize("shape,k", [((1, 32), 1), ((7, 64), 2), ((300, 4096), 32), ((129, 8192), 64), ((64, 1024), 32)])
def test_topk_rows_matches_torch(shape, k):
    pre = torch.randn(*shape, generator=torch.Generator().manual_seed(k))
    out = native.topk_rows(pre, k)
    assert out is not None
    _same_topk(pre, *out, k)


@needs_native
def test_topk_rows_with_ties_and_negative_rows():
    g = torch.Generator().manual_seed(0)
    pre = torch.randint(-3, 3, (200, 512), generator=g).float()  # many ties
    pre[5] = -1.0  # a constant row
    pre[6] = -torch.rand(512, generator=g) - 1  # all negative
    vals, idx = native.topk_rows(pre, 16)
    _same_topk(pre, vals, idx, 16)


@needs_native
def test_topk_rows_threads_agree():
    pre = torch.randn(1000, 2048)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = native.topk_rows(pre, 32)
        torch.set_num_threads(2)
        two = native.topk_rows(pre, 32)
    finally:
        torch.set_num_threads(n)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])


@needs_native
def test_topk_rows_declines_what_it_cannot_do():
    assert native.topk_rows(torch.randn(4, 100), 2) is None  # width not a multiple of the block
    assert native.topk_rows(torch.randn(4, 64), 3) is None  # k > width / block
    assert native.topk_rows(torch.randn(4, 64, dtype=torch.float64), 1) is None
    assert native.topk_rows(torch.randn(64, 4).t(), 1) is None  # not contiguous
    pre = torch.randn(8, 256)
    pre[3, 17] = float("nan")
    assert native.topk_rows(pre, 4) is None  # NaN handling stays torch's ...
    vals, idx = kernels.rowwise_topk(pre, 4)  # ... through the fallback: NaN ranks first
    assert idx[3].tolist().count(17) == 1 and torch.isnan(vals[3]).any()


@needs_native
def test_rowwise_topk_same_with_and_without_native(monkeypatch):
    """Without a compiler both sides would be torch: the test is then meaningless, so it needs native."""
    pre = torch.randn(50, 1024)
    assert native.topk_rows(pre, 8) is not None  # the native path really takes this shape
    with_native = kernels.rowwise_topk(pre, 8)
    monkeypatch.setenv("SAEKIT_NATIVE", "0")
    assert native.library() is None
    without = kernels.rowwise_topk(pre, 8)
    assert torch.equal(with_native[0].sort(1).values, without[0].sort(1).values)
    assert torch.equal(with_native[1].sort(1).values, without[1].sort(1).values)


@needs_native
@pytest.mark.parametrize("D", [512, 40, 7])
def test_gather_dot_matches_reference(D):
    g = torch.Generator().manual_seed(D)
    table, rows = torch.randn(300, D, generator=g), torch.randn(90, D, generator=g)
    idx = torch.randint(0, 300, (90, 5), generator=g)
    out = native.gather_dot(idx, table, rows)
    torch.testing.assert_close(out, kernels.gather_dot_ref(idx, table, rows), rtol=1e-5, atol=1e-5)


def test_gather_dot_out_of_range_still_raises():
    with pytest.raises((IndexError, RuntimeError)):
        kernels.gather_dot(torch.tensor([[0, 5]]), torch.randn(5, 8), torch.randn(1, 8))


def test_build_failure_falls_back_with_a_warning(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setenv("SAEKIT_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("SAEKIT_NATIVE", "1")
    with caplog.at_level(logging.WARNING, logger="saekit.sae.kernels.native"):
        assert native.library() is None
    assert "unavailable" in caplog.text and "no-such-compiler" in caplog.text
    assert native.topk_rows(torch.randn(4, 64), 2) is None
    assert not list(tmp_path.glob("*.tmp"))  # no half-written library left behind
    vals, idx = kernels.rowwise_topk(torch.arange(64.0).repeat(2, 1), 2)  # torch path still works
    assert sorted(vals[0].tolist()) == [62.0, 63.0]


@needs_native
def test_library_is_cached_and_rebuilt_atomically(monkeypatch, tmp_path):
    monkeypatch.setenv("SAEKIT_CACHE_DIR", str(tmp_path))
    first = native._build()
    mtime = first.stat().st_mtime_ns
    assert native._build() == first and first.stat().st_mtime_ns == mtime  # second call reuses it
    assert [p.suffix for p in tmp_path.iterdir()] == [".so"]


@needs_native
@pytest.mark.parametrize("B,K,D,n", [(300, 8, 512, 1000), (64, 3, 40, 70), (5, 1, 7, 3), (128, 32, 64, 33),
                                     (200, 4, 44, 96), (100, 2, 13, 64)])
def test_sparse_t_matmul_matches_reference_both_layouts(B, K, D, n):
    g = torch.Generator().manual_seed(B + n)
    idx = torch.randint(0, n, (B, K), generator=g)
    idx[0] = idx[1]  # repeated latents across rows; duplicates within a row add too
    idx[2, :] = 0
    w, M = torch.randn(B, K, generator=g), torch.randn(B, D, generator=g)
    ref = kernels.sparse_t_matmul_ref(idx, w, M, n)
    out = native.sparse_t_matmul(idx, w, M, n)
    out_T = native.sparse_t_matmul(idx, w, M, n, transposed=True)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert out_T.shape == (D, n) and out_T.is_contiguous()
    torch.testing.assert_close(out_T, ref.t(), rtol=1e-5, atol=1e-5)
    assert torch.equal(out_T, out.t())  # the same sums, transposed by a copy (8 x 8 blocks, streamed whole tiles, edges)
    unused = torch.ones(n, dtype=torch.bool)
    unused[idx.flatten()] = False
    assert (out[unused] == 0).all()  # latents nobody selected get exactly zero gradient


@needs_native
def test_sparse_t_matmul_is_deterministic_across_thread_counts():
    g = torch.Generator().manual_seed(0)
    idx, w, M = torch.randint(0, 4096, (2048, 32), generator=g), torch.randn(2048, 32, generator=g), torch.randn(2048, 96, generator=g)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = native.sparse_t_matmul(idx, w, M, 4096, transposed=True)
        torch.set_num_threads(2)
        two = native.sparse_t_matmul(idx, w, M, 4096, transposed=True)
    finally:
        torch.set_num_threads(n)
    assert torch.equal(one, two)  # entries summed in row order whatever the split: resume stays bit-exact


def test_sparse_t_matmul_rejects_out_of_range_latents():
    with pytest.raises(IndexError, match="expected \\[0, 4\\)"):
        kernels.sparse_t_matmul(torch.tensor([[1, 4]]), torch.ones(1, 2), torch.randn(1, 3), 4)


@needs_native
@pytest.mark.parametrize("D", [512, 40, 7])
def test_embed_sum_matches_reference(D):
    g = torch.Generator().manual_seed(D)
    table, idx, w = torch.randn(300, D, generator=g), torch.randint(0, 300, (90, 6), generator=g), torch.randn(90, 6, generator=g)
    idx[0, 1] = idx[0, 0]  # a latent twice in a row adds twice
    out = native.embed_sum(idx, w, table)
    torch.testing.assert_close(out, kernels.embed_sum_ref(idx, w, table), rtol=1e-5, atol=1e-5)
    with pytest.raises(IndexError):
        native.embed_sum(idx.clone().fill_(300), w, table)


@needs_native
def test_compiler_without_openmp_still_gives_correct_kernels(monkeypatch, tmp_path):
    """A compiler that rejects -fopenmp (Apple clang) gets the next attempt: the same kernels on one thread."""
    import shutil

    fake = tmp_path / "cc-no-openmp"
    fake.write_text(f'#!/bin/sh\nfor a in "$@"; do [ "$a" = "-fopenmp" ] && {{ echo "unsupported option" >&2; exit 1; }}; done\n'
                    f'exec {shutil.which("cc") or shutil.which("gcc")} "$@"\n')
    fake.chmod(0o755)
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setenv("SAEKIT_NATIVE", "1")
    monkeypatch.setenv("SAEKIT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CC", str(fake))
    assert native.library() is not None
    pre = torch.randn(200, 512)
    _same_topk(pre, *native.topk_rows(pre, 8), 8)


# -- kernels added for the public training path (issue 20) -------------------------------------------------
@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,k", [((7, 64), 2), ((300, 4096), 32), ((33, 96), 3)])
def test_topk_rows_with_bias_selects_on_pre_plus_bias(dtype, shape, k):
    g = torch.Generator().manual_seed(k)
    pre = torch.randn(*shape, generator=g).to(dtype)
    bias = torch.randn(shape[1], generator=g) * 2  # large enough to change which latents win
    vals, idx = native.topk_rows(pre, k, bias)
    full = pre.float() + bias  # the bf16 values exactly, plus the float32 bias
    _same_topk(full, vals, idx, k)
    assert not torch.equal(idx.sort(1).values, pre.float().topk(k, dim=1).indices.sort(1).values)  # bias mattered


@needs_native
def test_topk_rows_with_bias_declines_and_falls_back_on_nan():
    pre, bias = torch.randn(8, 256), torch.randn(256)
    assert native.topk_rows(pre, 4, bias.double()) is None  # float32 bias only
    assert native.topk_rows(pre, 4, bias[:128]) is None  # one value per column
    bias[17] = float("nan")
    assert native.topk_rows(pre, 4, bias) is None
    vals, idx = kernels.rowwise_topk(pre, 4, bias)  # torch path on pre + bias: NaN ranks first
    assert (idx == 17).any(1).all() and torch.isnan(vals).any(1).all()


@needs_native
def test_topk_rows_odd_block_counts_match_torch():
    """Widths whose block count is not a multiple of 8 take the one-block-at-a-time remainder path."""
    g = torch.Generator().manual_seed(3)
    for width in (32 * 9, 32 * 13, 32 * 3):
        pre = torch.randn(40, width, generator=g)
        _same_topk(pre, *native.topk_rows(pre, 3), 3)


@needs_native
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,K,D,n", [(300, 8, 512, 1000), (64, 3, 40, 70), (5, 1, 7, 3), (128, 32, 64, 33),
                                     (200, 4, 44, 96), (100, 2, 13, 64)])
def test_decode_backward_equals_the_two_separate_kernels(B, K, D, n, grad_dtype):
    g = torch.Generator().manual_seed(B + D)
    idx = torch.randint(0, n, (B, K), generator=g)
    idx[0] = idx[1]
    idx[2, :] = 0  # one latent several times in a row: its entries add
    vals, W, grad = torch.rand(B, K, generator=g), torch.randn(n, D, generator=g), torch.randn(B, D, generator=g)
    g_vals, g_W = native.decode_backward(idx, vals, W, grad.to(grad_dtype))
    M = grad.to(grad_dtype).float()  # what the kernel reads
    torch.testing.assert_close(g_vals, kernels.gather_dot_ref(idx, W, M), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(g_W, kernels.sparse_t_matmul_ref(idx, vals, M, n), rtol=1e-5, atol=1e-4)


@needs_native
def test_decode_backward_is_deterministic_across_thread_counts():
    g = torch.Generator().manual_seed(0)
    idx, vals = torch.randint(0, 4096, (2048, 32), generator=g), torch.rand(2048, 32, generator=g)
    W, grad = torch.randn(4096, 96, generator=g), torch.randn(2048, 96, generator=g)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = native.decode_backward(idx, vals, W, grad)
        torch.set_num_threads(2)
        two = native.decode_backward(idx, vals, W, grad)
    finally:
        torch.set_num_threads(n)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])


@needs_native
def test_sparse_decode_backward_takes_the_fused_kernel_and_matches_reference(monkeypatch):
    calls, real = [], native.decode_backward
    monkeypatch.setattr(native, "decode_backward", lambda *a: calls.append(1) or real(*a))
    g = torch.Generator().manual_seed(5)
    idx = torch.randint(0, 200, (64, 8), generator=g)
    vals, W, b = torch.rand(64, 8, generator=g), torch.randn(200, 48, generator=g), torch.randn(48, generator=g)
    up = torch.randn(64, 48, generator=g)
    got = [t.clone().requires_grad_() for t in (vals, W, b)]
    ref = [t.clone().requires_grad_() for t in (vals, W, b)]
    (kernels.sparse_decode(got[0], idx, got[1], got[2]) * up).sum().backward()
    (kernels.dense_decode_ref(ref[0], idx, ref[1], ref[2]) * up).sum().backward()
    assert calls and all(c is not None for c in calls)  # the fused kernel ran
    for a, r in zip(got, ref):
        torch.testing.assert_close(a.grad, r.grad, rtol=1e-5, atol=1e-4)


@needs_native
@pytest.mark.parametrize("D", [512, 40, 7])
def test_bf16_tables_and_rows_sum_in_float32(D):
    """embed_sum / gather_dot read a bf16 table, sparse_t_matmul bf16 rows: the float32 sums of the bf16 values."""
    g = torch.Generator().manual_seed(D)
    table, rows = torch.randn(300, D, generator=g).bfloat16(), torch.randn(90, D, generator=g)
    idx, w = torch.randint(0, 300, (90, 6), generator=g), torch.randn(90, 6, generator=g)
    T = table.float()
    torch.testing.assert_close(native.embed_sum(idx, w, table), kernels.embed_sum_ref(idx, w, T), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(native.gather_dot(idx, table, rows), kernels.gather_dot_ref(idx, T, rows),
                               rtol=1e-5, atol=1e-4)
    M = rows.bfloat16()
    for transposed in (False, True):
        out = native.sparse_t_matmul(idx, w, M, 300, transposed)
        ref = kernels.sparse_t_matmul_ref(idx, w, M.float(), 300)
        torch.testing.assert_close(out, ref.t() if transposed else ref, rtol=1e-5, atol=1e-4)


@needs_native
def test_decoder_row_kernels_match_torch():
    from saekit.sae.base import remove_parallel_grad_, renormalise_rows_

    g = torch.Generator().manual_seed(2)
    W = torch.randn(300, 40, generator=g)
    W[7] = 0.0  # a zero row stays zero (norm clamped at 1e-12)
    mine, ref = W.clone(), torch.nn.Parameter(W.clone())
    assert native.unit_norm_rows_(mine)
    renormalise_rows_(ref)
    torch.testing.assert_close(mine, ref.detach(), rtol=1e-6, atol=1e-7)
    assert (mine[7] == 0).all()
    ref.data = mine.clone()
    grad = torch.randn(300, 40, generator=g)
    ref.grad = grad.clone()
    remove_parallel_grad_(ref)
    assert native.remove_parallel_rows_(grad, mine)
    torch.testing.assert_close(grad, ref.grad, rtol=1e-5, atol=1e-5)
    assert (grad * mine).sum(1).abs().max() < 1e-4  # no component along the rows is left
    assert not native.unit_norm_rows_(W.double()) and not native.remove_parallel_rows_(grad, mine[:5])


def _fp32_tie_heavy_rows(g: torch.Generator, n: int, F: int) -> torch.Tensor:
    pre = torch.randn(n, F, generator=g)
    pre[1] = torch.randint(-3, 4, (F,), generator=g).float()  # seven values: ties at every threshold
    pre[2] = -1.0  # one value
    pre[3, ::3] = float("-inf")
    pre[4, 5], pre[4, 9] = float("inf"), float("inf")
    pre[5] = -pre[5].abs()  # no positive value
    pre[6] = torch.where(torch.rand(F, generator=g) < 0.5, -0.0, 0.0)  # -0 and +0: one value, ties by index
    pre[7, F - 40:] = 1e30  # the winners at the end of the row
    return pre


@needs_native
@pytest.mark.parametrize("F,k", [(1024, 1), (1024, 5), (1024, 32), (256, 8), (2048, 64), (512, 16)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_fp32_bisection_topk_is_the_exact_topk_with_lower_index_ties(monkeypatch, F, k, with_bias):
    """native_bf16.c's bisection body on float32 rows: the k largest of pre + bias, exactly, ties at the k-th value
    to the lower latent index (a stable descending sort), and the same values as native.c's heap kernel."""
    assert native._topk_fn(native.library(), torch.float32, F) is native.library().saekit_topk_rows_bisect
    g = torch.Generator().manual_seed(F + k)
    pre = _fp32_tie_heavy_rows(g, 48, F)
    bias = (torch.randint(-2, 3, (F,), generator=g) / 4).float() if with_bias else None
    vals, idx = native.topk_rows(pre, k, bias)
    full = pre + (bias if bias is not None else 0)
    assert torch.equal(vals, full.gather(1, idx))  # pre + bias, exactly, at the indices returned
    order = torch.sort(full, dim=1, descending=True, stable=True).indices
    assert torch.equal(idx.sort(1).values, order[:, :k].sort(1).values)
    monkeypatch.setitem(native.BISECT, "on", False)  # native.c's heap kernel: the same values
    vals_h, _ = native.topk_rows(pre, k, bias)
    assert torch.equal(vals.sort(1).values, vals_h.sort(1).values)


@needs_native
def test_fp32_bisection_topk_gives_nan_rows_back_and_other_widths_take_the_heap_kernel():
    g = torch.Generator().manual_seed(5)
    pre = torch.randn(8, 512, generator=g)
    pre[6, 100] = float("nan")
    assert native.topk_rows(pre, 4) is None  # NaN: the caller's torch.topk decides how it ranks
    assert native.topk_rows(pre, 17) is None  # k > width / 32: declined, as the heap kernel does
    odd = torch.randn(8, 288, generator=g)  # 9 blocks of 32: not a multiple of 256
    assert native._topk_fn(native.library(), torch.float32, 288) is native.library().saekit_topk_rows
    _same_topk(odd, *native.topk_rows(odd, 4), 4)
    every_block = torch.randn(8, 512, generator=g)
    _same_topk(every_block, *native.topk_rows(every_block, 16), 16)  # k = the number of blocks
