"""Promise 37's offline half: the suite cannot reach the network. conftest forces the hub clients' offline
switches and installs `support.network_guard`; these tests show that a hub download inside the suite ends
in saekit's named error without a single connection attempt, and that even with offline mode switched off
the guard refuses the connection before it leaves the machine."""

from __future__ import annotations

import os
import socket

import pytest
from support import network_guard

from saekit.errors import ModelNotAvailableError

MISSING = "acme-saekit-tests/not-a-model"


def test_offline_switches_are_forced():
    import huggingface_hub.constants

    assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["TRANSFORMERS_OFFLINE"] == "1"
    assert huggingface_hub.constants.HF_HUB_OFFLINE is True


@pytest.mark.parametrize("what", ["language model", "embedding model"])
def test_a_hub_load_fails_with_the_named_error_and_no_connection_attempt(what):
    from saekit.sources.models import load_embedder, load_lm

    before = len(network_guard.ATTEMPTS)
    with pytest.raises(ModelNotAvailableError, match=MISSING):
        (load_lm if what == "language model" else load_embedder)(MISSING)
    assert network_guard.ATTEMPTS[before:] == []  # offline mode answered; the guard was never needed


def test_with_offline_mode_off_the_guard_refuses_the_download(monkeypatch):
    """Offline mode leaking off (a library reading its own switch, a child of a test) would reach the hub:
    the guard refuses the lookup, the hub client reports it as a network failure, and saekit names it.
    The client's retry back-off (1+2+4+8+8 s) is skipped so the test stays a unit test."""
    import huggingface_hub.constants
    import huggingface_hub.utils._http as hub_http

    from saekit.sources.models import load_lm

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_http.time, "sleep", lambda seconds: None)
    before = len(network_guard.ATTEMPTS)
    with pytest.raises(ModelNotAvailableError, match=MISSING):
        load_lm(MISSING, revision="main")  # another cache key than the offline test's call
    attempts = network_guard.ATTEMPTS[before:]
    assert attempts and all(a == "lookup huggingface.co" for a in attempts), attempts


@pytest.mark.parametrize("host", ["huggingface.co", "8.8.8.8", "2001:4860:4860::8888"])
def test_the_guard_refuses_remote_hosts(host):
    with pytest.raises(network_guard.NetworkDisabledError, match="network disabled"):
        socket.create_connection((host, 443), timeout=1)


def test_the_guard_keeps_loopback_open():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        with socket.create_connection(("localhost", server.getsockname()[1]), timeout=5) as client:
            conn, _ = server.accept()
            client.sendall(b"ok")
            assert conn.recv(2) == b"ok"
            conn.close()


# -- tier times: reported, not asserted ------------------------------------------------------------
class _Report:
    def __init__(self, when, duration, *markers):
        self.when, self.duration, self.keywords = when, duration, {m: 1 for m in markers} | {"test_x": 1}


def test_tier_clock_sums_every_phase_by_marker_and_flags_an_over_budget_tier():
    from support.tiers import TierClock

    clock = TierClock()
    for r in [_Report("setup", 1.0), _Report("call", 50.0), _Report("teardown", 10.5),
              _Report("setup", 0.5, "slow"), _Report("call", 2.0, "slow"), _Report("setup", 3.0, "slow", "browser"),
              _Report("setup", 0.0, "gpu")]:
        clock.add(r)
    assert clock.lines() == ["browser: 1 tests, 3.0 s", "gpu: 1 tests, 0.0 s", "slow: 1 tests, 2.5 s (budget 600 s)",
                             "unit: 1 tests, 61.5 s (budget 60 s, OVER)"]
