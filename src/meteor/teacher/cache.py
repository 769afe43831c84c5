"""Persistent response cache for teacher/judge calls (SQLite, outside the repo and DVC outs).

Location (:func:`teacher_cache_dir`): ``teacher.cache_dir`` / ``judge.cache_dir`` when set, else
``<cache root>/teacher`` with the root from :func:`meteor.paths.cache_root` (``$METEOR_CACHE_DIR``,
else ``$XDG_CACHE_HOME/meteor``): a per-user directory outside the repo, so `dvc exp run --queue`
and `--temp` experiments, which run in a temporary copy of the repo, share the workspace's cache.

Each finished call is committed at once, so a stage killed with ``kill -9`` and re-run pays for
no finished call twice, and a warm re-run makes zero calls. The key is a SHA-256 of a canonical
JSON of everything that determines the reply: backend, endpoint identity (the resolved base_url of
an OpenAI-compatible server; the resolved revision or content hash of a local model), model,
prompt version, messages, sampling params, response format and sample index. Only the reply text
and token usage are stored; API keys are never part of the key or the row.

Racing writers (two experiments asking the same question at once): the first reply stored wins
(``INSERT OR IGNORE``) and :meth:`ResponseCache.put` returns the stored one, so every process
uses the same reply for a key and a reply a stage already used is never overwritten.

The same database keeps each stage's spend (:meth:`ResponseCache.add_spend`), so a budget can
count across re-runs of a stage (see :class:`meteor.teacher.chat.ChatTeacher`).

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

from meteor.paths import cache_root
from meteor.teacher import prompts

DB_NAME = "responses.sqlite"


def teacher_cache_dir(configured: str | Path | None = None) -> Path:
    """``configured`` (a ``cache_dir`` param) when set, else ``<cache root>/teacher``."""
    if configured:
        return Path(configured).expanduser()
    return cache_root() / "teacher"


_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    key TEXT PRIMARY KEY,
    text TEXT NOT NULL,
    usage TEXT NOT NULL,
    backend TEXT NOT NULL,
    model TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS spend (
    scope TEXT PRIMARY KEY,
    usd REAL NOT NULL,
    updated REAL NOT NULL
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
    endpoint: str | None = None,
) -> str:
    """SHA-256 of a canonical JSON (sorted keys, no whitespace) of what determines the reply.

    ``endpoint`` identifies who answers beyond the model name (a base_url, a model revision).
    ``prompt_version`` defaults to the current :data:`meteor.teacher.prompts.PROMPT_VERSION`.
    """
    payload = {
        "backend": backend,
        "endpoint": endpoint,
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
            self._conn.executescript(_SCHEMA)

    def get(self, key: str) -> CachedResponse | None:
        with self._lock:
            row = self._conn.execute(
                "SELECT text, usage FROM responses WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        return CachedResponse(text=row[0], usage=json.loads(row[1]))

    def put(self, key: str, text: str, usage: dict[str, int], *, backend: str,
            model: str) -> CachedResponse:
        """Store one reply unless the key is already stored (by another process that got there
        first), commit at once (autocommit mode), and return the reply stored for the key."""
        with self._lock:
            self._conn.execute(
                "INSERT OR IGNORE INTO responses (key, text, usage, backend, model, created) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (key, text, json.dumps(usage, sort_keys=True), backend, model, time.time()),
            )
            row = self._conn.execute(
                "SELECT text, usage FROM responses WHERE key = ?", (key,)).fetchone()
        return CachedResponse(text=row[0], usage=json.loads(row[1]))

    # --- spend ledger: USD spent per scope ("<stage>/<section>"), kept across runs
    def spent(self, scope: str) -> float:
        with self._lock:
            row = self._conn.execute("SELECT usd FROM spend WHERE scope = ?", (scope,)).fetchone()
        return float(row[0]) if row else 0.0

    def add_spend(self, scope: str, usd: float) -> None:
        """Add ``usd`` to the scope's spend, atomically (several processes may share a scope)."""
        with self._lock:
            self._conn.execute(
                "INSERT INTO spend (scope, usd, updated) VALUES (?, ?, ?) ON CONFLICT(scope) DO "
                "UPDATE SET usd = usd + excluded.usd, updated = excluded.updated",
                (scope, float(usd), time.time()))

    def clear_spend(self, scope: str) -> None:
        with self._lock:
            self._conn.execute("DELETE FROM spend WHERE scope = ?", (scope,))

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
