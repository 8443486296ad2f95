"""Sparse kernels: gradcheck in float64, and equal values and gradients to the eager references."""

from __future__ import annotations

import pytest
import torch

from saekit.sae.kernels import sparse as K

B, D, F_, k = 5, 6, 11, 3


def _inputs(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g, dtype=dtype)
    W_enc = torch.randn(D, F_, generator=g, dtype=dtype)
    b_enc = 0.1 * torch.randn(F_, generator=g, dtype=dtype)
    b_dec = 0.1 * torch.randn(D, generator=g, dtype=dtype)
    W_dec = torch.randn(F_, D, generator=g, dtype=dtype)
    return x, W_enc, b_enc, b_dec, W_dec


def _sparse_code(seed=0, dtype=torch.float64, with_dup=True):
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(F_, generator=g)[:k] for _ in range(B)])
    if with_dup:
        idx[0, 1] = idx[0, 0]  # duplicate indices in a row must add up
    vals = torch.rand(B, k, generator=g, dtype=dtype) + 0.1
    vals[1, 2] = 0.0  # an inactive slot
    return idx, vals


def test_primitives_match_references():
    idx, vals = _sparse_code()
    _, _, _, _, W = _inputs()
    M = torch.randn(B, D, dtype=torch.float64)
    torch.testing.assert_close(K.embed_sum(idx, vals, W), K.embed_sum_ref(idx, vals, W))
    torch.testing.assert_close(K.gather_dot(idx, W, M), K.gather_dot_ref(idx, W, M))
    torch.testing.assert_close(K.sparse_t_matmul(idx, vals, M, F_), K.sparse_t_matmul_ref(idx, vals, M, F_))


def test_sparse_t_matmul_fp32_larger():
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 300, (256, 16), generator=g)
    w, M = torch.randn(256, 16, generator=g), torch.randn(256, 40, generator=g)
    torch.testing.assert_close(K.sparse_t_matmul(idx, w, M, 300), K.sparse_t_matmul_ref(idx, w, M, 300),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("with_bias", [True, False])
def test_sparse_decode_gradcheck(with_bias):
    idx, vals = _sparse_code()
    _, _, _, b_dec, W_dec = _inputs()
    args = (vals.requires_grad_(), idx, W_dec.requires_grad_(), b_dec.requires_grad_() if with_bias else None)
    assert torch.autograd.gradcheck(K.SparseDecode.apply, args)


def test_sparse_decode_matches_reference():
    idx, vals = _sparse_code()
    _, _, _, b_dec, W_dec = _inputs()
    grad_out = torch.randn(B, D, dtype=torch.float64)
    results = []
    for fn in (K.sparse_decode, K.dense_decode_ref):
        leaves = [t.detach().clone().requires_grad_() for t in (vals, W_dec, b_dec)]
        out = fn(leaves[0], idx, leaves[1], leaves[2])
        out.backward(grad_out)
        results.append([out.detach()] + [t.grad for t in leaves])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("with_bias", [True, False])
def test_sparse_encode_gradcheck(with_bias):
    x, W_enc, b_enc, b_dec, _ = _inputs()
    args = (x.requires_grad_(), W_enc.requires_grad_(), b_enc.requires_grad_(),
            b_dec.requires_grad_() if with_bias else None, K.topk_select(k), None)
    fn = lambda *a: K.SparseEncode.apply(*a)[0]
    assert torch.autograd.gradcheck(fn, args)


def test_sparse_encode_matches_reference_and_workspace():
    x, W_enc, b_enc, b_dec, _ = _inputs()
    grad_out = torch.randn(B, k, dtype=torch.float64)
    results = []
    for fn, ws in ((K.sparse_encode, None), (K.sparse_encode, torch.empty(B, F_, dtype=torch.float64)),
                   (K.dense_encode_ref, None)):
        leaves = [t.detach().clone().requires_grad_() for t in (x, W_enc, b_enc, b_dec)]
        extra = (ws,) if fn is K.sparse_encode else ()
        vals, idx = fn(*leaves, K.topk_select(k), *extra)
        vals.backward(grad_out)
        results.append([vals.detach(), idx] + [t.grad for t in leaves])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b)
    assert (results[0][0] >= 0).all()


def test_encode_relu_zero_slots_pass_no_gradient():
    x, W_enc, b_enc, _, _ = _inputs()
    b_enc = torch.full((F_,), -100.0, dtype=torch.float64)  # every pre-activation negative
    W = W_enc.requires_grad_()
    vals, _ = K.sparse_encode(x, W, b_enc, None, K.topk_select(k))
    assert (vals == 0).all()
    vals.sum().backward()
    assert (W.grad == 0).all()



def test_squared_error_sum_gradcheck_and_value():
    recon, x = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    assert float(K.squared_error_sum(recon, x)) == pytest.approx(float(((recon - x) ** 2).sum()))
    assert torch.autograd.gradcheck(K.squared_error_sum, (recon.requires_grad_(), x.requires_grad_()))


def test_serial_restores_thread_count():
    n = torch.get_num_threads()
    with K.serial():
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == n
