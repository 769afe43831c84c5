"""The ``offline`` teacher/judge: a deterministic, reference-grounded heuristic stand-in.

**This is not a model.** It cannot reason, write new text or recognise a correct paraphrase. It
lets the whole pipeline run with no network and no keys (CI, a fresh laptop) by leaning on the
accepted Stack Overflow answer that every question record carries (``question["answer"]``):

- ``answer``: the reference answer itself, regrouped under the guideline's numbered points when
  there are any (:func:`meteor.teacher.shaping.shape_by_guideline`).
- ``verdict``, ``score``, ``compare``: overlap with the reference, by the rubric of
  :mod:`meteor.teacher.rubric` (key-term recall and ROUGE-L; one measure per criterion).

An item whose question has no reference answer, or whose answer to judge is not text, fails alone
(:class:`~meteor.teacher.rubric.MissingText`, reported as that item's error); any other exception
is a bug and propagates.

Everything is computed from the texts alone: the same inputs always give the same outputs, and a
result never depends on the other items of the batch. There is no cache (``cache_hits`` stays 0)
and no cost. ``calls`` counts items processed; tokens are *estimated as whitespace-separated
words* of the prompt :mod:`meteor.prompts` would send and of the reply, so the accounting has the
same shape as the real backends'.
"""

from __future__ import annotations

import json
import logging

from tqdm.auto import tqdm

from meteor.criteria import CRITERIA
from meteor.teacher import prompts
from meteor.teacher.base import Teacher, TeacherResult, TeacherStats
from meteor.teacher.config import TeacherParams
from meteor.teacher.rubric import (
    MissingText,
    judge_comparison,
    judge_scores,
    judge_verdict,
    reference_answer,
)
from meteor.teacher.shaping import shape_by_guideline

log = logging.getLogger(__name__)


def _answer_text(question: dict, answer) -> str:
    if not isinstance(answer, str):
        raise MissingText(f"question id={question.get('id')!r}: the answer to judge is "
                          f"{type(answer).__name__}, not text")
    return answer


def _words(messages: list[dict]) -> int:
    return sum(len(str(m.get("content", "")).split()) for m in messages)


class OfflineTeacher(Teacher):
    """Deterministic, reference-grounded heuristic teacher/judge (see the module docstring)."""

    def __init__(self, params: TeacherParams, *, progress: bool = True):
        self.params = params
        self.name = f"offline:{params.model}"
        self.stats = TeacherStats()
        self.progress = progress

    def answer(self, questions: list[dict], guidelines: list[str | None]) -> list[TeacherResult]:
        _same_length(questions, guidelines)
        return self._each(
            "answer", list(zip(questions, guidelines)),
            lambda q, g: shape_by_guideline(reference_answer(q), g),
            lambda q, g: prompts.teacher_answer_messages(q, g))

    def verdict(self, questions: list[dict], answers: list[str]) -> list[TeacherResult]:
        _same_length(questions, answers)
        return self._each("verdict", list(zip(questions, answers)),
                          lambda q, a: judge_verdict(q, _answer_text(q, a)),
                          prompts.verdict_messages)

    def score(self, questions: list[dict], answers: list[str],
              criteria: tuple[str, ...] = CRITERIA) -> list[TeacherResult]:
        _same_length(questions, answers)
        criteria = tuple(criteria)
        return self._each("score", list(zip(questions, answers)),
                          lambda q, a: judge_scores(q, _answer_text(q, a), criteria),
                          lambda q, a: prompts.score_messages(q, a, criteria))

    def compare(self, questions: list[dict], answers_a: list[str], answers_b: list[str],
                criteria: tuple[str, ...] = CRITERIA) -> list[TeacherResult]:
        _same_length(questions, answers_a)
        _same_length(questions, answers_b)
        criteria = tuple(criteria)
        return self._each("compare", [(q, (a, b)) for q, a, b in zip(questions, answers_a, answers_b)],
                          lambda q, ab: judge_comparison(q, _answer_text(q, ab[0]),
                                                         _answer_text(q, ab[1]), criteria),
                          lambda q, ab: prompts.compare_messages(q, ab[0], ab[1], criteria))

    def _each(self, what: str, items: list[tuple], compute, messages) -> list[TeacherResult]:
        results = []
        for question, other in tqdm(items, desc=f"{self.name} {what}", unit="item",
                                    disable=not self.progress or len(items) < 50, leave=False):
            self.stats.calls += 1
            try:
                out = compute(question, other)
                usage = {"prompt_tokens": _words(messages(question, other)), "completion_tokens": 0}
            except MissingText as e:  # a record without reference or text: this item fails, not all
                self.stats.failures += 1
                results.append(TeacherResult(ok=False, error=str(e)))
                continue
            if isinstance(out, str):
                text, parsed = out, None
            else:
                text, parsed = json.dumps(out.model_dump(), ensure_ascii=False), out
            usage["completion_tokens"] = len(text.split())
            self.stats.prompt_tokens += usage["prompt_tokens"]
            self.stats.completion_tokens += usage["completion_tokens"]
            results.append(TeacherResult(ok=True, text=text, parsed=parsed, usage=usage))
        failed = sum(not r.ok for r in results)
        if failed:
            log.warning("%s %s: %d/%d items failed (first: %s)", self.name, what, failed,
                        len(results), next(r.error for r in results if not r.ok))
        return results


def _same_length(a: list, b: list) -> None:
    if len(a) != len(b):
        raise ValueError(f"lists must have the same length, got {len(a)} and {len(b)}")
