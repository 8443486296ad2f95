"""Large files written past the page cache (O_DIRECT): checkpoints and SAE weights.

Why: writing through the page cache costs system CPU for every fresh page-cache page; on the
development VMs that was ~1-3 ms per MB, as much as hashing the data, and most of a 100 MB final
checkpoint's cost. With O_DIRECT the bytes go from a reused, page-aligned bounce buffer straight to the
device. Where the platform or the file system refuses O_DIRECT (tmpfs, some network or overlay mounts,
non-Linux), or refuses a write midway, the rest goes through the page cache: the same bytes, and the
caller's fsync makes either durable. Only `artifacts.atomic_write_chunks(direct=True)` uses this.
"""

from __future__ import annotations

import errno
import mmap
import os
import threading
from pathlib import Path

ALIGN = 4096  # O_DIRECT: buffer addresses, file offsets and lengths are multiples of the block size
BUFFER = 1 << 22  # bounce buffer (4 MB, page-aligned: an anonymous mmap)
MIN_SIZE = 1 << 23  # smaller files go through the page cache: there it costs little
_REFUSED = {errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP}  # "not here", not a failed write
_free: list[mmap.mmap] = []  # bounce buffers kept for the next file (one per concurrent writer)
_lock = threading.Lock()


def _take() -> mmap.mmap:
    with _lock:
        return _free.pop() if _free else mmap.mmap(-1, BUFFER)


def _give(buf: mmap.mmap) -> None:
    with _lock:
        if len(_free) < 4:
            _free.append(buf)
            return
    buf.close()


class DirectFile:
    """A new file written sequentially: O_DIRECT through a bounce buffer where the system allows it,
    plain writes otherwise (or from the first refused write on). `close()` writes the padded tail, cuts
    the file to its real size and fsyncs it. Use as a context manager."""

    def __init__(self, path: str | Path):
        self.path, self.size, self.fill = Path(path), 0, 0
        self.buf: mmap.mmap | None = None
        self.fd = -1
        if hasattr(os, "O_DIRECT"):
            try:
                self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o666)
                self.buf = _take()
            except OSError as e:
                if e.errno not in _REFUSED:
                    raise
        if self.fd < 0:
            self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)

    @property
    def direct(self) -> bool:
        return self.buf is not None

    def write(self, data) -> None:
        mv = memoryview(data).cast("B")
        self.size += mv.nbytes
        if not self.direct:
            _write_all(self.fd, mv)
            return
        while mv.nbytes:
            n = min(BUFFER - self.fill, mv.nbytes)
            self.buf[self.fill: self.fill + n] = mv[:n]
            self.fill, mv = self.fill + n, mv[n:]
            if self.fill == BUFFER:
                self._flush(BUFFER)
                if not self.direct:  # refused midway: the rest through the page cache
                    _write_all(self.fd, mv)
                    return

    def _flush(self, n: int) -> None:
        """Write the first `n` bytes of the bounce buffer (n a multiple of ALIGN) and empty it."""
        view = memoryview(self.buf)[:n]
        done = 0
        try:
            while done < n:
                done += os.write(self.fd, view[done:])
        except OSError as e:
            if e.errno not in _REFUSED:
                raise
            self._plain_from_here(view[done:])
        finally:
            view.release()
        self.fill = 0

    def _plain_from_here(self, rest: memoryview) -> None:
        """O_DIRECT refused midway: reopen without it, at the same offset, and write the rest plainly."""
        offset = os.lseek(self.fd, 0, os.SEEK_CUR)
        fd = os.open(self.path, os.O_WRONLY)
        os.lseek(fd, offset, os.SEEK_SET)
        os.close(self.fd)
        self.fd = fd
        _write_all(fd, rest)
        self._release()

    def _release(self) -> None:
        if self.buf is not None:
            buf, self.buf = self.buf, None
            _give(buf)

    def close(self) -> None:
        """Write the tail (padded to ALIGN under O_DIRECT), cut the file to its size, fsync, close."""
        try:
            if self.direct and self.fill:
                tail = -(-self.fill // ALIGN) * ALIGN
                self.buf[self.fill: tail] = bytes(tail - self.fill)
                self._flush(tail)
            os.ftruncate(self.fd, self.size)
            os.fsync(self.fd)
        finally:
            os.close(self.fd)
            self._release()

    def __enter__(self) -> "DirectFile":
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            self.close()
            return
        os.close(self.fd)  # the caller removes the half-written file
        self._release()


def _write_all(fd: int, mv: memoryview) -> None:
    while mv.nbytes:
        mv = mv[os.write(fd, mv):]
