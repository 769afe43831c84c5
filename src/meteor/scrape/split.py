"""Deterministic train/dev/test split by a salted hash of the question id.

Each id lands in a fixed point of [0, 1); test takes [0, test), dev [test, test + dev), train the
rest. A row's split depends only on its own id, the salt and the two fractions, so adding or
removing other rows never moves it. Changing a fraction does move rows: growing ``dev`` moves rows
from train into dev only, but growing ``test`` also shifts the dev interval, so rows move from dev
into test and from train into dev (shrinking either does the reverse). Treat a new split as new
data: every stage after scrape runs again.
"""

from __future__ import annotations

import hashlib

SPLITS = ("train", "dev", "test")


def unit_interval(question_id: int, salt: str) -> float:
    digest = hashlib.sha256(f"{salt}:{question_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign_split(question_id: int, *, dev: float, test: float, salt: str) -> str:
    u = unit_interval(question_id, salt)
    if u < test:
        return "test"
    if u < test + dev:
        return "dev"
    return "train"
