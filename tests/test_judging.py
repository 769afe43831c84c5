"""Pairwise judging: the position swap resolves per criterion, failures stay failures."""

from __future__ import annotations

import pytest

from meteor.judging import TIE, X, Y, compare_both_orders, resolve
from meteor.teacher.config import TeacherParams
from meteor.teacher.base import Comparison, CriterionPreference, TeacherResult
from meteor.teacher.chat import check_preferences
from meteor.teacher.offline import OfflineTeacher

QUESTION = {"id": 1, "category": "ML", "title": "Why does my model overfit?",
            "question": "Training accuracy is 99% but validation accuracy is 60%.",
            "answer": "The model memorises the training data: add regularization such as dropout "
                      "or weight decay, use early stopping on the validation loss, and get more "
                      "data or augment it."}
GOOD = ("It memorises the training data. Add regularization (dropout, weight decay), use early "
        "stopping on the validation loss and get more data or augment it.")


def comparison(**winners: str) -> TeacherResult:
    parsed = Comparison(preferences={c: CriterionPreference(winner=w, justification="j")
                                     for c, w in winners.items()})
    return TeacherResult(ok=True, text=parsed.model_dump_json(), parsed=parsed)


def test_resolve_maps_orders_and_disagreement_is_a_tie():
    xy = comparison(accuracy="A", coherence="B", relevance="tie")  # x shown first
    yx = comparison(accuracy="B", coherence="B", relevance="tie")  # y shown first
    j = resolve(xy, yx, ("accuracy", "coherence", "relevance"))
    assert j.ok
    assert j.winners == {"accuracy": X, "coherence": TIE, "relevance": TIE}
    assert j.consistent == {"accuracy": True, "coherence": False, "relevance": True}
    assert j.overall() == X


def test_failed_order_fails_the_pair():
    j = resolve(comparison(accuracy="A"), TeacherResult(ok=False, error="invalid JSON"), ("accuracy",))
    assert not j.ok and j.winners == {} and "invalid JSON" in j.error and j.overall() is None


def test_offline_compare_prefers_the_reference_like_answer_in_both_orders():
    judge = OfflineTeacher(TeacherParams(), progress=False)
    [j] = compare_both_orders(judge, [QUESTION], [GOOD], ["Bananas are yellow."])
    assert j.ok and set(j.winners.values()) == {X} and all(j.consistent.values())
    [k] = compare_both_orders(judge, [QUESTION], ["Bananas are yellow."], [GOOD])
    assert set(k.winners.values()) == {Y}
    [same] = compare_both_orders(judge, [QUESTION], [GOOD], [GOOD])
    assert set(same.winners.values()) == {TIE}
    assert judge.stats.calls == 6  # both orders of each pair


def test_check_preferences_requires_every_criterion():
    c = Comparison(preferences={"Accuracy ": CriterionPreference(winner="A", justification="j")})
    assert list(check_preferences(c, ("accuracy",)).preferences) == ["accuracy"]
    with pytest.raises(ValueError, match="missing criteria"):
        check_preferences(c, ("accuracy", "coherence"))
