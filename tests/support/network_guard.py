"""The test session's network guard (docs/RELIABILITY.md 37): the suite runs offline by construction.

Offline mode alone is a promise the libraries keep; this guard is what the suite itself enforces. Every
Python-level connection or name lookup to a host that is not this machine is refused with
`NetworkDisabledError` (an `OSError`, so a client reports it as the network failure it would be) and
recorded in `ATTEMPTS`, which tests read to prove that a code path never even tried. Loopback
(127.0.0.0/8, ::1, localhost) and Unix sockets stay open: the Streamlit, judge-server and gloo tests use
them. Child processes do not inherit the guard; they inherit HF_HUB_OFFLINE=1 and TRANSFORMERS_OFFLINE=1."""

from __future__ import annotations

import ipaddress
import socket

ATTEMPTS: list[str] = []
_LOCAL_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", ""}


class NetworkDisabledError(ConnectionRefusedError):
    """A test tried to reach a host other than this machine."""


def is_local(host) -> bool:
    host = (host.decode() if isinstance(host, bytes) else str(host)).strip("[]").lower()
    if host in _LOCAL_NAMES:
        return True
    try:
        ip = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return False
    return ip.is_loopback or ip.is_unspecified


def _refuse(what: str, host) -> None:
    ATTEMPTS.append(f"{what} {host}")
    raise NetworkDisabledError(f"network disabled in the test suite: {what} {host!r} refused "
                               "(expected loopback only; see tests/support/network_guard.py)")


def install() -> None:
    """Patch `socket.socket.connect`/`connect_ex` and `socket.getaddrinfo` (idempotent)."""
    if getattr(socket, "_saekit_guarded", False):
        return
    real_connect, real_connect_ex, real_getaddrinfo = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo

    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and not is_local(address[0]):
            _refuse("connect", address[0])
        return real_connect(self, address)

    def connect_ex(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and not is_local(address[0]):
            _refuse("connect", address[0])
        return real_connect_ex(self, address)

    def getaddrinfo(host, *args, **kwargs):
        if host is not None and not is_local(host):
            _refuse("lookup", host)
        return real_getaddrinfo(host, *args, **kwargs)

    socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo = connect, connect_ex, getaddrinfo
    socket._saekit_guarded = True
