"""The fused Triton top-k encoder (saekit/sae/kernels/triton_topk.py) against the torch path, on CPU
through Triton's interpreter: values and indices, the documented tie order, gradients (docs/RELIABILITY.md 4:
an optional kernel matches its eager reference in values and gradients), bf16 operands, and TopKSAE
itself (codes, AuxK, loss and every parameter's gradient) with the fused path forced on.

The interpreter has to be chosen before Triton is first imported, so the checks run in a child pytest
with TRITON_INTERPRET=1 (as tests/test_triton_kernels.py does). Skipped where Triton is not installed
(listed in tests/QUARANTINES.md); a CUDA machine runs the same kernel compiled. Shapes are tiny: the
interpreter runs each program in numpy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from saekit.sae.kernels.sparse import dense_encode_ref, topk_select  # noqa: E402

CHILD = os.environ.get("TRITON_INTERPRET") == "1"
child_only = pytest.mark.skipif(not CHILD, reason="runs inside test_topk_under_the_interpreter's child")
N_CHILD = 28  # the tests below in the child, parametrized cases counted (parent-only ones return at once)


def test_topk_under_the_interpreter():
    if CHILD:
        return
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "1", "SAEKIT_TRITON": "1",
           "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, "-m", "pytest", "-o", "addopts=", "-q", "-p", "no:cacheprovider", __file__],
                         env=env, capture_output=True, text=True, cwd=root)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert f"{N_CHILD + 1} passed" in res.stdout  # this test and every check below really ran


def test_the_fused_path_is_not_taken_on_cpu_tensors():
    from saekit.sae.kernels import triton_topk as tt

    assert not tt.applies(torch.zeros(2, 3), 4)  # the CPU keeps its native kernels, interpreter or not


def test_the_dispatch_decision(monkeypatch):
    """`applies` on a CUDA-like input (no GPU needed: it reads only the device, the dtype and the settings)."""
    from types import SimpleNamespace

    from saekit.sae.kernels import triton_topk as tt

    monkeypatch.setattr(tt, "HAS_TOPK", True)
    cuda = lambda dtype=torch.float32: SimpleNamespace(device=torch.device("cuda"), dtype=dtype)
    monkeypatch.delenv("SAEKIT_TRITON", raising=False)
    assert not tt.applies(cuda(), 32)  # opt-in until measured on a GPU
    monkeypatch.setenv("SAEKIT_TRITON", "1")
    assert tt.applies(cuda(), 32) and tt.applies(cuda(torch.bfloat16), tt.MAX_K)
    assert not tt.applies(cuda(), tt.MAX_K + 1)  # a wider running top-k would not fit in registers
    assert not tt.applies(cuda(torch.float64), 32) and not tt.applies(cuda(torch.float16), 32)
    monkeypatch.setenv("SAEKIT_TRITON", "0")
    assert not tt.applies(cuda(), 32)


def test_batch_topk_never_takes_the_fused_path(monkeypatch):
    from saekit.sae.kernels import triton_topk as tt
    from saekit.sae.topk import TopKConfig, TopKSAE

    def refuse(*a):
        raise AssertionError("BatchTopK selects over the whole batch: not a row-wise top-k")
    monkeypatch.setattr(tt, "applies", lambda x, k: True)
    monkeypatch.setattr(tt, "encode_with_aux", refuse)
    sae = TopKSAE(TopKConfig(d_in=8, d_sae=32, k=2, batch_topk=True, seed=0)).train()
    assert sae(torch.randn(5, 8)).code.values.shape[0] == 5


def _case(B, D, F, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g, dtype=dtype)
    W = torch.randn(D, F, generator=g, dtype=dtype) / D ** 0.5
    b_enc = torch.randn(F, generator=g, dtype=dtype) * 0.5 - 0.3  # some selected values negative: ReLU zeros
    return x, W, b_enc, torch.randn(D, generator=g, dtype=dtype) * 0.1


def _by_index(vals, idx):
    order = idx.argsort(1)
    return vals.gather(1, order), idx.gather(1, order)


# (B, D, F, k, tile): the interpreter's default tile is 16 rows x 16 latents x 16 inputs, 2 tiles a program
SHAPES = [
    (5, 24, 70, 8, None),  # 3 column groups, the last one 6 latents wide (masked tail); D past one block
    (3, 16, 20, 20, None),  # k = F: K_PAD 32 > F, the tile widened to 32, 12 masked latents
    (7, 40, 100, 24, dict(BLOCK_B=16, BLOCK_F=32, BLOCK_D=16, TILES=1)),  # k > the last group's 4 latents
    (19, 33, 64, 1, None),  # k = 1, two row blocks (19 > 16), D = 33 not a multiple of the block
    (4, 16, 96, 32, dict(BLOCK_B=16, BLOCK_F=32, BLOCK_D=16, TILES=3)),  # one group, three tiles merged
]


@child_only
@pytest.mark.parametrize("B,D,F,k,tile", SHAPES)
def test_values_and_indices_match_the_torch_path(B, D, F, k, tile):
    from saekit.sae.kernels import triton_topk as tt

    x, W, b_enc, b_dec = _case(B, D, F)
    x_c = x - b_dec
    vals, idx = tt.topk_pre(x_c, W, b_enc, k, tile=tile)
    ref_vals, ref_idx = (x_c @ W + b_enc).topk(k, dim=1)
    assert torch.equal(idx.sort(1).values, ref_idx.sort(1).values)
    torch.testing.assert_close(vals, ref_vals, rtol=1e-5, atol=1e-5)  # sorted largest first, like topk(sorted)
    f_vals, f_idx = tt.fused_topk_encode(x, W, b_enc, b_dec, k)  # the default tile, ReLU after the selection
    r_vals, r_idx = dense_encode_ref(x, W, b_enc, b_dec, topk_select(k))
    f_vals, f_idx = _by_index(f_vals, f_idx)
    r_vals, r_idx = _by_index(r_vals, r_idx)
    assert torch.equal(f_idx, r_idx)
    torch.testing.assert_close(f_vals, r_vals, rtol=1e-5, atol=1e-5)
    assert (f_vals >= 0).all()


@child_only
@pytest.mark.parametrize("method", ["merge", "filter"])
def test_ties_prefer_the_lower_latent_index(method):
    from saekit.sae.kernels import triton_topk as tt

    x, W, b_enc, _ = _case(3, 16, 40)
    W[:, [5, 21, 37]] = W[:, [9, 9, 9]]  # four latents with identical pre-activations in every row
    b_enc[[5, 21, 37]] = b_enc[9] = 10.0  # ... and the largest: any k < 4 cuts inside the tie
    vals, idx = tt.topk_pre(x, W, b_enc, 3, method=method, every=4)
    assert idx.tolist() == [[5, 9, 21]] * 3
    assert (vals[:, :1] == vals).all()


def _spy_merge(monkeypatch):
    """Record the row count of every `_merge` call (the filter's sample bound, then its fallback rows)."""
    from saekit.sae.kernels import triton_topk as tt

    calls, real = [], tt._merge
    monkeypatch.setattr(tt, "_merge", lambda x, *a: calls.append(x.shape[0]) or real(x, *a))
    return calls


# (B, D, F, k, every, cap_factor, fallback rows expected): the filter forced on tiny shapes
FILTER_CASES = [
    (9, 24, 96, 5, 4, None, False),  # room for 4x the expected survivors: no fallback
    (5, 16, 200, 8, 4, 0.5, True),  # room for half of them: rows overflow and take the merge path
    (20, 33, 130, 3, 8, None, False),  # two row blocks, a masked latent tail
]


@child_only
@pytest.mark.parametrize("B,D,F,k,every,cap,fallback", FILTER_CASES)
def test_the_filter_path_matches_the_torch_path(monkeypatch, B, D, F, k, every, cap, fallback):
    from saekit.sae.kernels import triton_topk as tt

    calls = _spy_merge(monkeypatch)
    x, W, b_enc, _ = _case(B, D, F, seed=7)
    vals, idx = tt.topk_pre(x, W, b_enc, k, method="filter", every=every, cap_factor=cap)
    ref_vals, ref_idx = (x @ W + b_enc).topk(k, dim=1)
    assert torch.equal(idx, ref_idx)  # both sorted by value, no ties here
    torch.testing.assert_close(vals, ref_vals, rtol=1e-5, atol=1e-5)
    assert calls[0] == B and (len(calls) > 1) == fallback  # the sample bound, then the fallback rows if any


@child_only
def test_a_weak_sample_overflows_every_row_into_the_exact_fallback(monkeypatch):
    from saekit.sae.kernels import triton_topk as tt

    calls = _spy_merge(monkeypatch)
    x, W, b_enc, _ = _case(6, 16, 128, seed=8)
    b_enc[::4] = -100.0  # the sampled latents never fire: the bound lets every latent through
    vals, idx = tt.topk_pre(x, W, b_enc, 4, method="filter", every=4, cap_factor=0.25)
    assert calls == [6, 6]
    assert torch.equal(idx, (x @ W + b_enc).topk(4, dim=1).indices)


@child_only
def test_gradients_match_autograd_of_the_reference():
    """float64 inputs: the kernel selects in fp32 (no ties here), the backward runs in float64, so
    every gradient can be compared tightly with autograd of the dense eager reference."""
    from saekit.sae.kernels import triton_topk as tt

    x, W, b_enc, b_dec = _case(6, 24, 50, seed=1, dtype=torch.float64)
    grad = torch.randn(6, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    grads = []
    for fn in (lambda *a: tt.fused_topk_encode(*a, 5), lambda *a: dense_encode_ref(*a, topk_select(5))):
        leaves = [t.clone().requires_grad_() for t in (x, W, b_enc, b_dec)]
        vals, idx = fn(*leaves)
        order = idx.argsort(1)  # the same upstream gradient per latent, whatever the slot order
        (vals.gather(1, order) * grad).sum().backward()
        grads.append([t.grad for t in leaves])
    assert (grads[1][2] == 0).sum() > 0  # some latents were not selected anywhere
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@child_only
def test_bf16_operands_accumulate_in_fp32():
    from saekit.sae.kernels import triton_topk as tt

    x, W, b_enc, b_dec = _case(6, 48, 64, seed=3)
    x_c = x - b_dec
    with torch.autocast("cpu", dtype=torch.bfloat16):
        vals, idx = tt.fused_topk_encode(x, W, b_enc, b_dec, 8)
    assert vals.dtype == torch.float32
    # the exact reference of bf16 operands with fp32 accumulation: the same latents, close values
    pre = x_c.bfloat16().float() @ W.bfloat16().float() + b_enc
    r_vals, r_idx = dense_encode_ref(x_c.bfloat16().float(), W.bfloat16().float(), b_enc, None, topk_select(8))
    assert torch.equal(_by_index(vals, idx)[1], _by_index(r_vals, r_idx)[1])
    torch.testing.assert_close(_by_index(vals, idx)[0], _by_index(r_vals, r_idx)[0], rtol=1e-5, atol=1e-5)
    # and the fp32 result within bf16 rounding of the operands
    f_vals = dense_encode_ref(x, W, b_enc, b_dec, topk_select(8))[0]
    assert (vals.sort(1).values - f_vals.sort(1).values).abs().max() < 0.05 * pre.abs().max()
    xb, Wb, bb, bdb = (t.bfloat16() for t in (x, W, b_enc, b_dec))  # bf16 parameters: bf16 values out
    bf_vals, bf_idx = tt.fused_topk_encode(xb, Wb, bb, bdb, 8)
    r_vals, r_idx = dense_encode_ref((xb - bdb).float(), Wb.float(), bb.float(), None, topk_select(8))
    assert bf_vals.dtype == torch.bfloat16 and torch.equal(bf_idx.sort(1).values, r_idx.sort(1).values)


def _sae_pair(monkeypatch, fused: bool, dead: bool):
    from saekit.sae.kernels import triton_topk as tt
    from saekit.sae.topk import TopKConfig, TopKSAE

    monkeypatch.setattr(tt, "applies", lambda x, k: fused)  # the interpreter's CPU tensors stand in for CUDA
    sae = TopKSAE(TopKConfig(d_in=16, d_sae=48, k=4, aux_k=6, dead_tokens_threshold=10, seed=0))
    with torch.no_grad():
        sae.b_enc.normal_(generator=torch.Generator().manual_seed(4))
        sae.b_dec.normal_(generator=torch.Generator().manual_seed(5))
        if dead:
            sae.tokens_since_fired[::3] = 100  # 16 dead latents: AuxK runs
    return sae.train()


@child_only
@pytest.mark.parametrize("dead", [False, True])
def test_topk_sae_gives_the_same_codes_loss_and_gradients_fused(monkeypatch, dead):
    x = torch.randn(10, 16, generator=torch.Generator().manual_seed(6))
    results = []
    for fused in (True, False):
        sae = _sae_pair(monkeypatch, fused, dead)
        out = sae(x)
        loss = sae.loss(x, out)
        loss.total.backward()
        results.append((out, loss, {n: p.grad for n, p in sae.named_parameters()}))
    (o_f, l_f, g_f), (o_t, l_t, g_t) = results
    assert torch.equal(_by_index(o_f.code.values, o_f.code.indices)[1], _by_index(o_t.code.values, o_t.code.indices)[1])
    torch.testing.assert_close(o_f.recon, o_t.recon, rtol=1e-5, atol=1e-5)
    assert ("auxk" in l_f.parts) == dead == ("auxk" in l_t.parts)
    for key in l_t.parts:
        assert l_f.parts[key] == pytest.approx(l_t.parts[key], rel=1e-5)
    for name in g_t:
        torch.testing.assert_close(g_f[name], g_t[name], rtol=1e-4, atol=1e-5)


@child_only
def test_available_under_the_interpreter_but_not_dispatched_on_cpu():
    from saekit.sae.kernels import triton_topk as tt

    assert tt.available(torch.zeros(1)) and not tt.applies(torch.zeros(1, 4), 2)


@child_only
def test_an_empty_batch_gives_empty_codes():
    from saekit.sae.kernels import triton_topk as tt

    x, W, b_enc, b_dec = _case(0, 16, 32)
    vals, idx = tt.fused_topk_encode(x, W, b_enc, b_dec, 4)
    assert vals.shape == idx.shape == (0, 4)


@child_only
def test_unpack_inverts_the_key_order_on_signed_values():
    from saekit.sae.kernels import triton_topk as tt

    x = torch.tensor([[-3.0, -0.5, 0.0, 0.25, 7.0, -1e-30]])
    W = torch.eye(6)  # pre = x exactly
    vals, idx = tt.topk_pre(x, W, torch.zeros(6), 6)
    assert idx.tolist() == [[4, 3, 2, 5, 1, 0]] and vals[0].tolist() == sorted(x[0].tolist(), reverse=True)


def test_the_gpu_benchmark_says_it_skipped_without_cuda():
    """scripts/bench_train_gpu.py, run on a machine without a CUDA device, prints one JSON line saying so."""
    if CHILD:
        return
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(root)}
    res = subprocess.run([sys.executable, str(root / "scripts" / "bench_train_gpu.py"), "--quick"], env=env,
                         capture_output=True, text=True, cwd=root)
    assert res.returncode == 0, res.stderr[-2000:]
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["skipped"] == "no CUDA device"


def _sm90_resources(precision: str, k: int, method: str = "merge") -> dict:
    """Compile the kernel with its default tile for an H100/H200 (sm_90) without a GPU: Triton's own ptxas,
    then cuobjdump's resource usage, e.g. {"REG": 192, "STACK": 0, ...}."""
    import re
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from saekit.sae.kernels import triton_topk as tt

    k_pad = max(triton.next_power_of_2(k), 2)
    tile = tt._tiles(768, 32768, k_pad, None, precision == "bf16")  # the launch tile at the H200 shape
    dt = "bf16" if precision == "bf16" else "fp32"
    const = dict(BLOCK_B=tile["BLOCK_B"], BLOCK_F=tile["BLOCK_F"], BLOCK_D=tile["BLOCK_D"],
                 DOT_BF16=precision == "bf16", EMULATE_BF16=False, FP32_PRECISION="ieee")
    fn = tt._encode_topk_kernel if method == "merge" else tt._filter_kernel
    if method == "merge":
        const["K_PAD"] = k_pad
    ptrs = {"x_ptr": f"*{dt}", "w_ptr": f"*{dt}", "b_ptr": "*fp32", "key_ptr": "*i64", "bound_ptr": "*i64",
            "cnt_ptr": "*i32", "buf_ptr": "*i64"}
    names = fn.arg_names
    sig = {n: ptrs.get(n, "constexpr" if n in const else "i32") for n in names}
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(n),): v for n, v in const.items()})
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": tile["num_warps"]})
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "k.cubin"
        path.write_bytes(kernel.asm["cubin"])
        res = subprocess.run([str(CUOBJDUMP), "--dump-resource-usage", str(path)], capture_output=True, text=True)
    return {m[0]: int(m[1]) for m in re.findall(r"(REG|STACK|LOCAL):(\d+)", res.stdout)}


def _cuobjdump() -> Path | None:
    try:
        import triton.backends.nvidia as nv
    except ImportError:
        return None
    path = Path(nv.__file__).parent / "bin" / "cuobjdump"
    return path if path.exists() else None


CUOBJDUMP = _cuobjdump()


@pytest.mark.slow
@pytest.mark.parametrize("precision,k,method", [("bf16", 32, "merge"), ("fp32", 32, "merge"), ("bf16", 128, "merge"),
                                               ("bf16", 1, "merge"), ("bf16", 32, "filter"), ("fp32", 64, "filter")])
def test_the_cuda_kernel_compiles_for_sm90_without_spilling(precision, k, method):
    """The interpreter never compiles the GPU branch (bf16 tensor-core dot): this does, for an H200, and checks
    the default tiles keep every value in registers (a spill to local memory would slow the selection)."""
    if CHILD:
        return
    if CUOBJDUMP is None:
        pytest.skip("this Triton has no NVIDIA backend tools (ptxas, cuobjdump)")
    res = _sm90_resources(precision, k, method)
    assert res["REG"] <= 255 and res["STACK"] == 0 and res["LOCAL"] == 0, res
