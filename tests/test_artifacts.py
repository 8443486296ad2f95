import json

import pytest
import torch

from saekit.artifacts import atomic_dir, atomic_write_json, dumps_json, load_tensors, save_tensors
from saekit.errors import CorruptArtifactError


def test_strict_json_has_no_nan():
    text = dumps_json({"a": float("nan"), "b": [float("inf"), 1.0], "t": torch.tensor([1.5])})
    assert json.loads(text) == {"a": None, "b": [None, 1.0], "t": [1.5]}


def test_tensor_roundtrip_and_corruption_named(tmp_path):
    f = tmp_path / "w.safetensors"
    sha = save_tensors(f, {"w": torch.arange(12.0).reshape(3, 4)})
    assert torch.equal(load_tensors(f, sha)["w"], torch.arange(12.0).reshape(3, 4))
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CorruptArtifactError, match="w.safetensors"):
        load_tensors(f, sha)
    f.write_bytes(bytes(data[:-1]))
    with pytest.raises(CorruptArtifactError, match="w.safetensors"):
        load_tensors(f)  # truncated, no checksum: the format check still names it


def test_atomic_dir_keeps_old_folder_when_body_fails(tmp_path):
    final = tmp_path / "out"
    with atomic_dir(final) as d:
        atomic_write_json(d / "x.json", {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic_dir(final) as d:
            atomic_write_json(d / "x.json", {"v": 2})
            raise RuntimeError("crash mid-write")
    assert json.loads((final / "x.json").read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no half-built sibling left


def test_no_pickle_or_unsafe_torch_load_in_package():
    import ast
    from pathlib import Path

    for path in Path("saekit").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                assert not any(n.split(".")[0] in {"pickle", "dill", "cloudpickle"} for n in names), path
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "load" \
                    and getattr(getattr(node.func, "value", None), "id", "") == "torch":
                kws = {k.arg: getattr(k.value, "value", None) for k in node.keywords}
                assert kws.get("weights_only") is True, f"{path}:{node.lineno} torch.load without weights_only=True"
