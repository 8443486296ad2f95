"""Memory-map the tensors of a safetensors file with numpy, without reading them.

Why: the activation store and the browser bundle both serve random rows out of files much larger
than a batch; mapping them lets the page cache do the work and keeps opening a file free. The
header is parsed by hand (the format is 8 bytes of header length, a JSON header, then raw data) so
every way a file can be short or garbled raises the caller's error naming the file. numpy only: the
browser's reading path does not need torch.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from saekit.errors import CorruptArtifactError

NUMPY_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I64": np.int64, "I32": np.int32,
                "F64": np.float64, "U8": np.uint8}
"""safetensors dtype -> numpy dtype; bfloat16 has no numpy type and comes back as its raw uint16 bits."""


def memmap_safetensors(path: Path, error: type[Exception] = CorruptArtifactError) -> dict[str, tuple[np.ndarray, str]]:
    """`{name: (array, safetensors dtype)}` for every tensor in `path`; raises `error` naming the file
    when the header is short, unreadable, names an unknown dtype, or points past the end of the file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise error(f"{path}: truncated (no safetensors header)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise error(f"{path}: truncated (header says {n} bytes, file has {size - 8})")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise error(f"{path}: unreadable safetensors header ({e})") from e
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        if 8 + n + end > size:
            raise error(f"{path}: truncated (tensor '{name}' ends past the end of the file)")
        if info["dtype"] not in NUMPY_DTYPES:
            raise error(f"{path}: tensor '{name}' has dtype {info['dtype']}, expected one of {sorted(NUMPY_DTYPES)}")
        dtype, shape = NUMPY_DTYPES[info["dtype"]], tuple(info["shape"])
        arr = np.zeros(shape, dtype) if end == start else np.memmap(path, dtype, "r", offset=8 + n + start, shape=shape)
        out[name] = (arr, info["dtype"])
    return out
