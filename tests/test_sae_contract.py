"""The SparseAutoencoder contract, for every registered architecture (docs/RELIABILITY.md 1, 2, 8, 9, 11).

Each architecture is built from a small config through its own config_class; fields this file does
not know keep their defaults, so architectures added later are covered without editing this file.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from saekit.artifacts import write_manifest
from saekit.errors import CorruptArtifactError, DtypeMismatchError, ShapeMismatchError
from saekit.sae.registry import CFG_FILE, WEIGHTS_FILE, architectures, create, get_class, load_sae, save_sae

D_IN, D_SAE = 8, 32
SMALL = {"k": 4, "aux_k": 4}  # small values for fields an architecture may have


def small_config(arch: str, **over):
    cls = get_class(arch).config_class
    names = {f.name for f in dataclasses.fields(cls)}
    kw = {"d_in": D_IN, "d_sae": D_SAE} | {n: v for n, v in SMALL.items() if n in names} | over
    return cls.from_dict(kw, where=arch)


def build(arch: str, **over):
    torch.manual_seed(0)
    sae = create(small_config(arch, **over), architecture=arch)
    with torch.no_grad():  # move biases away from 0 so they take part in every check
        for name, p in sae.named_parameters():
            if p.ndim == 1:
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))).to(p.dtype))
    return sae


ARCHS = architectures()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("lead", [(), (5,), (3, 4)], ids=["D", "BD", "BTD"])
def test_shapes_and_forward_equals_decode_encode(arch, lead):
    sae = build(arch).eval()
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
    if hasattr(cfg, "k") and not getattr(cfg, "batch_topk", False):
        assert (code.l0() <= cfg.k).all()
    if arch == "topk":
        assert (code.values >= 0).all()


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
    name = _rewrite_weights(tmp_path / "a", lambda t: t[:-1].clone())
    with pytest.raises(ShapeMismatchError, match=name):
        load_sae(tmp_path / "a")
    save_sae(sae, tmp_path / "b")
    name = _rewrite_weights(tmp_path / "b", lambda t: t.double())
    with pytest.raises(DtypeMismatchError, match=f"{name}.*float32.*float64"):
        load_sae(tmp_path / "b")


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
