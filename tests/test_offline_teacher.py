"""The offline reference teacher: deterministic, grounded in the reference, honest about it."""

from __future__ import annotations

import pytest
from rouge_score import rouge_scorer

import meteor.teacher.offline as offline
from meteor.criteria import CRITERIA
from meteor.teacher import make_teacher, rubric
from meteor.teacher.base import Scores, Verdict
from meteor.teacher.config import TeacherParams
from meteor.teacher.offline import OfflineTeacher
from meteor.teacher.rubric import MissingText, judge_scores
from meteor.teacher.shaping import guideline_points, shape_by_guideline
from meteor.textmeasures import key_terms
from meteor.textmetrics import rouge_l

TREE = {
    "id": 1, "category": "ML",
    "title": "Why does my decision tree get 99% training accuracy but only 72% on the test set?",
    "question": "I train a `DecisionTreeClassifier`; training accuracy is 0.998 but test accuracy "
                "is 0.72. Is my split wrong?",
    "answer": (
        "Your split is probably fine. A large gap between training and test score is the symptom "
        "of **high variance**, i.e. **overfitting**.\n\n"
        "An unconstrained decision tree keeps splitting until every leaf is pure, so it memorises "
        "the noise of the training set.\n\n"
        "Limit its complexity and choose the limit with cross-validation:\n\n"
        "```\nsearch = GridSearchCV(DecisionTreeClassifier(), {\"max_depth\": [3, 5, 8]}, cv=5)\n"
        "search.fit(X_train, y_train)\n```\n\n"
        "An ensemble such as `RandomForestClassifier` averages many decorrelated trees "
        "(bagging), which reduces variance.\n\n"
        "Pitfall: tuning `max_depth` while watching the test score leaks the test set into model "
        "selection.\n\n"
        "**Summary:** reduce `max_depth`, use bagging, tune with cross-validation."
    ),
}
TOKENIZER = {
    "id": 2, "category": "NLP",
    "title": "Why does my tokenizer split 'unhappiness' into three pieces?",
    "question": "The BPE tokenizer returns ['un', 'happi', 'ness']. Is that a bug?",
    "answer": (
        "No. Byte-pair encoding builds a vocabulary of frequent subword units by merging the most "
        "frequent symbol pairs. Rare words are split into known subwords, so the model never sees "
        "an unknown token. Call `tokenizer.convert_ids_to_tokens` to inspect the pieces."
    ),
}
GUIDELINE = ("1. Scope: why the training and test accuracy differ\n"
             "2. Definitions: variance and overfitting\n"
             "3. Steps: tune the tree with cross-validation\n"
             "4. Pitfalls of watching the test score\n"
             "5. Resources: scikit-learn documentation")


@pytest.fixture
def teacher() -> OfflineTeacher:
    return OfflineTeacher(TeacherParams(), progress=False)


def test_make_teacher_builds_the_offline_backend():
    teacher = make_teacher(TeacherParams(backend="offline"))
    assert isinstance(teacher, OfflineTeacher)
    assert teacher.name == "offline:offline-reference"
    assert "not a model" in offline.__doc__  # documented as a heuristic stand-in


def test_reference_is_judged_correct_and_unrelated_answer_is_not(teacher):
    results = teacher.verdict([TREE, TREE], [TREE["answer"], TOKENIZER["answer"]])
    good, bad = (r.parsed for r in results)
    assert all(r.ok for r in results)
    assert isinstance(good, Verdict) and good.correct and good.hints == []
    assert isinstance(bad, Verdict) and not bad.correct
    hinted = " ".join(bad.hints)
    # The hints name the reference's missing key terms, identifiers first among them.
    assert "max_depth" in hinted and "RandomForestClassifier" in hinted
    assert "max_depth" in bad.feedback
    # A terse answer missing most key terms is rejected and told to give more detail.
    partial = teacher.verdict([TREE], ["Use cross-validation."])[0].parsed
    assert not partial.correct and any("more detail" in h for h in partial.hints)


def test_key_terms_prefer_specific_terms_over_stop_words():
    terms = [t.surface for t in key_terms(TREE["answer"], TREE["title"] + TREE["question"])]
    assert "max_depth" in terms and "RandomForestClassifier" in terms
    assert not {"the", "your", "such", "probably", "large"} & {t.lower() for t in terms}


def test_scores_are_in_range_and_rank_the_reference_above_junk(teacher):
    answers = [TREE["answer"], TOKENIZER["answer"], "tree tree tree tree tree tree tree", ""]
    results = teacher.score([TREE] * 4, answers)
    assert all(r.ok for r in results)
    totals = []
    for r in results:
        assert isinstance(r.parsed, Scores) and set(r.parsed.scores) == set(CRITERIA)
        for s in r.parsed.scores.values():
            assert 1 <= s.score <= 10 and s.justification
        totals.append(sum(s.score for s in r.parsed.scores.values()))
    reference, unrelated, repetitive, empty = totals
    assert reference == 50  # the reference against itself: perfect on every measure
    assert reference > unrelated and reference > repetitive > empty == 5


def test_unknown_criterion_gets_the_mean_of_all_measures():
    scores = judge_scores(TREE, TREE["answer"], ("accuracy", "helpfulness"))
    assert set(scores.scores) == {"accuracy", "helpfulness"}
    assert "mean of all measures" in scores.scores["helpfulness"].justification


