"""Joining stage rows back to their questions by the stable Stack Overflow ``id``."""

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
