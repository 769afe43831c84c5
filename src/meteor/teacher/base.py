"""The teacher/judge interface every stage talks to.

Stages hand over whole lists (so backends can batch or fan out concurrently) and get back one
:class:`TeacherResult` per item, in order. A failed item is a result with ``ok=False`` and the
reason, never an exception that kills the stage.

Question records are the scrape rows: ``{"id", "category", "title", "question", "answer", ...}``;
``answer`` is the accepted Stack Overflow answer, used only by the offline backend as reference.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, Field

from meteor.criteria import CRITERIA  # meteor.self_train still imports it from here


class Verdict(BaseModel):
    """The teacher's structured judgement of a student answer (refine)."""

    correct: bool
    feedback: str = Field(description="What is wrong or missing, addressed to the student.")
    hints: list[str] = Field(default_factory=list, description="Concrete pointers to fix it.")


class CriterionScore(BaseModel):
    score: int = Field(ge=1, le=10)
    justification: str


class Scores(BaseModel):
    """Judge scores, 1-10 per criterion, each with a justification."""

    scores: dict[str, CriterionScore]


class CriterionPreference(BaseModel):
    winner: Literal["A", "B", "tie"]
    justification: str


class Comparison(BaseModel):
    """A pairwise judgement: per criterion, which of the two answers *as shown* (A first, B
    second) is better, or a tie. Position bias is handled by the caller asking both orders
    (:func:`meteor.judging.compare_both_orders`)."""

    preferences: dict[str, CriterionPreference]


@dataclass
class TeacherResult:
    ok: bool
    text: str | None = None  # raw answer text (or raw JSON for structured calls)
    parsed: Any = None  # Verdict / Scores for structured calls
    error: str | None = None  # why it failed, when ok is False
    cached: bool = False
    usage: dict[str, int] = field(default_factory=dict)  # prompt_tokens, completion_tokens


@dataclass
class TeacherStats:
    """Per-stage accounting written into the stage's metrics."""

    calls: int = 0  # requests actually sent (retries included)
    cache_hits: int = 0
    failures: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0  # this run's spend
    budget_usd: float | None = None
    # "<stage>/<section>": the budget counts every run of the stage since it last completed
    # (spent_before_run_usd + cost_usd); None: this run's spend only
    budget_scope: str | None = None
    spent_before_run_usd: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("cost_usd", "spent_before_run_usd"):
            d[k] = round(d[k], 6)
        d["budget_counts"] = ("cumulative: every run of the stage since it last completed"
                              if self.budget_scope else "this run only")
        d["spent_total_usd"] = round(self.spent_before_run_usd + self.cost_usd, 6)
        return d


class Teacher(ABC):
    """Answer questions, judge student answers, score answers. All methods take lists."""

    name: str  # "<backend>:<model>", recorded in outputs
    stats: TeacherStats

    @abstractmethod
    def answer(self, questions: list[dict], guidelines: list[str | None]) -> list[TeacherResult]:
        """Detailed answer per question, following its guideline when one is given."""

    @abstractmethod
    def verdict(self, questions: list[dict], answers: list[str]) -> list[TeacherResult]:
        """A :class:`Verdict` per (question, student answer)."""

    @abstractmethod
    def score(self, questions: list[dict], answers: list[str],
              criteria: tuple[str, ...] = CRITERIA) -> list[TeacherResult]:
        """:class:`Scores` per (question, answer) on ``criteria``."""

    @abstractmethod
    def compare(self, questions: list[dict], answers_a: list[str], answers_b: list[str],
                criteria: tuple[str, ...] = CRITERIA) -> list[TeacherResult]:
        """:class:`Comparison` per (question, answer A, answer B), A shown first."""

    def stage_completed(self) -> None:  # noqa: B027 - optional hook
        """The stage that used this teacher finished; a cumulative budget starts afresh."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release clients, pools, caches."""
