"""Atomic, checksummed persistence: safetensors for tensors, strict JSON for everything else.

Why: a half-written file must never replace a good one, and a damaged file must be named, not
half-loaded. Every write goes to a temporary sibling, is fsynced, then renamed into place;
folders are built beside their final name and renamed in one step. Nothing here unpickles.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import io
import json
import logging
import math
import os
import sys
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from saekit.direct_write import MIN_SIZE as DIRECT_MIN_SIZE
from saekit.direct_write import DirectFile
from saekit.errors import CorruptArtifactError

FORMAT_VERSION = 1
MANIFEST = "saekit_manifest.json"

log = logging.getLogger(__name__)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# fsync on a directory is refused by some platforms and file systems (Windows, some network
# mounts); that means "no directory durability here", not a failed write. Anything else is real.
_DIR_FSYNC_UNSUPPORTED = {errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF, errno.EACCES}


def _fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable; an I/O error propagates (a silent one loses data)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        if e.errno in _DIR_FSYNC_UNSUPPORTED:
            log.debug("%s: directories cannot be opened for fsync here (%s)", path, e)
            return
        raise
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in _DIR_FSYNC_UNSUPPORTED:
            raise
        log.debug("%s: directory fsync is not supported here (%s)", path, e)
    finally:
        os.close(fd)


def _remove_tree(path: Path) -> None:
    """Remove a leftover folder; a failure is logged, not raised, because the write it belonged
    to already succeeded or already failed with its own error, and `clean_stale_tmp` retries."""
    def report(_func, failed, exc_info) -> None:
        log.warning("could not remove leftover %s (%s); it will be retried by the next write", failed, exc_info[1])

    shutil.rmtree(path, onerror=report)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see either the old file or the whole new one."""
    atomic_write_chunks(path, (data,))


def atomic_write_png(fig, path: str | Path, dpi: float | None = None) -> Path:
    """A matplotlib figure laid out (`tight_layout`) and written as PNG through `atomic_write_bytes`, so
    a plot is never half-written either. Closing a pyplot figure stays the caller's business."""
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", **({} if dpi is None else {"dpi": dpi}))
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def atomic_write_chunks(path: str | Path, chunks: Iterable[bytes], direct: bool = False) -> str:
    """Write what `chunks` yields to `path` (never all in memory at once) through a temporary file that
    is fsynced and then renamed, so readers see either the old file or the whole new one; returns the
    sha256 of everything written. `direct`: past the page cache where the system allows it (large
    files: see saekit.direct_write)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    h = hashlib.sha256()
    try:
        with (DirectFile(tmp) if direct else open(tmp, "wb")) as f:
            for chunk in chunks:
                h.update(chunk)
                f.write(chunk)
            if not direct:  # DirectFile flushes and fsyncs as it closes
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)
    return h.hexdigest()


def to_strict_json(obj: Any) -> Any:
    """Replace NaN/inf by None and tensors/numpy scalars by Python numbers, recursively."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): to_strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_strict_json(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return to_strict_json(obj.tolist())
    if hasattr(obj, "item") and hasattr(obj, "dtype"):  # numpy scalar
        return to_strict_json(obj.item())
    if hasattr(obj, "tolist") and hasattr(obj, "dtype"):  # numpy array
        return to_strict_json(obj.tolist())
    if isinstance(obj, Path):
        return str(obj)
    return obj


def dumps_json(obj: Any, indent: int | None = 2) -> str:
    """Strict JSON (no NaN/Infinity), so every report parses everywhere."""
    return json.dumps(to_strict_json(obj), indent=indent, allow_nan=False, sort_keys=False)


