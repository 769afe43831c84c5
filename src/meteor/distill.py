"""METEOR 1b: the teacher answers each train question following the student's guideline.

- :func:`distill_inputs` joins each guideline row back to its train question by ``id`` (the
  question record carries the reference answer the offline teacher needs) and decides what the
  teacher is given: the guideline, or ``None`` when it is degenerate (see :mod:`meteor.guideline`).
- :func:`distill_rows` asks the teacher and returns one row per question, in question order; a
  failed call is a row with ``ok=False`` and the reason (``"budget"``, ``"HTTP 500 after 6
  attempts"``), never a missing row.
- :func:`guideline_ablation` (the paper's data-quality check): on ``ablation_size`` questions
  whose guideline was actually used, also distill *without* the guideline and have the judge score
  both answer sets 1-10 on the five criteria. The sample is the first such questions in train
  order, passing over those with a degenerate guideline (their answer was already written without
  one, so comparing it with itself would measure nothing); how many were passed over is reported.
  The train split is ordered by id and drawn by a hash of the id, so the sample is deterministic;
  it depends on the limit only through which guidelines are usable. Means are over the questions
  whose two answers were both scored (a paired comparison); with no such question they are
  ``None``, never a made-up tie.
"""

from __future__ import annotations

import logging
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from pydantic import Field

from meteor.criteria import CRITERIA
from meteor.params import Section
from meteor.rows import balanced_head, join_to_questions
from meteor.teacher.base import Scores, Teacher, TeacherResult
from meteor.teacher.chat import BUDGET


class DistillParams(Section):
    limit: int | None = Field(None, ge=1, description="Only N guidelines, taken in turn from each "
                              "category (debugging).")
    ablation_size: int = Field(20, ge=0, description="Questions distilled with and without "
                               "guideline: the first ones whose guideline is not degenerate.")
    max_failed_fraction: float = Field(
        0.05, ge=0, le=1, description="Above this share of failed rows (or of ablation pairs that "
                                      "could not be compared) the stage writes its outputs and "
                                      "metrics, then exits non-zero; a re-run resumes from the cache.")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistillInput:
    question: dict  # the train record: id, category, title, question, answer (reference), ...
    guideline: str | None  # what the teacher is given: None when the guideline is degenerate
    degenerate: str | None  # why the student's guideline was not used, if it was not


def distill_inputs(guideline_rows: Sequence[dict], train_rows: Sequence[dict],
                   limit: int | None = None) -> list[DistillInput]:
    """Guideline rows (in their order; ``limit`` of them taken in turn from each category) joined
    to their train questions by id."""
    pairs = join_to_questions(balanced_head(guideline_rows, limit), train_rows, what="guideline",
                              rerun="guideline")
    inputs = []
    for row, question in pairs:
        text = row.get("guideline")
        reason = row.get("degenerate")
        if reason is None and not (isinstance(text, str) and text.strip()):
            reason = "empty"  # guard against hand-edited or older guideline files
        inputs.append(DistillInput(question, None if reason else text, reason))
    return inputs


def distilled_row(item: DistillInput, result: TeacherResult, teacher_name: str) -> dict:
    q = item.question
    return {
        "id": q["id"], "category": q.get("category"), "title": q["title"], "question": q["question"],
        "guideline": item.guideline, "guideline_degenerate": item.degenerate,
        "answer": result.text if result.ok else None, "ok": result.ok,
        "error": None if result.ok else result.error, "teacher": teacher_name,
        "usage": dict(result.usage),
    }


def distill_rows(teacher: Teacher, inputs: Sequence[DistillInput]) -> list[dict]:
    """One distilled row per input, in order (failed calls included, with their reason)."""
    results = teacher.answer([i.question for i in inputs], [i.guideline for i in inputs])
    return [distilled_row(i, r, teacher.name) for i, r in zip(inputs, results)]


# ------------------------------------------------------------------------------------ ablation
@dataclass
class Ablation:
    quality: dict
    budget_stopped: bool = False
    failures: Counter = field(default_factory=Counter)  # "teacher: <reason>", "judge: <reason>"


def _mean(values: list[float]) -> float | None:
    return round(statistics.fmean(values), 3) if values else None


def _reason(error: str | None) -> str:
    return (error or "unknown").split(":")[0]


def ablation_sample(inputs: Sequence[DistillInput], size: int) -> tuple[list[int], int]:
    """Indices of the first ``size`` inputs with a usable guideline, and how many degenerate
    ones were passed over while drawing them."""
    picked: list[int] = []
    skipped = 0
    for k, item in enumerate(inputs):
        if len(picked) >= size:
            break
        if item.guideline is None:
            skipped += 1
        else:
            picked.append(k)
    return picked, skipped


