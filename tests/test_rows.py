"""Row subsets (meteor.rows.balanced_head) against a plain reference."""

from __future__ import annotations

import random

import pytest

from meteor.rows import balanced_head


def grouped_rows(sizes: dict[str, int]) -> list[dict]:
    """Rows grouped by category, as the splits are (every ML row first, then DL, ...)."""
    return [{"id": f"{c}{i}", "category": c} for c, n in sizes.items() for i in range(n)]


def reference_head(rows: list[dict], limit: int) -> list[dict]:
    """Round k takes the k-th row of every category that still has one, until limit rows."""
    categories = list(dict.fromkeys(r["category"] for r in rows))
    by_category = {c: [r for r in rows if r["category"] == c] for c in categories}
    chosen, k = [], 0
    while len(chosen) < min(limit, len(rows)):
        for c in categories:
            if k < len(by_category[c]) and len(chosen) < limit:
                chosen.append(by_category[c][k]["id"])
        k += 1
    return [r for r in rows if r["id"] in chosen]


def test_a_small_head_of_grouped_rows_keeps_every_category():
    rows = grouped_rows({"ML": 10, "DL": 10, "NLP": 10, "CV": 10})
    head = balanced_head(rows, 8)
    assert [r["id"] for r in head] == ["ML0", "ML1", "DL0", "DL1", "NLP0", "NLP1", "CV0", "CV1"]
    assert rows[:8] == [r for r in rows if r["category"] == "ML"][:8]  # what a plain head gives


def test_uneven_categories_are_filled_from_those_with_rows_left():
    rows = grouped_rows({"ML": 5, "DL": 1, "NLP": 0, "CV": 3})
    head = balanced_head(rows, 7)
    assert [r["id"] for r in head] == ["ML0", "ML1", "ML2", "DL0", "CV0", "CV1", "CV2"]


def test_none_or_a_large_limit_keeps_every_row_in_order():
    rows = grouped_rows({"ML": 3, "DL": 2})
    assert balanced_head(rows, None) == rows
    assert balanced_head(rows, 99) == rows
    assert balanced_head(iter(rows), 5) == rows  # any iterable


@pytest.mark.parametrize("seed", range(20))
def test_matches_the_reference_on_random_interleavings(seed):
    rng = random.Random(seed)
    rows = [{"id": i, "category": rng.choice("ABCD")} for i in range(rng.randint(0, 40))]
    limit = rng.randint(1, 45)
    head = balanced_head(rows, limit)
    assert head == reference_head(rows, limit)
    assert len(head) == min(limit, len(rows))
    counts = [sum(r["category"] == c for r in head) for c in "ABCD"]
    available = [sum(r["category"] == c for r in rows) for c in "ABCD"]
    # no category gets two more than another unless the other has run out
    for a, n_a in zip(counts, available):
        for b in counts:
            assert a >= b - 1 or a == n_a
