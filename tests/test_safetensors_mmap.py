"""The shared numpy memory-mapping of safetensors files (store shards and browser bundle parts)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from saekit.errors import CorruptArtifactError
from saekit.safetensors_mmap import memmap_safetensors


def test_maps_every_tensor_in_place(tmp_path):
    f = tmp_path / "a.safetensors"
    x, i, b = torch.randn(5, 3), torch.arange(4), torch.tensor([1.5, -2.0], dtype=torch.bfloat16)
    save_file({"x": x, "i": i, "b": b, "empty": torch.zeros(0, 3)}, str(f))
    m = memmap_safetensors(f)
    assert np.array_equal(m["x"][0], x.numpy()) and m["x"][1] == "F32"
    assert np.array_equal(m["i"][0], i.numpy()) and m["empty"][0].shape == (0, 3)
    assert m["b"][1] == "BF16" and np.array_equal(m["b"][0], b.view(torch.int16).numpy().view(np.uint16))
    assert isinstance(m["x"][0], np.memmap)  # not read into memory


@pytest.mark.parametrize("cut", [4, 20, -8])
def test_short_files_raise_the_callers_error_naming_the_file(tmp_path, cut):
    f = tmp_path / "a.safetensors"
    save_file({"x": torch.randn(64, 8)}, str(f))
    data = f.read_bytes()
    f.write_bytes(data[:cut] if cut > 0 else data[:cut])

    class MyError(CorruptArtifactError):
        pass

    with pytest.raises(MyError, match="a.safetensors: truncated"):
        memmap_safetensors(f, error=MyError)


def test_garbled_header_is_named(tmp_path):
    f = tmp_path / "a.safetensors"
    f.write_bytes((16).to_bytes(8, "little") + b"{not json at all" + b"\0" * 32)
    with pytest.raises(CorruptArtifactError, match="unreadable safetensors header"):
        memmap_safetensors(f)