def atomic_write_json(path: str | Path, obj: Any) -> str:
    """Strict JSON written atomically; returns its sha256 (for a manifest)."""
    return atomic_write_chunks(path, ((dumps_json(obj) + "\n").encode(),))


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CorruptArtifactError(f"{path}: not valid JSON ({e})") from e
    except UnicodeDecodeError as e:
        raise CorruptArtifactError(f"{path}: not UTF-8 text ({e})") from e


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
    """Atomically write a safetensors file (the `safetensors` library's bytes); returns its sha256 (for a
    manifest), taken while the file is written. `write_tensors` writes large files without the copy."""
    data = st_save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)
    return atomic_write_chunks(path, (data,))


ST_DTYPES = {torch.float32: "F32", torch.float64: "F64", torch.bfloat16: "BF16", torch.float16: "F16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}


def write_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
    """Write a safetensors file straight from the tensors' memory and return its sha256.

    Why not `save_tensors`: it builds the whole file as one bytes object (a copy of every tensor) before
    writing; for a ~100 MB checkpoint or an SAE's weights that copy and its fresh pages cost more than the
    write. Same format (8-byte header length, JSON header padded to 8 bytes, raw little-endian data,
    tensors in the order given), same atomic fsync'd write, hashed once while written; files of 8 MB
    and more go past the page cache (saekit.direct_write)."""
    flat = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    if sys.byteorder != "little" or any(t.dtype not in ST_DTYPES for t in flat.values()):
        return save_tensors(path, flat, metadata)
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, t in flat.items():
        n = t.numel() * t.element_size()
        header[name] = {"dtype": ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)

    def chunks() -> Iterator[bytes | memoryview]:
        yield len(head).to_bytes(8, "little") + head
        for t in flat.values():
            if t.numel():
                yield memoryview(t.reshape(-1).view(torch.uint8).numpy())
    return atomic_write_chunks(path, chunks(), direct=offset >= DIRECT_MIN_SIZE)


def load_tensors(path: str | Path, expected_sha256: str | None = None) -> dict[str, torch.Tensor]:
    """Read a whole safetensors file, checking its sha256 first when one is given."""
    path = Path(path)
    if not path.exists():
        raise CorruptArtifactError(f"{path}: file is missing")
    data = path.read_bytes()
    if expected_sha256 is not None and sha256_bytes(data) != expected_sha256:
        raise CorruptArtifactError(
            f"{path}: sha256 mismatch (expected {expected_sha256[:12]}…, found {sha256_bytes(data)[:12]}…); "
            "the file was truncated or altered"
        )
    try:
        return st_load(data)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise CorruptArtifactError(f"{path}: not a readable safetensors file ({e})") from e


def write_manifest(folder: str | Path, files: list[str], extra: dict | None = None,
                   hashes: dict[str, str] | None = None) -> None:
    """Record the sha256 of `files` (relative names) in the folder's manifest, written last. `hashes`:
    digests taken while the files were written (`write_tensors`, `atomic_write_chunks` return them), so
    large files are not read back; a file without one is read and hashed."""
    folder, hashes = Path(folder), hashes or {}
    entry = {"format_version": FORMAT_VERSION, "files": {f: hashes.get(f) or sha256_file(folder / f) for f in files}}
    entry.update(extra or {})
    atomic_write_json(folder / MANIFEST, entry)


def inside(folder: str | Path, name: object, listed_in: str) -> Path:
    """`folder / name` for a file name read from an artifact (`listed_in` says where), refusing one
    that would leave the folder (absolute, `..`, empty): a damaged or crafted manifest must not make
    saekit read or map files elsewhere. Lexical, so a folder reached through a symlink still works."""
    if not isinstance(name, str) or not name.strip() or "\0" in name:
        raise CorruptArtifactError(f"{listed_in}: expected a file name inside {folder}, found {name!r}")
    norm = os.path.normpath(name)
    if os.path.isabs(name) or norm == ".." or norm.startswith(".." + os.sep) or norm == ".":
        raise CorruptArtifactError(f"{listed_in}: the file name {name!r} leaves its folder {folder}; "
                                   f"expected a name inside it (the artifact is damaged or crafted)")
    return Path(folder) / norm


def verify_manifest(folder: str | Path) -> dict:
    """Check every file listed in the folder's manifest; raise naming the first damaged one."""
    folder = Path(folder)
    recover_replaced_dir(folder)
    mpath = folder / MANIFEST
    if not mpath.exists():
        return {}
    manifest = read_json(mpath)
    for name, digest in manifest.get("files", {}).items():
        f = inside(folder, name, str(mpath))
        if not f.exists():
            raise CorruptArtifactError(f"{f}: listed in {MANIFEST} but missing")
        if sha256_file(f) != digest:
            raise CorruptArtifactError(f"{f}: sha256 mismatch with {MANIFEST}; the file was truncated or altered")
    return manifest


def _old_sibling(final: Path) -> Path:
    """Where an overwritten folder waits while its replacement moves in (fixed name, so a
    reader or the next write can find and restore it after a kill)."""
    return final.with_name(f".{final.name}.old")


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing folders in one system call (Linux renameat2 RENAME_EXCHANGE).

    Returns False where the kernel, libc or file system cannot do it; the caller then falls back
    to two renames, whose gap `recover_replaced_dir` repairs."""
    if not sys.platform.startswith("linux"):
        return False
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, f"could not swap {a} and {b}: {os.strerror(err)}")


def recover_replaced_dir(final: str | Path) -> None:
    """Repair what a kill in the middle of replacing `final` left behind.

    The fallback replacement renames `final` to `.<name>.old`, then the new folder to `final`.
    A kill between the two leaves only `.old`: it is the last complete version, so it is renamed
    back. A `.old` next to an existing `final` is a finished replacement's leftover: removed.
    Called by every `atomic_dir`, by `clean_stale_tmp` and by `verify_manifest`."""
    final = Path(final)
    old = _old_sibling(final)
    if not old.exists():
        return
    if final.exists():
        _remove_tree(old)
    else:
        log.warning("%s: restoring the previous version from %s (a replacement was interrupted)", final, old.name)
        os.replace(old, final)
        _fsync_dir(final.parent)


def _replace_dir(tmp: Path, final: Path) -> None:
    """Put the finished folder `tmp` at `final`, which exists: so that a kill at any instant
    leaves a complete `final` (swap), or a `.old` that `recover_replaced_dir` restores."""
    if _exchange(tmp, final):
        _fsync_dir(final.parent)
        _remove_tree(tmp)  # now holds the previous version
        return
    old = _old_sibling(final)
    os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    _remove_tree(old)


@contextlib.contextmanager
def atomic_dir(final: str | Path, overwrite: bool = True) -> Iterator[Path]:
    """Build a folder beside `final` and move it into place when the body succeeds.

    If the body raises (or the process dies) the previous folder, if any, is untouched and the
    half-built one is removed (or left as an ignorable `.tmp` sibling after a hard kill). An
    existing `final` is swapped atomically where the system can; elsewhere a kill between the two
    renames leaves `.<name>.old`, which the next write or load restores.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    recover_replaced_dir(final)
    tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.mkdir()
    try:
        yield tmp
        _fsync_dir(tmp)
        if final.exists():
            if not overwrite:
                raise FileExistsError(f"{final} exists")
            _replace_dir(tmp, final)
        else:
            os.replace(tmp, final)
            _fsync_dir(final.parent)
    finally:
        if tmp.exists():
            _remove_tree(tmp)


def clean_stale_tmp(folder: str | Path) -> None:
    """Remove `.tmp` leftovers of writes that a hard kill interrupted, and restore or remove
    the `.old` folders of interrupted replacements."""
    folder = Path(folder)
    if not folder.exists():
        return
    for p in folder.glob(".*.tmp"):
        if p.is_dir():
            _remove_tree(p)
        else:
            p.unlink(missing_ok=True)
    for old in folder.glob(".*.old"):
        recover_replaced_dir(folder / old.name[1:-len(".old")])
