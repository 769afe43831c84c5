"""Stage rows: joined back to their questions by the stable Stack Overflow ``id``, and subsets
that keep every category."""

from __future__ import annotations

from collections.abc import Sequence


def join_to_questions(rows: Sequence[dict], questions: Sequence[dict], *, what: str,
                      rerun: str) -> list[tuple[dict, dict]]:
    """Pair each row with the question record of the same ``id``, in the rows' order.

    A question without an id, a duplicate question id, or a row naming an unknown id is an error
    that says which stage to re-run (``rerun``); ``what`` names the rows in messages.
    """
    by_id: dict = {}
    for i, question in enumerate(questions):
        if "id" not in question:
            raise ValueError(f"train row {i} has no 'id'")
        if question["id"] in by_id:
            raise ValueError(f"train split has duplicate question id {question['id']!r}")
        by_id[question["id"]] = question
    unknown = [r.get("id") for r in rows if r.get("id") not in by_id]
    if unknown:
        raise ValueError(f"{len(unknown)} {what} row(s) name question ids that are not in the "
                         f"train split (e.g. {unknown[:5]}): {what} data and train split are out "
                         f"of date with each other; re-run the {rerun} stage")
    return [(row, by_id[row["id"]]) for row in rows]


def balanced_head(rows: Sequence[dict], limit: int | None) -> list[dict]:
    """The first ``limit`` rows taken in turn from each ``category`` (categories in order of first
    appearance), returned in their original order; every row when ``limit`` is None.

    The splits are grouped by category, so a plain head of a few rows is a single category (and
    merge, which trains one delta per category, would get one chunk); this head keeps them all.
    """
    rows = list(rows)
    if limit is None or limit >= len(rows):
        return rows
    queues: dict = {}
    for i, row in enumerate(rows):
        queues.setdefault(row.get("category"), []).append(i)
    picked: list[int] = []
    depth = 0
    while len(picked) < limit:
        for queue in queues.values():
            if depth < len(queue) and len(picked) < limit:
                picked.append(queue[depth])
        depth += 1
    return [rows[i] for i in sorted(picked)]
