"""The test questions every model answers, and joining answers back to them by ``id``."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from meteor.rows import balanced_head

SKIP_REASONS = ("no_id", "duplicate_id", "no_question", "no_reference")


def usable_questions(rows: Sequence[dict], limit: int | None = None) -> tuple[list[dict], Counter]:
    """The usable test rows, in file order (``limit`` of them, taken in turn from each category,
    when set), and the others counted by reason.

    A usable row has an ``id`` seen once, a title and body (what the model is asked) and an
    accepted ``answer`` (the reference of perplexity, ROUGE-L and the offline judge).
    """
    kept, skipped, seen = [], Counter(), set()
    for row in rows:
        if "id" not in row:
            skipped["no_id"] += 1
        elif row["id"] in seen:
            skipped["duplicate_id"] += 1
        elif not all(isinstance(row.get(k), str) and row[k].strip() for k in ("title", "question")):
            skipped["no_question"] += 1
        elif not isinstance(row.get("answer"), str) or not row["answer"].strip():
            skipped["no_reference"] += 1
        else:
            kept.append(row)
            seen.add(row["id"])
    return balanced_head(kept, limit), skipped


def answers_for(questions: Sequence[dict], answer_rows: Sequence[dict], model: str) -> list[str]:
    """``model``'s answer to each question, in the questions' order; a missing one is an error
    that says which stage to re-run."""
    by_id = {r["id"]: r["answer"] for r in answer_rows}
    missing = [q["id"] for q in questions if q["id"] not in by_id]
    if missing or len(by_id) != len(questions):
        raise ValueError(f"eval/answers/{model}.jsonl does not answer exactly the test questions "
                         f"({len(missing)} missing, e.g. {missing[:5]}; {len(by_id)} answers for "
                         f"{len(questions)} questions): re-run evaluate@{model}")
    return [by_id[q["id"]] for q in questions]
