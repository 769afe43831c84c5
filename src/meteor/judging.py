"""Pairwise judging with position swap, shared by self_train (is the high-compute answer better?)
and evaluate (is each model better than base?).

The judge sees every pair twice, (x, y) and (y, x). Per criterion, when both orders name the same
answer it wins; when they disagree the question is a tie for that criterion (FastChat's MT-bench
rule), and the disagreement is counted as a position inconsistency. A pair whose either call
failed has no outcome (``ok`` False): callers exclude and count it, never score it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from meteor.criteria import CRITERIA
from meteor.teacher.base import Teacher, TeacherResult

X, Y, TIE = "x", "y", "tie"


@dataclass
class PairJudgment:
    """Both orders of one (question, x, y) comparison, resolved per criterion."""

    ok: bool
    winners: dict[str, str] = field(default_factory=dict)  # criterion -> "x" | "y" | "tie"
    consistent: dict[str, bool] = field(default_factory=dict)  # both orders agreed
    error: str | None = None
    xy: TeacherResult | None = None  # x shown as A
    yx: TeacherResult | None = None  # y shown as A

    def overall(self) -> str | None:
        """The answer that wins more criteria than it loses, else a tie (None when failed)."""
        if not self.ok:
            return None
        x = sum(w == X for w in self.winners.values())
        y = sum(w == Y for w in self.winners.values())
        return X if x > y else Y if y > x else TIE


def _as_xy(winner: str, x_is_a: bool) -> str:
    if winner == "tie":
        return TIE
    return X if (winner == "A") == x_is_a else Y


def resolve(xy: TeacherResult, yx: TeacherResult, criteria: Sequence[str]) -> PairJudgment:
    """Combine the two orders' results into one :class:`PairJudgment`."""
    if not (xy.ok and yx.ok):
        errors = [r.error for r in (xy, yx) if not r.ok]
        return PairJudgment(ok=False, error="; ".join(e or "failed" for e in errors), xy=xy, yx=yx)
    winners, consistent = {}, {}
    for c in criteria:
        first = _as_xy(xy.parsed.preferences[c].winner, x_is_a=True)
        second = _as_xy(yx.parsed.preferences[c].winner, x_is_a=False)
        consistent[c] = first == second
        winners[c] = first if first == second else TIE
    return PairJudgment(ok=True, winners=winners, consistent=consistent, xy=xy, yx=yx)


def compare_both_orders(judge: Teacher, questions: Sequence[dict], answers_x: Sequence[str],
                        answers_y: Sequence[str], criteria: Sequence[str] = CRITERIA
                        ) -> list[PairJudgment]:
    """Judge each (question, x, y) in both orders; one :class:`PairJudgment` per question."""
    criteria = tuple(criteria)
    questions, answers_x, answers_y = list(questions), list(answers_x), list(answers_y)
    # One call with both orders, so a concurrent backend fans all of them out at once.
    results = judge.compare(questions + questions, answers_x + answers_y, answers_y + answers_x,
                            criteria)
    n = len(questions)
    return [resolve(results[i], results[n + i], criteria) for i in range(n)]
