"""A small OpenAI-compatible ``/v1/chat/completions`` server on loopback, with fault injection.

Used by the teacher tests and ``benchmarks/teacher_fanout.py``::

    with FakeOpenAIServer(Faults(rate_429=0.3, seed=1)) as server:
        teacher = ...base_url=server.base_url...
        server.calls  # requests received

Faults are drawn deterministically per request: from (seed, a hash of the request body, how many
times this same body was seen before). So the n-th attempt of a given request always gets the same
fate, however the client's threads interleave, and a retry of a faulted request draws afresh.

Replies: a verdict JSON when the prompt asks for ``"correct"``, a scores JSON for the criteria
listed on the prompt's ``Criteria:`` line, else an answer that echoes the question's title line
(``Answer to: <title>``) so tests can tell which item a reply belongs to. Pass ``responder`` to
reply otherwise.

Run alone (``python tests/fake_openai_server.py --latency 0.05``) it serves from its own process,
as the fan-out benchmark does; ``GET /stats`` then returns the call counts.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Faults:
    """Per-request fault rates (0..1), drawn in this order; the rest succeed."""

    latency_s: float = 0.0  # added to every request
    rate_429: float = 0.0
    retry_after: str | None = "0"  # Retry-After header value sent with 429s (None: no header)
    rate_500: float = 0.0
    rate_slow: float = 0.0  # sleep slow_s before replying (set it beyond the client's timeout)
    slow_s: float = 2.0
    rate_malformed_body: float = 0.0  # a 200 whose body is not JSON
    rate_bad_content: float = 0.0  # valid response, but the content is broken / off-schema JSON
    seed: int = 0


def make_questions(n: int, prefix: str = "Q") -> list[dict]:
    """Question records like the scrape stage's, titled ``<prefix><i> title``."""
    return [{"id": i, "category": ("ML", "DL", "NLP", "CV")[i % 4], "title": f"{prefix}{i} title",
             "question": f"How do I fix problem number {i}?", "answer": f"SECRET REFERENCE {i}"}
            for i in range(n)]