def test_guideline_shapes_the_answer_without_losing_or_inventing_content(teacher):
    shaped, plain = teacher.answer([TREE, TREE], [GUIDELINE, None])
    assert plain.text == TREE["answer"]  # no guideline: the reference as it is
    assert shaped.text != plain.text
    assert shaped.text.startswith("**Approach.**")
    for paragraph in TREE["answer"].split("\n\n"):  # every reference paragraph is kept, verbatim
        assert paragraph in shaped.text
    assert "### 2. Definitions: variance and overfitting" in shaped.text
    assert "### 4. Pitfalls of watching the test score\n\nPitfall:" in shaped.text
    assert shaped.text.rstrip().endswith("_Guideline point(s) 5 are not addressed here._")
    # The closing summary stays last instead of being filed under a point.
    assert shaped.text.index("**Summary:**") > shaped.text.index("### 4.")
    # Code stays with the paragraph that introduces it.
    assert "cross-validation:\n\n```" in shaped.text


def test_guideline_without_numbered_points_leaves_the_reference_unchanged():
    assert guideline_points("just some words\nno numbers") == []
    assert shape_by_guideline(TREE["answer"], "just some words") == TREE["answer"]
    assert guideline_points("1) **Scope**:\n - 2. steps") == ["Scope", "steps"]


def test_deterministic_and_independent_of_the_batch(teacher):
    other = OfflineTeacher(TeacherParams(), progress=False)
    one = teacher.score([TREE], [TOKENIZER["answer"]])[0].text
    batch = other.score([TOKENIZER, TREE], [TREE["answer"], TOKENIZER["answer"]])[1].text
    assert one == batch
    assert (teacher.answer([TREE], [GUIDELINE])[0].text
            == other.answer([TREE], [GUIDELINE])[0].text)


def test_missing_reference_fails_that_item_only_and_stats_count_words(teacher):
    no_reference = {**TOKENIZER, "id": 99, "answer": None}
    results = teacher.answer([TREE, no_reference], [None, None])
    assert results[0].ok and not results[1].ok
    assert "id=99" in results[1].error and "answer" in results[1].error
    assert teacher.stats.calls == 2 and teacher.stats.failures == 1
    assert teacher.stats.cache_hits == 0 and teacher.stats.cost_usd == 0
    # Tokens are estimated as words: the reply's words exactly, the prompt's roughly.
    assert results[0].usage["completion_tokens"] == len(TREE["answer"].split())
    assert teacher.stats.completion_tokens == len(TREE["answer"].split())
    assert teacher.stats.prompt_tokens == results[0].usage["prompt_tokens"] > 0


def test_missing_answer_text_fails_that_item_only(teacher):
    results = teacher.verdict([TREE, TREE], [None, TREE["answer"]])
    assert not results[0].ok and "id=1" in results[0].error and "not text" in results[0].error
    assert results[1].ok and results[1].parsed.correct
    scored = teacher.score([TREE, TOKENIZER], [TREE["answer"], None])
    assert scored[0].ok and not scored[1].ok
    compared = teacher.compare([TREE], [TREE["answer"]], [None])
    assert not compared[0].ok
    assert issubclass(MissingText, ValueError)


def test_other_errors_are_bugs_and_are_not_hidden_as_failed_items(teacher, monkeypatch):
    def broken(question, answer, criteria):
        raise ValueError("a bug, e.g. a pydantic validation error")

    monkeypatch.setattr(offline, "judge_scores", broken)
    with pytest.raises(ValueError, match="a bug"):
        teacher.score([TREE], [TREE["answer"]])
    assert teacher.stats.failures == 0


def test_rouge_l_is_the_rouge_score_package_shared_with_evaluate():
    assert rubric.rouge_l is rouge_l  # the offline teacher uses the shared function
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    pairs = [(TOKENIZER["answer"], TREE["answer"]), (TREE["answer"], TREE["answer"]),
             ("Use cross-validation and limit max_depth.", TREE["answer"]),
             ("Naïve Überfitting: the models' accuracies `max_depth=3`", "naive overfitting models")]
    for answer, reference in pairs + pairs:  # twice: remembered tokens give the same scores
        expected = scorer.score(reference, answer)["rougeL"]
        got = rouge_l(answer, reference)
        assert (got.precision, got.recall, got.f1) == (expected.precision, expected.recall,
                                                      expected.fmeasure)
    assert rouge_l("the cat sat", "the cat sat").f1 == 1.0
    assert rouge_l("", "the cat").f1 == 0.0
    # Precision is over the answer, recall over the reference.
    short = rouge_l("the cat", "the cat sat on the mat")
    assert short.precision == 1.0 and short.recall == pytest.approx(2 / 6)
    # rouge-score's tokens: case and punctuation do not count; the stemmer joins inflections.
    assert rouge_l("Overfitting, models!", "overfit model").f1 == 1.0


def test_verdict_thresholds_on_the_bundled_corpus_accept_references_and_reject_junk():
    from pathlib import Path

    from meteor.scrape.config import ScrapeParams
    from meteor.scrape.dump import scrape_dump

    corpus = Path(__file__).resolve().parents[1] / "data/raw/Posts.xml"
    records = scrape_dump(corpus, categories=ScrapeParams().categories).records[::8]  # 33 of 263
    other = records[1:] + records[:1]  # another question's accepted answer: on topic, but wrong
    accepted = [rubric.judge_verdict(r, r["answer"]).correct for r in records]
    wrong = [rubric.judge_verdict(r, o["answer"]).correct for r, o in zip(records, other)]
    echo = [rubric.judge_verdict(r, r["title"] + "\n" + r["question"]).correct for r in records]
    assert all(accepted)
    assert sum(wrong) <= 0.05 * len(records) and not any(echo)
