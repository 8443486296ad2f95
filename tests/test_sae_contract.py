"""The SparseAutoencoder contract, for every registered architecture (docs/RELIABILITY.md 1, 2, 8, 9, 11).

Each architecture is built from a small config through its own config_class; fields this file does
not know keep their defaults, so architectures added later are covered without editing this file.
Also: the declared policy (stat buffers, affine decoder, W_dec) holds, and encode gives the same
codes in every context users run (grad modes, autocast, thread counts, input layouts, CUDA; issue 21).
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import get_args

import pytest
import torch
from safetensors.torch import load_file, save_file

from saekit.artifacts import write_manifest
from saekit.errors import CorruptArtifactError, DtypeMismatchError, ShapeMismatchError
from saekit.sae.base import SparseCode, StatReduction
from saekit.sae.registry import CFG_FILE, WEIGHTS_FILE, architectures, create, get_class, load_sae, save_sae

D_IN, D_SAE = 8, 32
SMALL = {"k": 4, "aux_k": 4}  # small values for fields an architecture may have


def small_config(arch: str, **over):
    cls = get_class(arch).config_class
    names = {f.name for f in dataclasses.fields(cls)}
    kw = {"d_in": D_IN, "d_sae": D_SAE} | {n: v for n, v in SMALL.items() if n in names} | over
    return cls.from_dict(kw, where=arch)


def defaults_config(arch: str, **over):
    """Only the widths set: every other field at its default (e.g. MDL without a k cap)."""
    return get_class(arch).config_class.from_dict({"d_in": D_IN, "d_sae": D_SAE} | over, where=arch)


def build(arch: str, variant: str = "small", **over):
    torch.manual_seed(0)
    cfg = small_config(arch, **over) if variant == "small" else defaults_config(arch, **over)
    sae = create(cfg, architecture=arch)
    with torch.no_grad():  # move biases away from 0 so they take part in every check
        for name, p in sae.named_parameters():
            if p.ndim == 1:
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))).to(p.dtype))
    return sae


ARCHS = architectures()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("variant", ["small", "defaults"])
@pytest.mark.parametrize("lead", [(), (5,), (3, 4)], ids=["D", "BD", "BTD"])
def test_shapes_and_forward_equals_decode_encode(arch, variant, lead):
    sae = build(arch, variant).eval()
    x = torch.randn(*lead, D_IN, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = sae(x)
        code = sae.encode(x)
        recon = sae.decode(code)
    assert out.recon.shape == x.shape
    assert code.dense().shape == (*lead, D_SAE)
    assert code.indices.shape[:-1] == lead
    torch.testing.assert_close(out.recon, recon, rtol=0, atol=1e-6)
    cfg = sae.cfg
    if getattr(cfg, "k", None) is not None and not getattr(cfg, "batch_topk", False):
        assert (code.l0() <= cfg.k).all()
    if getattr(cfg, "nonneg", True):  # signed codes only where the config asks for them (MP nonneg=False)
        assert (code.values >= 0).all()
    assert code.l0().sum() > 0  # not vacuous: something fires


@pytest.mark.parametrize("arch", ARCHS)
def test_w_dec_is_the_decoder_parameter(arch):
    sae = build(arch)
    assert hasattr(sae, "W_dec") and tuple(sae.W_dec.shape) == (D_SAE, D_IN)
    assert any(sae.W_dec is p for p in sae.parameters())


@pytest.mark.parametrize("arch", ARCHS)
def test_declared_policy_is_well_formed(arch):
    cls = get_class(arch)
    assert isinstance(cls.edits_weights_locally, bool) and isinstance(cls.decoder_is_affine, bool)
    assert set(cls.stat_buffers.values()) <= set(get_args(StatReduction))  # what DistributedSync can reduce


STAT_KNOBS = {"batch_topk": True, "revive_after_tokens": 1}  # fields that switch training statistics on


@pytest.mark.parametrize("arch", ARCHS)
def test_training_forward_changes_only_declared_stat_buffers(arch):
    """Distributed training makes exactly the declared statistics global; an undeclared buffer that a
    training forward changes would silently stay per rank."""
    names = {f.name for f in dataclasses.fields(get_class(arch).config_class)}
    sae = build(arch, **{n: v for n, v in STAT_KNOBS.items() if n in names}).train()
    before = {n: b.clone() for n, b in sae.named_buffers()}
    for seed in (1, 2):
        sae(torch.randn(16, D_IN, generator=torch.Generator().manual_seed(seed)))
    changed = {n for n, b in sae.named_buffers() if not torch.equal(b, before[n])}
    assert changed <= set(sae.stat_buffers), f"undeclared training statistics: {changed - set(sae.stat_buffers)}"
    for name, how in sae.stat_buffers.items():
        buf = dict(sae.named_buffers()).get(name)
        if buf is not None and how == "fired_any":
            assert buf.shape == (D_SAE,) and not buf.is_floating_point()
        if buf is not None and how == "min":
            assert buf.is_floating_point()


@pytest.mark.parametrize("arch", [a for a in ARCHS if get_class(a).decoder_is_affine])
def test_declared_affine_decoder_is_affine(arch):
    """decoder_is_affine=True promises decode(code) == values @ W_dec[idx] + b (the DL fast path's premise)."""
    sae = build(arch).eval()
    with torch.no_grad():
        code = sae.encode(torch.randn(32, D_IN, generator=torch.Generator().manual_seed(3)))
        g = torch.Generator().manual_seed(4)
        moved = SparseCode(code.indices, code.values + torch.randn(code.values.shape, generator=g).to(code.values),
                           code.d_sae)
        for c in (code, moved):
            lin = torch.einsum("nk,nkd->nd", c.values.double(), sae.W_dec.double()[c.indices])
            bias = sae.decode(c).double() - lin
            torch.testing.assert_close(bias, bias[:1].expand_as(bias), rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_save_load_bitwise(arch, dtype, tmp_path):
    sae = build(arch, dtype=dtype)
    save_sae(sae, tmp_path / "sae")
    loaded = load_sae(tmp_path / "sae")
    assert type(loaded) is type(sae) and loaded.cfg == sae.cfg
    a, b = sae.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    cfg = json.loads((tmp_path / "sae" / CFG_FILE).read_text())
    assert cfg["architecture"] == arch and cfg["d_in"] == D_IN and cfg["d_sae"] == D_SAE


def _rewrite_weights(folder, change):
    tensors = load_file(folder / WEIGHTS_FILE)
    name = "W_dec" if "W_dec" in tensors else sorted(n for n, t in tensors.items() if t.ndim >= 1)[0]
    tensors[name] = change(tensors[name])
    save_file(tensors, folder / WEIGHTS_FILE)
    write_manifest(folder, [CFG_FILE, WEIGHTS_FILE])  # consistent checksums: only the shape/dtype is wrong
    return name


@pytest.mark.parametrize("arch", ARCHS)
def test_shape_and_dtype_mismatch_name_the_tensor(arch, tmp_path):
    sae = build(arch)
    save_sae(sae, tmp_path / "a")
    want = tuple(sae.state_dict()[_rewrite_weights(tmp_path / "a", lambda t: t)].shape)
    found = (want[0] - 1, *want[1:])
    name = _rewrite_weights(tmp_path / "a", lambda t: t[:-1].clone())
    with pytest.raises(ShapeMismatchError, match=re.escape(f"'{name}' expected shape {want} from cfg.json, "
                                                             f"found {found}")):
        load_sae(tmp_path / "a")
    save_sae(sae, tmp_path / "b")
    name = _rewrite_weights(tmp_path / "b", lambda t: t.double())
    with pytest.raises(DtypeMismatchError, match=f"{name}.*float32.*float64"):
        load_sae(tmp_path / "b")


@pytest.mark.parametrize("change", ["missing", "extra"])
def test_missing_or_extra_tensors_are_named(change, tmp_path):
    """The missing/extra branch of check_state: a tensor the architecture needs, or one it does not know."""
    save_sae(build("topk"), tmp_path / "sae")
    tensors = load_file(tmp_path / "sae" / WEIGHTS_FILE)
    if change == "missing":
        del tensors["b_enc"]
    else:
        tensors["stowaway"] = torch.zeros(3)
    save_file(tensors, tmp_path / "sae" / WEIGHTS_FILE)
    write_manifest(tmp_path / "sae", [CFG_FILE, WEIGHTS_FILE])
    expect = r"missing \['b_enc'\], unexpected \[\]" if change == "missing" else r"missing \[\], unexpected \['stowaway'\]"
    with pytest.raises(ShapeMismatchError, match=expect):
        load_sae(tmp_path / "sae")


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_damaged_cfg_json_is_named(damage, tmp_path):
    """Promise 11 for cfg.json: a changed or cut byte is caught by the manifest, before the config is used."""
    save_sae(build("topk"), tmp_path / "sae")
    path = tmp_path / "sae" / CFG_FILE
    data = path.read_bytes()
    data = data.replace(b'"d_sae": 32', b'"d_sae": 33') if damage == "flip" else data[:-1]
    assert data != path.read_bytes()
    path.write_bytes(data)
    with pytest.raises(CorruptArtifactError, match=rf"{CFG_FILE}: sha256 mismatch"):
        load_sae(tmp_path / "sae")


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_damaged_weights_raise_naming_the_file(arch, damage, tmp_path):
    save_sae(build(arch), tmp_path / "sae")
    path = tmp_path / "sae" / WEIGHTS_FILE
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[-3] ^= 0xFF  # inside the last tensor's data
    else:
        data = data[:-1]
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptArtifactError, match=WEIGHTS_FILE):
        load_sae(tmp_path / "sae")


@pytest.mark.parametrize("arch", ARCHS)
def test_missing_manifest_refuses_altered_tensors(arch, tmp_path):
    """Integrity is not optional: with saekit_manifest.json deleted, a flipped tensor byte must not load
    (promise 11); the error names the missing manifest and how to re-save, and verify=False is the escape."""
    from saekit.artifacts import MANIFEST

    save_sae(build(arch), tmp_path / "sae")
    path = tmp_path / "sae" / WEIGHTS_FILE
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    (tmp_path / "sae" / MANIFEST).unlink()
    with pytest.raises(CorruptArtifactError, match=rf"no {MANIFEST}.*re-save.*verify=False"):
        load_sae(tmp_path / "sae")
    assert type(load_sae(tmp_path / "sae", verify=False)) is get_class(arch)


def test_manifest_without_the_weights_entry_is_refused(tmp_path):
    from saekit.artifacts import MANIFEST, write_manifest

    save_sae(build("topk"), tmp_path / "sae")
    write_manifest(tmp_path / "sae", [CFG_FILE])  # lists cfg.json only
    with pytest.raises(CorruptArtifactError, match=rf"{MANIFEST}.*missing \['{WEIGHTS_FILE}'\]"):
        load_sae(tmp_path / "sae")


# -- the same codes in every context users run (issue 21) -----------------------------------------
# Inputs are planted sparse combinations of the SAE's own decoder rows with coefficients in [2, 3]
# (plus b_dec when the SAE has one), at a width where cross-talk between random rows is ~0.2: the
# selected latents then win by margins far above bf16 rounding, so a context may only change the
# code by the rounding of its dtype. 512 rows: more than two MP selection chunks, so two threads
# really run two workers.
CTX_D_IN, CTX_D_SAE, CTX_ROWS, CTX_ATOMS = 512, 1024, 512, 4


def context_sae(arch: str):
    torch.manual_seed(0)
    sae = create(small_config(arch, d_in=CTX_D_IN, d_sae=CTX_D_SAE), architecture=arch)
    return sae.eval()


def planted_input(sae) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    W_FD = sae.W_dec.detach().float()
    W_FD = W_FD / W_FD.norm(dim=1, keepdim=True)
    idx_NK = torch.stack([torch.randperm(CTX_D_SAE, generator=g)[:CTX_ATOMS] for _ in range(CTX_ROWS)])
    coef_NK = 2.0 + torch.rand(CTX_ROWS, CTX_ATOMS, generator=g)
    x_ND = torch.einsum("nk,nkd->nd", coef_NK, W_FD[idx_NK])
    b_dec = getattr(sae, "b_dec", None)
    return x_ND + b_dec.detach().float() if isinstance(b_dec, torch.Tensor) else x_ND


def _with_threads(n: int, fn):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        out = fn()
        assert torch.get_num_threads() == n, "encode changed the caller's thread count"
        return out
    finally:
        torch.set_num_threads(before)


def _training_with_grad(sae, x):
    sae.train()
    with torch.enable_grad():
        code = sae.encode(x)
        if code.values.requires_grad:  # the code is differentiable in the parameters (MP, top-k, MDL)
            code.values.sum().backward()
    return code


CONTEXTS = {  # name: (tolerance relative to the code's scale, threads, how encode is called)
    "no_grad": (1e-5, 2, lambda sae, x: _no_grad(sae.encode, x)),
    "inference_mode": (1e-5, 2, lambda sae, x: _inference(sae.encode, x)),
    "train_grad": (1e-5, 2, _training_with_grad),
    "bf16_autocast": (2 ** -5, 2, lambda sae, x: _autocast(sae.encode, x)),
    "threads_1": (1e-5, 1, lambda sae, x: _no_grad(sae.encode, x)),
    "non_contiguous": (1e-5, 2, lambda sae, x: _no_grad(sae.encode, _strided(x))),
    "batch_seq": (1e-5, 2, lambda sae, x: _no_grad(sae.encode, x.reshape(8, -1, x.shape[-1]))),
}
"""Two threads by default: MP then selects in two worker threads, which do not inherit the caller's
thread-local modes (grad, inference, autocast); that is where MP once failed under inference_mode."""


def _no_grad(fn, x):
    with torch.no_grad():
        return fn(x)


def _inference(fn, x):
    with torch.inference_mode():
        return fn(x)


def _autocast(fn, x):
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        return fn(x)


def _strided(x):
    wide = torch.zeros(x.shape[0], 2 * x.shape[1], dtype=x.dtype)
    wide[:, ::2] = x
    out = wide[:, ::2]
    assert not out.is_contiguous()
    return out


def assert_same_code(got, ref, tol: float) -> None:
    """Dense codes equal to `tol` relative to the code's scale (duplicate slots merged by dense())."""
    d_got = got.dense().detach().float().cpu().reshape(ref.values.shape[0], -1)
    d_ref = ref.dense().detach().float().cpu()
    scale = float(d_ref.abs().max())
    torch.testing.assert_close(d_got, d_ref, rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("context", list(CONTEXTS))
def test_same_codes_in_every_context(arch, context):
    sae = context_sae(arch)
    x = planted_input(sae)
    ref = _no_grad(sae.encode, x)
    tol, threads, run = CONTEXTS[context]
    got = _with_threads(threads, lambda: run(sae, x))
    assert_same_code(got, ref, tol)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("grad_mode", ["no_grad", "inference_mode"])
def test_same_codes_on_cuda(arch, grad_mode):
    sae = context_sae(arch)
    x = planted_input(sae)
    ref = _no_grad(sae.encode, x)
    cuda = sae.to("cuda")
    got = (_no_grad if grad_mode == "no_grad" else _inference)(cuda.encode, x.cuda())
    assert got.values.is_cuda
    assert_same_code(got, ref, 1e-4)


@pytest.mark.parametrize("arch", [a for a in ARCHS if not a.startswith("test_")])  # saekit's own architectures
@pytest.mark.parametrize("scale", [0.37, 4.2])
def test_folding_the_input_scale_keeps_raw_reconstructions(arch, scale):
    """Promise 5 over the registry: the folded copy on raw x gives the training model's reconstruction of
    x * s, divided by s, within 1e-5 (b_dec included: build() moves every bias away from 0); an
    architecture that cannot fold raises NotImplementedError."""
    sae = build(arch).eval()
    x = torch.randn(64, D_IN, generator=torch.Generator().manual_seed(7)) * 2.0
    sae.set_input_scale(scale)
    if not sae.supports_folding:
        with pytest.raises(NotImplementedError):
            sae.folded_copy()
        return
    folded = sae.folded_copy().eval()
    with torch.no_grad():
        want = (sae(x * scale).recon / scale).double()
        got = folded(x).recon.double()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