def guideline_ablation(teacher: Teacher, judge: Teacher, inputs: Sequence[DistillInput],
                       with_rows: Sequence[dict], size: int,
                       criteria: tuple[str, ...] = CRITERIA) -> Ablation:
    """Judge scores of answers distilled with vs without the guideline (see the module docstring).

    ``with_rows`` are the distilled rows of ``inputs``, in the same order.
    """
    if len(with_rows) != len(inputs):
        raise ValueError(f"{len(with_rows)} distilled rows for {len(inputs)} inputs")
    picked, skipped = ablation_sample(inputs, size)
    questions = [inputs[k].question for k in picked]
    with_answers: list[str | None] = [with_rows[k]["answer"] for k in picked]
    failures: Counter = Counter()
    if not picked:
        log.warning("ablation: no question with a usable guideline (%d degenerate passed over): "
                    "nothing to compare", skipped)

    fresh = teacher.answer(questions, [None] * len(questions)) if questions else []
    without: list[str | None] = []
    for result in fresh:
        without.append(result.text if result.ok else None)
        if not result.ok:
            failures[f"teacher: {_reason(result.error)}"] += 1
    budget_stopped = any(r.error == BUDGET for r in fresh)

    def judged(answers: list[str | None]) -> list[Scores | None]:
        ready = [k for k, a in enumerate(answers) if a is not None]
        results = (judge.score([questions[k] for k in ready], [answers[k] for k in ready], criteria)
                   if ready else [])
        out: list[Scores | None] = [None] * len(answers)
        nonlocal budget_stopped
        for k, r in zip(ready, results):
            if r.ok:
                out[k] = r.parsed
            else:
                failures[f"judge: {_reason(r.error)}"] += 1
                budget_stopped |= r.error == BUDGET
        return out

    with_scores = judged(with_answers)
    without_scores = judged(without)
    paired = [(w, wo) for w, wo in zip(with_scores, without_scores) if w is not None and wo is not None]

    def overall(s: Scores) -> float:
        return statistics.fmean(s.scores[c].score for c in criteria)

    with_mean = _mean([overall(w) for w, _ in paired])
    without_mean = _mean([overall(wo) for _, wo in paired])
    quality = {
        "with_guideline": with_mean,  # None when no pair could be compared
        "without_guideline": without_mean,
        "gain": (round(with_mean - without_mean, 3)
                 if with_mean is not None and without_mean is not None else None),
        "per_criterion": {
            "with_guideline": {c: _mean([w.scores[c].score for w, _ in paired]) for c in criteria},
            "without_guideline": {c: _mean([wo.scores[c].score for _, wo in paired]) for c in criteria},
        },
        "n": len(paired),  # questions whose two answers were both scored
        "sample": len(picked),  # questions with a usable guideline that were compared
        "skipped_degenerate": skipped,  # passed over: their guideline was degenerate
    }
    if failures:
        log.warning("ablation: %d item(s) could not be compared (%s)", sum(failures.values()),
                    dict(failures))
    return Ablation(quality=quality, budget_stopped=budget_stopped, failures=failures)


# ------------------------------------------------------------------------------------- metrics
def teacher_metrics(teacher: Teacher) -> dict:
    stats = teacher.stats.as_dict()
    return {"name": teacher.name, **stats,
            "tokens": stats["prompt_tokens"] + stats["completion_tokens"]}


def distill_metrics(rows: Sequence[dict], ablation: Ablation, teacher: Teacher, judge: Teacher,
                    seconds: float) -> dict:
    failed = Counter(_reason(r["error"]) for r in rows if not r["ok"])
    return {
        "rows": len(rows),
        "failed": sum(failed.values()),
        "failed_by_reason": dict(sorted(failed.items())),
        "failed_fraction": round(sum(failed.values()) / len(rows), 4) if rows else 0.0,
        # share of the ablation sample without a with/without comparison (a failed call)
        "ablation_failed_fraction": (round(1 - ablation.quality["n"] / ablation.quality["sample"], 4)
                                     if ablation.quality["sample"] else 0.0),
        "without_guideline_rows": sum(r["guideline"] is None for r in rows),
        "quality": ablation.quality,
        "ablation_failures": dict(sorted(ablation.failures.items())),
        "teacher": teacher_metrics(teacher),
        "judge": teacher_metrics(judge),
        "budget_stopped": any(r["error"] == BUDGET for r in rows) or ablation.budget_stopped,
        "seconds": round(seconds, 1),
    }
