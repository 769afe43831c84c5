"""The offline judge's rubric: verdicts, scores and comparisons measured against the reference.

Every judgement is grounded in the accepted Stack Overflow answer that the question record carries
(``question["answer"]``, see :func:`reference_answer`); the text measures it uses are
:mod:`meteor.textmeasures`, and ROUGE-L is :func:`meteor.textmetrics.rouge_l` (the
``rouge-score`` package), the one the evaluate stage reports too.

- :func:`judge_verdict`: overlap with the reference. An answer is accepted when its weighted
  key-term recall (:func:`meteor.textmeasures.key_term_recall`) is at least
  :data:`MIN_KEY_RECALL` and ``0.6 * recall + 0.4 * ROUGE-L F1`` is at least
  :data:`MIN_COMBINED`; the hints name the missing key terms.
- :func:`judge_scores`: each criterion from one reference-based measure, mapped linearly onto
  1-10 (:func:`to_score`), with a justification naming the measure (see
  :func:`criterion_measures`).
- :func:`judge_comparison`: the higher of the two answers' scores wins, per criterion.

Because the judge measures agreement with the reference, it cannot reward organisation: in the
distill ablation, a guideline-shaped answer (the same content plus headings, reordered) scores a
little *below* the bare reference. Only a model judge can measure what a guideline adds.

A question without a reference answer raises :class:`MissingText`; the offline teacher reports it
as that item's error.
"""

from __future__ import annotations

from collections.abc import Sequence

from meteor.criteria import CRITERIA
from meteor.teacher import prompts
from meteor.teacher.base import (
    Comparison,
    CriterionPreference,
    CriterionScore,
    Scores,
    Verdict,
)
from meteor.textmeasures import (
    content_stems,
    distinct_trigram_ratio,
    is_content,
    is_identifier,
    is_specific_number,
    key_term_recall,
    key_terms,
    stem,
    tokens,
)
from meteor.textmetrics import rouge_l

MAX_HINTS = 5
MIN_KEY_RECALL = 0.5  # verdict: at least half of the weighted key terms ...
MIN_COMBINED = 0.4  # ... and 0.6 * recall + 0.4 * ROUGE-L F1 at least this
MIN_WORDS = 20  # below this an answer is too short to be well organised (coherence)


class MissingText(ValueError):
    """An item lacks a text the offline teacher needs: that item fails, the batch goes on."""


def reference_answer(question: dict) -> str:
    """The question's accepted answer, the reference everything is measured against."""
    reference = question.get("answer")
    if not isinstance(reference, str) or not reference.strip():
        raise MissingText(f"question id={question.get('id')!r} has no reference 'answer': the "
                          "offline teacher needs the accepted answer of each question")
    return reference


# ------------------------------------------------------------------------ measures and scores
def _share_supported(items: Sequence[str], support: set[str]) -> float | None:
    return sum(i in support for i in items) / len(items) if items else None


def criterion_measures(question: dict, answer: str) -> dict[str, tuple[float, str]]:
    """Per criterion, a measure in [0, 1] against the reference and a sentence explaining it.

    - accuracy: ROUGE-L precision (how much of the answer follows the reference's wording);
    - completeness: weighted key-term recall;
    - relevance: share of the answer's content words found in the question or the reference;
    - coherence: distinct-trigram ratio (no repetition) x length adequacy (>= 20 words and
      >= 30% of the reference's length count as adequate);
    - reliability: share of the answer's code identifiers and numbers that the question or the
      reference contain (specific claims that can be checked); relevance when it makes none.
    """
    reference = reference_answer(question)
    question_text = prompts.format_question(question)
    rouge = rouge_l(answer, reference)
    terms = key_terms(reference, question_text)
    recall, missing = key_term_recall(answer, terms)

    answer_tokens = tokens(answer)
    answer_content = [stem(t) for t in answer_tokens if is_content(t)]
    support = set(content_stems(reference)) | set(content_stems(question_text))
    relevance = _share_supported(answer_content, support) or 0.0

    repetition = distinct_trigram_ratio(answer_tokens)
    wanted = max(MIN_WORDS, 0.3 * len(tokens(reference)))
    adequacy = min(1.0, len(answer_tokens) / wanted)

    specific = [t for t in answer_tokens if is_identifier(t) or is_specific_number(t)]
    support_all = set(tokens(reference)) | set(tokens(question_text))
    reliability = _share_supported(specific, support_all)

    missing_names = ", ".join(t.surface for t in missing[:MAX_HINTS]) or "none"
    return {
        "accuracy": (rouge.precision, f"ROUGE-L precision {rouge.precision:.2f} against the "
                                      "reference answer"),
        "completeness": (recall, f"key-term recall {recall:.2f} ({len(terms) - len(missing)}/"
                                 f"{len(terms)} key terms; missing: {missing_names})"),
        "relevance": (relevance, f"{relevance:.0%} of the answer's content words appear in the "
                                 "question or the reference"),
        "coherence": (repetition * adequacy, f"distinct-trigram ratio {repetition:.2f} x length "
                                             f"adequacy {adequacy:.2f} ({len(answer_tokens)} words)"),
        "reliability": ((reliability, f"{reliability:.0%} of {len(specific)} identifiers/numbers "
                                      "are supported by the question or the reference")
                        if reliability is not None else
                        (relevance, "no identifiers or numbers to check; content-word support "
                                    f"{relevance:.0%}")),
    }


