"""Prompts and responses cached on disk by content hash: a re-run sends zero requests, an interrupted
run resumes where it stopped.

The key is the sha256 of the backend's identity (endpoint and model, never the key), the messages and
the generation parameters; each entry is one strict-JSON file written atomically
(`<cache>/<2 hex>/<sha256>.json`), so a kill mid-write leaves either no entry or a whole one.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from saekit.analysis.explain.protocol import Usage
from saekit.artifacts import atomic_write_json, dumps_json


@dataclass
class ChatResult:
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0


class ChatBackend(Protocol):
    """One chat completion per call. `identity` names what answers (endpoint + model), for the cache."""

    name: str
    identity: dict

    def complete(self, messages: list[dict]) -> ChatResult: ...


def cache_key(identity: dict, messages: list[dict]) -> str:
    return hashlib.sha256(dumps_json({"backend": identity, "messages": messages}, indent=None).encode()).hexdigest()


class ChatCache:
    """The on-disk store of responses by content hash."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def _path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict | None:
        p = self._path(key)
        if not p.exists():
            return None
        try:
            return json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):  # a damaged entry is asked again, not trusted
            return None

    def put(self, key: str, entry: dict) -> None:
        atomic_write_json(self._path(key), entry)


class CachedChat:
    """A chat backend behind the cache; counts what it sent and what it found (thread-safe)."""

    def __init__(self, backend: ChatBackend, cache: ChatCache):
        self.backend, self.cache = backend, cache
        self.name, self.identity = backend.name, backend.identity
        self.sent = 0
        self.hits = 0
        self._lock = threading.Lock()

    def complete(self, messages: list[dict]) -> tuple[ChatResult, Usage]:
        key = cache_key(self.identity, messages)
        hit = self.cache.get(key)
        if hit is not None:
            with self._lock:
                self.hits += 1
            return ChatResult(hit["text"], hit["prompt_tokens"], hit["completion_tokens"]), Usage(
                cached=1, prompt_tokens=hit["prompt_tokens"], completion_tokens=hit["completion_tokens"])
        t0 = time.perf_counter()
        res = self.backend.complete(messages)
        seconds = time.perf_counter() - t0
        self.cache.put(key, {"backend": self.identity, "messages": messages, "text": res.text,
                             "prompt_tokens": res.prompt_tokens, "completion_tokens": res.completion_tokens,
                             "seconds": round(seconds, 4)})
        with self._lock:
            self.sent += 1
        return res, Usage(requests=1, prompt_tokens=res.prompt_tokens, completion_tokens=res.completion_tokens,
                          seconds=seconds)
