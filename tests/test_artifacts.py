import errno
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import saekit.artifacts as artifacts
from saekit.artifacts import (
    atomic_dir,
    atomic_write_bytes,
    atomic_write_json,
    clean_stale_tmp,
    dumps_json,
    load_tensors,
    recover_replaced_dir,
    save_tensors,
    verify_manifest,
)
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


ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("saekit", "dashboards", "scripts", "tests")


def _unsafe_loads(path: Path) -> list[str]:
    """pickle-family imports, `from torch import load`, and torch.load calls without weights_only=True."""
    import ast

    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [f"{path}:{node.lineno} import {a.name}" for a in node.names
                      if a.name.split(".")[0] in {"pickle", "dill", "cloudpickle", "_pickle"}]
        elif isinstance(node, ast.ImportFrom):
            mod = (node.module or "").split(".")[0]
            if mod in {"pickle", "dill", "cloudpickle", "_pickle"} or \
                    (mod == "torch" and any(a.name == "load" for a in node.names)):
                found.append(f"{path}:{node.lineno} from {node.module} import ...")
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "load" \
                and getattr(getattr(node.func, "value", None), "id", "") == "torch":
            kws = {k.arg: getattr(k.value, "value", None) for k in node.keywords}
            if kws.get("weights_only") is not True:
                found.append(f"{path}:{node.lineno} torch.load without weights_only=True")
    return found


def test_no_pickle_or_unsafe_torch_load_anywhere():
    """docs/RELIABILITY.md 12, from the repository root whatever the working directory."""
    files = sorted(f for d in SCANNED for f in (ROOT / d).rglob("*.py"))
    assert ROOT / "saekit" / "artifacts.py" in files and ROOT / "dashboards" / "app.py" in files
    assert len(files) >= 60, len(files)  # the scan really saw the code
    assert [hit for f in files for hit in _unsafe_loads(f)] == []


def test_the_scan_catches_what_it_bans(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import pickle\nfrom torch import load\nimport torch\ntorch.load('x')\n"
                   "torch.load('y', weights_only=False)\ntorch.load('z', weights_only=True)\n")
    assert [h.split(" ", 1)[1] for h in _unsafe_loads(bad)] == [
        "import pickle", "from torch import ...", "torch.load without weights_only=True",
        "torch.load without weights_only=True"]


# A hard kill in the middle of replacing a folder: a child process writes version 1, then starts
# writing version 2 and dies (os._exit, no finally blocks) at the given point of the replacement.
_KILL_CHILD = """
import os, sys
import saekit.artifacts as A

final, point = sys.argv[1], sys.argv[2]
with A.atomic_dir(final) as d:
    A.atomic_write_json(d / "x.json", {"v": 1})
    A.write_manifest(d, ["x.json"])
real_replace, real_exchange = os.replace, A._exchange
if point == "between_renames":          # no atomic swap on this system: two renames, killed between
    A._exchange = lambda a, b: False
    def replace(src, dst):
        real_replace(src, dst)
        if str(src) == final:
            os._exit(9)
    A.os.replace = replace
elif point == "before_swap":
    A._exchange = lambda a, b: os._exit(9)
elif point == "after_swap":
    def exchange(a, b):
        assert real_exchange(a, b), "this test expects renameat2 to work here"
        os._exit(9)
    A._exchange = exchange
with A.atomic_dir(final) as d:
    A.atomic_write_json(d / "x.json", {"v": 2})
    A.write_manifest(d, ["x.json"])
"""


def _killed_replacement(tmp_path, point):
    final = tmp_path / "final_sae"
    proc = subprocess.run([sys.executable, "-c", _KILL_CHILD, str(final), point], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 9, proc.stderr
    return final


def test_kill_between_the_two_renames_is_restored_on_next_load(tmp_path):
    final = _killed_replacement(tmp_path, "between_renames")
    assert not final.exists() and (tmp_path / ".final_sae.old").is_dir()  # the state a kill leaves
    verify_manifest(final)  # the load path restores the last complete version
    assert json.loads((final / "x.json").read_text()) == {"v": 1}
    assert not (tmp_path / ".final_sae.old").exists()


def test_kill_between_the_two_renames_is_restored_by_the_next_write_or_cleanup(tmp_path):
    final = _killed_replacement(tmp_path, "between_renames")
    clean_stale_tmp(tmp_path)
    assert json.loads((final / "x.json").read_text()) == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final_sae"]  # .old restored, .tmp removed

    final = _killed_replacement(tmp_path / "again", "between_renames")
    with atomic_dir(final) as d:
        atomic_write_json(d / "x.json", {"v": 3})
    assert json.loads((final / "x.json").read_text()) == {"v": 3}
    assert not (final.parent / ".final_sae.old").exists()


@pytest.mark.parametrize("point,version", [("before_swap", 1), ("after_swap", 2)])
def test_kill_around_the_atomic_swap_always_leaves_a_complete_folder(tmp_path, point, version):
    final = _killed_replacement(tmp_path, point)
    assert verify_manifest(final)["files"]  # complete and consistent, no recovery needed
    assert json.loads((final / "x.json").read_text()) == {"v": version}
    clean_stale_tmp(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final_sae"]


def test_stale_old_next_to_a_complete_folder_is_removed(tmp_path):
    final = tmp_path / "bundle"
    for v in (1, 2):
        with atomic_dir(final) as d:
            atomic_write_json(d / "x.json", {"v": v})
    (tmp_path / ".bundle.old").mkdir()  # a finished replacement that was killed before its cleanup
    recover_replaced_dir(final)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]
    assert json.loads((final / "x.json").read_text()) == {"v": 2}


def test_directory_fsync_failure_propagates(tmp_path, monkeypatch):
    """A failing directory fsync is a lost write; only 'not supported here' may be ignored."""
    def eio(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(artifacts.os, "fsync", eio)
    with pytest.raises(OSError, match="Input/output"):
        artifacts._fsync_dir(tmp_path)

    def einval(fd):
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(artifacts.os, "fsync", lambda fd: None)
    atomic_write_bytes(tmp_path / "a.bin", b"x")
    monkeypatch.setattr(artifacts.os, "fsync", einval)
    artifacts._fsync_dir(tmp_path)  # a file system without directory fsync: not an error


def test_leftover_that_cannot_be_removed_is_reported(tmp_path, monkeypatch, caplog):
    leftover = tmp_path / ".x.1234.tmp"
    leftover.mkdir()
    (leftover / "f").write_text("x")
    monkeypatch.setattr(artifacts.os, "unlink", lambda *a, **k: (_ for _ in ()).throw(PermissionError(13, "denied")))
    with caplog.at_level("WARNING", logger="saekit.artifacts"):
        clean_stale_tmp(tmp_path)
    assert ".x.1234.tmp" in caplog.text and "denied" in caplog.text
