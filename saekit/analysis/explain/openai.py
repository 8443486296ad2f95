"""Any OpenAI-compatible chat-completions endpoint, through the standard library (no new dependency).

Base URL, model and the name of the environment variable that holds the key come from the config;
the key itself is read from the environment at request time and never stored on the object's
identity, in the cache or in any file. Requests go through a rate limiter (minimum spacing between
starts), a concurrency cap (a semaphore), and retries with exponential backoff on 429, 5xx, timeouts
and refused connections (a `Retry-After` header wins over the backoff).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import urllib.error
import urllib.request

from saekit.analysis.explain.cache import ChatResult
from saekit.errors import ChatBackendError

log = logging.getLogger(__name__)
RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


class RateLimiter:
    """At most `per_minute` request starts per minute, spaced evenly (thread-safe)."""

    def __init__(self, per_minute: float):
        self.interval = 60.0 / per_minute
        self.next_start = 0.0
        self.lock = threading.Lock()

    def wait(self) -> None:
        with self.lock:
            now = time.monotonic()
            start = max(now, self.next_start)
            self.next_start = start + self.interval
        if start > now:
            time.sleep(start - now)


class OpenAIChat:
    """Chat completions from `base_url` (`.../v1`) with `model`; the key from `$api_key_env` (optional:
    local servers often need none)."""

    name = "openai"

    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY", *,
                 requests_per_minute: float = 60.0, concurrency: int = 4, retries: int = 5,
                 timeout_s: float = 60.0, backoff_s: float = 1.0, max_tokens: int = 120):
        if not model:
            raise ChatBackendError("openai backend: expected a model name (explain.model / --model), found none")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.api_key_env, self.max_tokens = model, api_key_env, max_tokens
        self.retries, self.timeout_s, self.backoff_s = retries, timeout_s, backoff_s
        self.limiter = RateLimiter(requests_per_minute)
        self.slots = threading.BoundedSemaphore(concurrency)
        self.identity = {"kind": "openai", "url": self.url, "model": model, "max_tokens": max_tokens, "temperature": 0}

    def _request(self, messages: list[dict]) -> urllib.request.Request:
        body = json.dumps({"model": self.model, "messages": messages, "max_tokens": self.max_tokens,
                           "temperature": 0}).encode()
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env, "")
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return urllib.request.Request(self.url, data=body, headers=headers, method="POST")

    def complete(self, messages: list[dict]) -> ChatResult:
        last = ""
        for attempt in range(self.retries + 1):
            self.limiter.wait()
            try:
                with self.slots, urllib.request.urlopen(self._request(messages), timeout=self.timeout_s) as resp:
                    return parse_completion(json.loads(resp.read()), self.url)
            except urllib.error.HTTPError as e:
                if e.code not in RETRY_STATUS:
                    raise ChatBackendError(f"{self.url}: expected a chat completion, found HTTP {e.code} "
                                           f"({e.read()[:200].decode(errors='replace')})") from e
                last, wait = f"HTTP {e.code}", _retry_after(e) or self.backoff_s * 2 ** attempt
            except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError) as e:
                last, wait = f"{type(e).__name__}: {getattr(e, 'reason', e)}", self.backoff_s * 2 ** attempt
            if attempt < self.retries:
                log.info("%s: %s, retry %d/%d in %.2f s", self.url, last, attempt + 1, self.retries, wait)
                time.sleep(wait)
        raise ChatBackendError(f"{self.url}: no answer after {self.retries + 1} attempts (last: {last})")


def _retry_after(e: urllib.error.HTTPError) -> float | None:
    value = e.headers.get("Retry-After") if e.headers else None
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def parse_completion(data: dict, url: str) -> ChatResult:
    """The first choice's text and the usage counts of a chat-completions response."""
    try:
        text = data["choices"][0]["message"]["content"] or ""
    except (KeyError, IndexError, TypeError) as e:
        raise ChatBackendError(f"{url}: expected choices[0].message.content, found {str(data)[:200]}") from e
    usage = data.get("usage") or {}
    return ChatResult(text, int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0)))
