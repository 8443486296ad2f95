"""A test judge speaking the OpenAI chat-completions shape on 127.0.0.1, started and stopped by the test.

It answers deterministically: a judge prompt (`saekit.analysis.explain.llm.judge_messages`) gets one
vote per numbered example, 1 when the example contains one of the explanation's quoted terms (detection)
or when a marked <<token>> is one of them (fuzzing); an explain prompt gets the most frequent marked
token, quoted. Scripted faults come first (`faults`: "429" answers Too Many Requests with Retry-After 0,
"503" a server error, "slow" sleeps past the client's timeout), and the server refuses to answer more
than `max_requests` requests, so a runaway client fails the test instead of hanging it.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

WORD = r"(?<!\w){}(?!\w)"


def keyword_votes(content: str) -> list[int]:
    expl = re.search(r"^Feature explanation: (.*)$", content, re.M).group(1)
    task = re.search(r"^Task: (\w+)$", content, re.M).group(1)
    terms = [t.lower() for t in re.findall(r'"([^"]+)"', expl)]
    examples = re.findall(r"^\d+\. (.*)$", content.split("\nExamples:\n", 1)[1], re.M)
    if task == "fuzzing":
        words = {w for t in terms for w in t.split()}
        return [int(any(m.strip().lower() in words for m in re.findall(r"<<(.*?)>>", ex))) for ex in examples]
    return [int(any(re.search(WORD.format(re.escape(t)), ex.lower()) for t in terms)) for ex in examples]


def explain_answer(content: str) -> str:
    marked = Counter(m.strip().lower() for m in re.findall(r"<<(.*?)>>", content) if m.strip())
    return ", ".join(f'"{w}"' for w, _ in marked.most_common(2)) or "nothing in particular"


class JudgeServer:
    def __init__(self, faults: list[str] | None = None, max_requests: int = 500, slow_s: float = 2.0,
                 delay_s: float = 0.0):
        self.faults, self.max_requests, self.slow_s, self.delay_s = list(faults or []), max_requests, slow_s, delay_s
        self.in_flight = self.max_in_flight = 0
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append(body)
                    server.headers.append(dict(self.headers))
                    n = len(server.requests)
                    fault = server.faults.pop(0) if server.faults else None
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    self._answer(body, n, fault)
                finally:
                    with server.lock:
                        server.in_flight -= 1

            def _answer(self, body, n, fault):
                if n > server.max_requests:
                    return self._send(400, {"error": "request bound exceeded"})
                if fault == "429":
                    return self._send(429, {"error": "slow down"}, {"Retry-After": "0"})
                if fault == "503":
                    return self._send(503, {"error": "unavailable"})
                if fault == "slow":
                    time.sleep(server.slow_s)
                time.sleep(server.delay_s)
                content = body["messages"][-1]["content"]
                text = json.dumps(keyword_votes(content)) if content.startswith("Feature explanation:") \
                    else explain_answer(content)
                self._send(200, {"choices": [{"message": {"role": "assistant", "content": text}}],
                                 "usage": {"prompt_tokens": len(content.split()), "completion_tokens": len(text.split())}})

            def _send(self, code, obj, headers=None):
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                try:
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self) -> "JudgeServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)
