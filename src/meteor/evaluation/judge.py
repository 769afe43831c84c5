"""The judge's view of one model: each answer scored alone, and compared with the baseline's.

Single-answer grading (:meth:`Teacher.score`): 1-10 per criterion with a justification; the mean
over criteria and questions is the analogue of METEOR's "GPT-4 Score". Pairwise (SelFee /
MT-bench): the judge sees (model, baseline) and (baseline, model) for every question
(:func:`meteor.judging.compare_both_orders`); per criterion the orders must agree for a win,
otherwise it is a tie.

Every call becomes part of a judgment row, raw reply, parsed result and cache hit included, so the
report can be recomputed and audited from ``eval/judgments.jsonl`` alone. A call that never
validated (after the judge's JSON re-asks) is a row with ``ok: false`` and its error: it is
excluded from the averages and counted, never scored as zero.

Rows (``kind``):
- ``score``: ``{judge, model, id, category, ok, error, scores: {criterion: int} | null, call}``
- ``pair``: ``{judge, model, against, id, category, ok, error, winners: {criterion: "model" | "baseline" |
  "tie"} | null, consistent: {criterion: bool} | null, calls: [model_first, baseline_first]}``
"""

from __future__ import annotations

from collections.abc import Sequence

from meteor.judging import TIE, X, Y, compare_both_orders
from meteor.teacher.base import Teacher, TeacherResult

MODEL, BASELINE = "model", "baseline"
_NAMES = {X: MODEL, Y: BASELINE, TIE: TIE}


def _call(result: TeacherResult | None, order: str | None = None) -> dict:
    """One judge call as stored: raw reply, parsed JSON, cache hit, usage, error."""
    call = {} if order is None else {"order": order}
    if result is None:
        return {**call, "ok": False, "error": "not called", "cached": False, "raw": None,
                "parsed": None, "usage": {}}
    parsed = result.parsed.model_dump() if result.parsed is not None else None
    return {**call, "ok": result.ok, "error": result.error, "cached": result.cached,
            "raw": result.text, "parsed": parsed, "usage": dict(result.usage)}


def score_rows(judge: Teacher, model: str, questions: Sequence[dict], answers: Sequence[str],
               criteria: Sequence[str]) -> list[dict]:
    """Single-answer grading of ``answers`` (one per question), one row per question."""
    criteria = tuple(criteria)
    results = judge.score(list(questions), list(answers), criteria)
    rows = []
    for q, r in zip(questions, results, strict=True):
        rows.append({
            "kind": "score", "judge": judge.name, "model": model, "id": q["id"],
            "category": q.get("category"),
            "ok": r.ok, "error": r.error,
            "scores": {c: r.parsed.scores[c].score for c in criteria} if r.ok else None,
            "call": _call(r),
        })
    return rows


def pair_rows(judge: Teacher, model: str, baseline: str, questions: Sequence[dict],
              answers: Sequence[str], baseline_answers: Sequence[str],
              criteria: Sequence[str]) -> list[dict]:
    """Position-swapped comparison of ``answers`` with ``baseline_answers``, one row per question."""
    criteria = tuple(criteria)
    judgments = compare_both_orders(judge, list(questions), list(answers), list(baseline_answers),
                                    criteria)
    rows = []
    for q, j in zip(questions, judgments, strict=True):
        rows.append({
            "kind": "pair", "judge": judge.name, "model": model, "against": baseline, "id": q["id"],
            "category": q.get("category"), "ok": j.ok, "error": j.error,
            "winners": {c: _NAMES[j.winners[c]] for c in criteria} if j.ok else None,
            "consistent": {c: j.consistent[c] for c in criteria} if j.ok else None,
            "calls": [_call(j.xy, "model_first"), _call(j.yx, "baseline_first")],
        })
    return rows


def judge_model(judge: Teacher, model: str, questions: Sequence[dict], answers: Sequence[str],
                criteria: Sequence[str], *, baseline: str | None = None,
                baseline_answers: Sequence[str] | None = None) -> list[dict]:
    """Score rows, then pair rows against ``baseline`` (none for the baseline itself)."""
    if len(answers) != len(questions):
        raise ValueError(f"{model}: {len(answers)} answers for {len(questions)} questions")
    rows = score_rows(judge, model, questions, answers, criteria)
    if baseline is not None and baseline != model:
        if baseline_answers is None or len(baseline_answers) != len(questions):
            raise ValueError(f"{model}: the baseline {baseline!r} needs one answer per question")
        rows += pair_rows(judge, model, baseline, questions, answers, baseline_answers, criteria)
    return rows