def _digest(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


def default_responder(body: dict) -> str:
    """A plausible reply for the three prompt kinds of :mod:`meteor.prompts`."""
    prompt = "\n".join(str(m.get("content", "")) for m in body["messages"] if m["role"] == "user")
    if '"correct"' in prompt:
        return json.dumps({"correct": True, "feedback": "Looks right.", "hints": []})
    criteria = re.search(r"^Criteria: (.+)$", prompt, re.M)
    if criteria:
        names = [c.strip() for c in criteria.group(1).split(",")]
        return json.dumps({"scores": {c: {"score": 7, "justification": "fine"} for c in names}})
    title = re.search(r"^Title: (.+)$", prompt, re.M)
    return f"Answer to: {title.group(1) if title else prompt[:40]}"


@dataclass
class Log:
    """What the server saw (guarded by the server's lock)."""

    calls: int = 0
    outcomes: Counter = field(default_factory=Counter)  # "ok", "429", "500", "slow", ...
    ok_titles: list[str] = field(default_factory=list)  # "Title: ..." line of each 200 answer
    requested_titles: list[str] = field(default_factory=list)
    ok_bodies: Counter = field(default_factory=Counter)  # sha256 of request body -> 200 replies
    authorizations: set[str] = field(default_factory=set)  # Authorization headers received
    bodies: list[dict] = field(default_factory=list)


class FakeOpenAIServer:
    def __init__(self, faults: Faults | None = None,
                 responder: Callable[[dict], str] = default_responder):
        self.faults = faults or Faults()
        self.responder = responder
        self.log = Log()
        self._lock = threading.Lock()
        self._seen: Counter = Counter()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    @property
    def calls(self) -> int:
        with self._lock:
            return self.log.calls

    def start(self) -> FakeOpenAIServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()

    def __enter__(self) -> FakeOpenAIServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- fault drawing
    def _fate(self, raw_body: bytes) -> str:
        digest = _digest(raw_body)
        with self._lock:
            nth = self._seen[digest]
            self._seen[digest] += 1
        rng = random.Random(f"{self.faults.seed}:{digest}:{nth}")
        f = self.faults
        x = rng.random()
        for fate, rate in (("429", f.rate_429), ("500", f.rate_500), ("slow", f.rate_slow),
                           ("malformed_body", f.rate_malformed_body),
                           ("bad_content", f.rate_bad_content)):
            if x < rate:
                return fate
            x -= rate
        return "ok"

    def _handler_class(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as real servers do
            # Headers and body go out as separate writes; without TCP_NODELAY, Nagle + delayed
            # ACK add ~40 ms to every keep-alive response.
            disable_nagle_algorithm = True

            def log_message(self, *args) -> None:  # keep test output quiet
                pass

            def _send(self, status: int, payload: bytes, headers: dict | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                try:
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout); nothing to do

            def do_GET(self) -> None:
                if self.path == "/stats":  # the call log, for a server run in another process
                    with server._lock:
                        stats = {"calls": server.log.calls, "outcomes": dict(server.log.outcomes)}
                    self._send(200, json.dumps(stats).encode())
                elif self.path in ("/health", "/v1/models"):
                    self._send(200, b'{"status": "ok", "data": []}')
                else:
                    self._send(404, b'{"error": {"message": "not found"}}')

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.path != "/v1/chat/completions":
                    with server._lock:
                        server.log.calls += 1
                        server.log.outcomes["404"] += 1
                    self._send(404, b'{"error": {"message": "not found"}}')
                    return
                body = json.loads(raw)
                fate = server._fate(raw)
                prompt = "\n".join(str(m["content"]) for m in body["messages"] if m["role"] == "user")
                title = re.search(r"^Title: .+$", prompt, re.M)
                with server._lock:
                    server.log.calls += 1
                    server.log.outcomes[fate] += 1
                    server.log.bodies.append(body)
                    server.log.authorizations.add(self.headers.get("Authorization", ""))
                    if title:
                        server.log.requested_titles.append(title.group(0))
                if server.faults.latency_s:
                    time.sleep(server.faults.latency_s)
                if fate == "429":
                    headers = {} if server.faults.retry_after is None else {
                        "Retry-After": server.faults.retry_after}
                    self._send(429, b'{"error": {"message": "rate limited", "type": "rate_limit"}}',
                               headers)
                    return
                if fate == "500":
                    self._send(500, b'{"error": {"message": "internal error"}}')
                    return
                if fate == "slow":
                    time.sleep(server.faults.slow_s)
                if fate == "malformed_body":
                    self._send(200, b'{"id": "x", "choices": [ this is not json')
                    return
                content = server.responder(body)
                if fate == "bad_content":
                    content = 'Sure! {"correct": "maybe", "scores": 3' if '{' in content else ""
                completion_tokens = max(1, len(content.split()))
                reply = {
                    "id": "chatcmpl-fake",
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": body.get("model", "fake"),
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": content}}],
                    "usage": {"prompt_tokens": max(1, len(prompt.split())),
                              "completion_tokens": completion_tokens,
                              "total_tokens": max(1, len(prompt.split())) + completion_tokens},
                }
                if fate == "ok":
                    with server._lock:
                        server.log.ok_bodies[_digest(raw)] += 1
                        if title and not content.startswith("{"):
                            server.log.ok_titles.append(title.group(0))
                self._send(200, json.dumps(reply).encode())

        return Handler


def main() -> None:
    """Serve in the foreground (``python tests/fake_openai_server.py --latency 0.05``): prints the
    base URL on the first line; ``GET /stats`` returns the call counts. Stop it with a signal."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(description="fake OpenAI-compatible server on loopback")
    parser.add_argument("--latency", type=float, default=0.0)
    args = parser.parse_args()
    server = FakeOpenAIServer(Faults(latency_s=args.latency))
    print(server.base_url, flush=True)
    sys.stdout.close()
    server._httpd.serve_forever()


if __name__ == "__main__":
    main()
