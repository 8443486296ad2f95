"""The process environment a training run lives in: deterministic kernels, and SIGINT/SIGTERM turned into
"checkpoint and stop". Apart from the loop (saekit.train.loop) because both change process-wide state and
must restore it, whatever the loop does."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator

import torch

log = logging.getLogger(__name__)


@contextlib.contextmanager
def deterministic(on: bool, warn_only: bool = False) -> Iterator[None]:
    """Deterministic kernels while training. On accelerators some kernels have no deterministic
    version (and cuBLAS needs CUBLAS_WORKSPACE_CONFIG): there they only warn instead of raising.

    Deterministic mode also NaN-fills every fresh `torch.empty` (`fill_uninitialized_memory`, a
    debugging aid: reads of uninitialised memory become reproducible). Training never reads memory it
    did not write, and the fill is a write pass over every new gradient and kernel output (~2.4 ms per
    16 MB here, several per step), so it is off while training; results are the same bit for bit."""
    before, before_warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    fill_before = torch.utils.deterministic.fill_uninitialized_memory
    if on:
        torch.use_deterministic_algorithms(True, warn_only=warn_only)
        torch.utils.deterministic.fill_uninitialized_memory = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=before_warn)
        torch.utils.deterministic.fill_uninitialized_memory = fill_before


class StopSignals:
    """SIGINT/SIGTERM set `signum` (the loop checkpoints and stops); a second signal aborts at once.
    The previous handlers are restored on exit. Outside the main thread nothing is installed."""

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.signum:
            raise KeyboardInterrupt(f"second signal {signum}: aborting without a checkpoint")
        self.signum = signum
        log.warning("signal %d received: finishing the current step and writing a checkpoint "
                    "(send it again to abort at once)", signum)

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
