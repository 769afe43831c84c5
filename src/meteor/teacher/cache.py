"""Persistent response cache for teacher/judge calls (SQLite, outside DVC outs).

Each finished call is committed at once, so a stage killed with ``kill -9`` and re-run pays for
no finished call twice, and a warm re-run makes zero calls. The key is a SHA-256 of a canonical
JSON of everything that determines the reply: backend, model, prompt version, messages, sampling
params, response format and sample index. Only the reply text and token usage are stored; API keys
and endpoints are never part of the key or the row.

WAL mode lets readers (another stage, a test polling progress) read while one process writes;
``synchronous=NORMAL`` keeps each commit durable against a process crash (not a power cut), at a
fraction of the cost of a full fsync per call.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meteor.teacher import prompts

DB_NAME = "responses.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    key TEXT PRIMARY KEY,
    text TEXT NOT NULL,
    usage TEXT NOT NULL,
    backend TEXT NOT NULL,
    model TEXT NOT NULL,
    created REAL NOT NULL
)
"""


def cache_key(
    *,
    backend: str,
    model: str,
    messages: list[dict],
    temperature: float,
    max_tokens: int,
    response_format: str | None = None,
    sample_index: int = 0,
    prompt_version: str | None = None,
) -> str:
    """SHA-256 of a canonical JSON (sorted keys, no whitespace) of what determines the reply.

    ``prompt_version`` defaults to the current :data:`meteor.prompts.PROMPT_VERSION`.
    """
    payload = {
        "backend": backend,
        "model": model,
        "prompt_version": prompt_version if prompt_version is not None else prompts.PROMPT_VERSION,
        "messages": messages,
        "temperature": float(temperature),
        "max_tokens": int(max_tokens),
        "response_format": response_format,
        "sample_index": int(sample_index),
    }
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class CachedResponse:
    text: str
    usage: dict[str, int]


class ResponseCache:
    """A thread-safe key -> (text, usage) store; one connection guarded by a lock."""

    def __init__(self, cache_dir: str | Path):
        self.path = Path(cache_dir) / DB_NAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        # check_same_thread=False: worker threads of the openai backend commit through the lock.
        self._conn = sqlite3.connect(self.path, timeout=30.0, check_same_thread=False,
                                     isolation_level=None)
        with self._lock:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.execute(_SCHEMA)

    def get(self, key: str) -> CachedResponse | None:
        with self._lock:
            row = self._conn.execute(
                "SELECT text, usage FROM responses WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        return CachedResponse(text=row[0], usage=json.loads(row[1]))

    def put(self, key: str, text: str, usage: dict[str, int], *, backend: str, model: str) -> None:
        """Store one reply and commit it immediately (autocommit mode)."""
        with self._lock:
            self._conn.execute(
                "INSERT OR REPLACE INTO responses (key, text, usage, backend, model, created) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (key, text, json.dumps(usage, sort_keys=True), backend, model, time.time()),
            )

    def __len__(self) -> int:
        with self._lock:
            return self._conn.execute("SELECT COUNT(*) FROM responses").fetchone()[0]

    def texts(self) -> list[str]:
        """All stored reply texts (for inspection and tests)."""
        with self._lock:
            return [r[0] for r in self._conn.execute("SELECT text FROM responses")]

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> ResponseCache:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