def to_score(measure: float) -> int:
    """[0, 1] -> 1..10, linearly."""
    return max(1, min(10, round(1 + 9 * measure)))


# ---------------------------------------------------------------------------------- judgements
def judge_scores(question: dict, answer: str, criteria: Sequence[str] = CRITERIA) -> Scores:
    """Scores 1-10 per criterion; a criterion without its own measure gets the mean of all."""
    if not answer.strip():
        return Scores(scores={c: CriterionScore(score=1, justification="empty answer")
                              for c in criteria})
    measures = criterion_measures(question, answer)
    mean = sum(m for m, _ in measures.values()) / len(measures)
    out = {}
    for c in criteria:
        value, why = measures.get(c.lower(), (mean, f"no measure of its own: mean of all "
                                                    f"measures {mean:.2f}"))
        out[c] = CriterionScore(score=to_score(value), justification=f"Offline heuristic: {why}.")
    return Scores(scores=out)


def judge_comparison(question: dict, answer_a: str, answer_b: str,
                     criteria: Sequence[str] = CRITERIA) -> Comparison:
    """Pairwise preference from the two answers' single scores: the higher score wins, equal
    scores tie. It depends on the texts only, so it never has a position bias."""
    a, b = judge_scores(question, answer_a, criteria), judge_scores(question, answer_b, criteria)
    out = {}
    for c in criteria:
        sa, sb = a.scores[c].score, b.scores[c].score
        winner = "A" if sa > sb else "B" if sb > sa else "tie"
        out[c] = CriterionPreference(
            winner=winner, justification=f"Offline heuristic: {c} score A {sa}, B {sb}.")
    return Comparison(preferences=out)


def judge_verdict(question: dict, answer: str) -> Verdict:
    """Accept or reject ``answer`` by overlap with the reference; hints name missing key terms."""
    reference = reference_answer(question)
    terms = key_terms(reference, prompts.format_question(question))
    recall, missing = key_term_recall(answer, terms)
    rouge = rouge_l(answer, reference)
    combined = 0.6 * recall + 0.4 * rouge.f1
    correct = bool(answer.strip()) and recall >= MIN_KEY_RECALL and combined >= MIN_COMBINED
    summary = (f"The answer covers {recall:.0%} of the key terms of a precise answer "
               f"(ROUGE-L F1 {rouge.f1:.2f} against a reference answer).")
    hints = [f"Explain `{t.surface}` and how it applies here." if t.identifier
             else f"Address '{t.surface}': a precise answer relies on it."
             for t in missing[:MAX_HINTS]]
    answer_tokens = tokens(answer)
    if len(answer_tokens) < MIN_WORDS:
        hints.append(f"Give more detail: the answer has only {len(answer_tokens)} words.")
    elif distinct_trigram_ratio(answer_tokens) < 0.5:
        hints.append("Remove the repeated text and say each thing once.")
    if correct:
        feedback = f"Accepted. {summary}"
    else:
        missing_names = ", ".join(t.surface for t in missing[:MAX_HINTS])
        feedback = (f"Not accepted yet. {summary}"
                    + (f" Missing key terms: {missing_names}." if missing_names else ""))
    return Verdict(correct=correct, feedback=feedback, hints=[] if correct else hints)
