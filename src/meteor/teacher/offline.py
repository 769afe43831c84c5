"""The ``offline`` teacher/judge: a deterministic, reference-grounded heuristic stand-in.

**This is not a model.** It cannot reason, write new text or recognise a correct paraphrase. It
lets the whole pipeline run with no network and no keys (CI, a fresh laptop) by leaning on the
accepted Stack Overflow answer that every question record carries (``question["answer"]``):

- ``answer``: the reference answer itself. Given a guideline with numbered points, the reference's
  paragraphs (each with the code blocks and lists that follow it) are regrouped under the
  guideline's points by word overlap, after a short "approach" preface listing the points; a
  closing summary stays last; points the reference does not address are named at the end instead
  of being filled with invented text. Without a
  guideline (or one without numbered points) the reference is returned unchanged.
- ``verdict``: overlap with the reference. *Key terms* are the reference's most specific words and
  code identifiers, ranked by a tf-idf-like weight computed over the reference's own sentences
  (frequent in the answer, concentrated in few sentences, identifiers up-weighted, words already
  in the question down-weighted, stop words dropped). An answer is accepted when its weighted
  key-term recall is at least :data:`MIN_KEY_RECALL` and ``0.6 * recall + 0.4 * ROUGE-L F1`` is at
  least :data:`MIN_COMBINED`; the hints name the missing key terms. ROUGE-L is
  :func:`meteor.textmetrics.rouge_l` (the ``rouge-score`` package), the one the evaluate stage
  reports too.
- ``score``: each criterion from one reference-based measure, mapped linearly onto 1-10, with a
  justification naming the measure (see :func:`criterion_measures`).

Because the judge measures agreement with the reference, it cannot reward organisation: in the
distill ablation, a guideline-shaped answer (the same content plus headings, reordered) scores a
little *below* the bare reference. Only a model judge can measure what a guideline adds.

An item whose question has no reference answer, or whose answer to judge is not text, fails alone
(:class:`MissingText`, reported as that item's error); any other exception is a bug and propagates.

Everything is computed from the texts alone: the same inputs always give the same outputs, and a
result never depends on the other items of the batch. There is no cache (``cache_hits`` stays 0)
and no cost. ``calls`` counts items processed; tokens are *estimated as whitespace-separated
words* of the prompt :mod:`meteor.prompts` would send and of the reply, so the accounting has the
same shape as the real backends'.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from tqdm.auto import tqdm

from meteor.teacher import prompts
from meteor.params import TeacherParams
from meteor.teacher.base import (
    CRITERIA,
    Comparison,
    CriterionPreference,
    CriterionScore,
    Scores,
    Teacher,
    TeacherResult,
    TeacherStats,
    Verdict,
)
from meteor.textmetrics import rouge_l

log = logging.getLogger(__name__)

MAX_KEY_TERMS = 8
MAX_HINTS = 5
MIN_KEY_RECALL = 0.5  # verdict: at least half of the weighted key terms ...
MIN_COMBINED = 0.4  # ... and 0.6 * recall + 0.4 * ROUGE-L F1 at least this
MIN_WORDS = 20  # below this an answer is too short to be well organised (coherence)
HEADING_CHARS = 80

# Words that carry no topic: English function words plus filler common in Stack Overflow answers.
STOPWORDS = frozenset("""
a about above after again against all almost also although always am among an and another any
anything are aren around as at away back be because been before being below besides best better
between both but by can cannot could couldn did didn do does doesn doing don done down during each
either else enough etc even ever every example first for from further get gets getting give given
gives go goes going good got had has hasn have having he her here hers him his how however i if
in instead into is isn it its itself just keep know last least less let like likely look lot made
make makes making many may maybe me might more most much must my need needs neither never new next
no non none nor not nothing now of off often on once one only or other others otherwise our out
over own part per perhaps please point pretty probably put quite rather really right said same say
see seem seems several shall she should shouldn show simply since so some something sometimes
still such sure take than thank thanks that the their them then there therefore these they thing
things think this those though through thus to too try trying two under unless until up upon us
use used useful uses using usually very via want wants was wasn way ways we well were weren what
whatever when where whether which while who whole whom whose why will with within without won
work works would wouldn yes yet you your yours e.g i.e vs
high higher low lower large larger small smaller big bigger become becomes became usual often
different differently important simple easy hard fine wrong clear clearly actually basically
exactly directly typically especially mean means below above instead rough roughly
""".split())

_TOKEN = re.compile(r"[A-Za-z0-9]+(?:[_.][A-Za-z0-9]+)*")
_INLINE_CODE = re.compile(r"`([^`\n]+)`")
_FENCED_CODE = re.compile(r"```.*?(?:```|\Z)", re.S)
_CAMEL = re.compile(r"[a-z][A-Z]|[A-Z]{2,}[a-z]")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")
_NUMBERED = re.compile(r"^\s*(?:[-*]\s*)?\(?(\d{1,2})[.):]\s+(.+?)\s*$")
_MARKDOWN_NOISE = re.compile(r"[*_`#>]+")
_CONCLUSION = re.compile(r"^\W*(?:summary|in summary|in short|tl;?dr|to sum up|bottom line)\b", re.I)


# ------------------------------------------------------------------------------- text measures
def tokens(text: str) -> list[str]:
    """Normalised word tokens: lower-cased; ``max_depth`` and ``torch.no_grad`` stay one token."""
    return [t.lower() for t in _TOKEN.findall(text)]


def stem(token: str) -> str:
    """A deliberately tiny stemmer: plural ``s`` only, and never inside identifiers or numbers."""
    if (len(token) > 3 and token.endswith("s") and not token.endswith(("ss", "us", "is"))
            and token.isalpha()):
        return token[:-1]
    return token


def is_content(token: str) -> bool:
    return len(token) >= 3 and not token.isdigit() and token not in STOPWORDS


def content_stems(text: str) -> list[str]:
    return [stem(t) for t in tokens(text) if is_content(t)]


def is_identifier(surface: str) -> bool:
    """Looks like code: ``snake_case``, ``dotted.name``, ``camelCase`` or mixed letters and digits."""
    return ("_" in surface or "." in surface or bool(_CAMEL.search(surface))
            or (any(c.isdigit() for c in surface) and any(c.isalpha() for c in surface)))


def distinct_trigram_ratio(toks: Sequence[str]) -> float:
    """Share of distinct word trigrams: 1.0 for text that never repeats itself."""
    grams = [tuple(toks[i:i + 3]) for i in range(len(toks) - 2)]
    return len(set(grams)) / len(grams) if grams else 0.0


# ---------------------------------------------------------------------------------- key terms
@dataclass(frozen=True)
class KeyTerm:
    stem: str  # what is matched against an answer's stems
    surface: str  # how it is written in the reference (for hints)
    weight: float
    identifier: bool


def key_terms(reference: str, question_text: str = "", k: int = MAX_KEY_TERMS) -> list[KeyTerm]:
    """The ``k`` most specific terms of ``reference``, by a tf-idf-like weight over its sentences.

    ``tf`` counts occurrences (half weight inside fenced code, which is mostly boilerplate) and
    enters sublinearly (``1 + log tf``) so one word repeated everywhere does not crowd out the
    rest; ``idf = log(1 + sentences / sentences containing the term)``; identifiers (inline code,
    snake_case, dotted or camelCase names) weigh 1.5x; terms already in the question weigh 0.5x,
    since restating the question is not answering it. Ties break alphabetically (deterministic).
    """
    fenced = " ".join(_FENCED_CODE.findall(reference))
    prose = _FENCED_CODE.sub(" ", reference)
    inline_code = {t.lower() for span in _INLINE_CODE.findall(prose) for t in _TOKEN.findall(span)}
    question_stems = set(content_stems(question_text))

    tf: Counter = Counter()
    surface: dict[str, str] = {}
    identifier: dict[str, bool] = {}
    for text, weight in ((prose, 1.0), (fenced, 0.5)):
        for raw in _TOKEN.findall(text):
            low = raw.lower()
            if not is_content(low):
                continue
            s = stem(low)
            tf[s] += weight
            surface.setdefault(s, raw)
            identifier[s] = identifier.get(s, False) or is_identifier(raw) or low in inline_code

    sentences = [s for s in _SENTENCE_END.split(prose) if s.strip()] or [prose]
    df: Counter = Counter()
    for sentence in sentences:
        df.update(set(content_stems(sentence)))

    scored = []
    for s, count in tf.items():
        idf = math.log(1 + len(sentences) / max(df[s], 1))  # code-only terms: rarest (df 1)
        weight = ((1 + math.log(count)) * idf * (1.5 if identifier[s] else 1.0)
                  * (0.5 if s in question_stems else 1.0))
        scored.append(KeyTerm(s, surface[s], max(weight, 0.0), identifier[s]))
    scored.sort(key=lambda t: (-t.weight, t.stem))
    return scored[:k]


def key_term_recall(answer: str, terms: Sequence[KeyTerm]) -> tuple[float, list[KeyTerm]]:
    """Weighted share of ``terms`` present in ``answer``, and the missing ones (heaviest first)."""
    if not terms:
        return 1.0, []
    present = set(content_stems(answer))
    missing = [t for t in terms if t.stem not in present]
    total = sum(t.weight for t in terms)
    return 1.0 - sum(t.weight for t in missing) / total, missing


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
    reference = _reference(question)
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

    specific = [t for t in answer_tokens if is_identifier(t) or _is_specific_number(t)]
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


def _is_specific_number(token: str) -> bool:
    """A number that states a fact (``0.72``, ``512``), not a list or section number (``3``)."""
    return token.replace(".", "").isdigit() and len(token) >= 2


def to_score(measure: float) -> int:
    """[0, 1] -> 1..10, linearly."""
    return max(1, min(10, round(1 + 9 * measure)))


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
    reference = _reference(question)
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


# ------------------------------------------------------------------------ guideline-shaped answer
def guideline_points(guideline: str) -> list[str]:
    """The numbered points of a guideline (``1. ...``, ``2) ...``), markdown stripped."""
    points = []
    for line in guideline.splitlines():
        m = _NUMBERED.match(line)
        if m:
            text = " ".join(_MARKDOWN_NOISE.sub("", m.group(2)).split()).rstrip(":")
            if text:
                points.append(text)
    return points


def _units(reference: str) -> list[str]:
    """Paragraphs of the reference, each with the code blocks (and lists) that follow it.

    Blank lines inside fenced code do not split it.
    """
    blocks: list[str] = []
    current: list[str] = []
    in_fence = False
    for line in reference.splitlines():
        if line.strip().startswith("```"):
            in_fence = not in_fence
        if not line.strip() and not in_fence:
            if current:
                blocks.append("\n".join(current))
                current = []
            continue
        current.append(line)
    if current:
        blocks.append("\n".join(current))

    units: list[str] = []
    for block in blocks:
        first = block.lstrip()
        attaches = first.startswith(("```", "    ", "- ", "* ", "|")) or bool(re.match(r"\d+\. ", first))
        if units and attaches:  # code or a list belongs with the paragraph that introduces it
            units[-1] += "\n\n" + block
        else:
            units.append(block)
    return units


def _heading(point: str) -> str:
    if len(point) <= HEADING_CHARS:
        return point
    return point[:HEADING_CHARS].rsplit(" ", 1)[0] + " ..."


def shape_by_guideline(reference: str, guideline: str | None) -> str:
    """The reference regrouped under the guideline's numbered points (see the module docstring)."""
    points = guideline_points(guideline) if guideline else []
    units = _units(reference.strip())
    if not points or not units:
        return reference.strip()

    # A closing summary stays last instead of being filed under one of the points.
    closing = [k for k, u in enumerate(units) if k > 0 and _CONCLUSION.match(u)]
    conclusion = [units[k] for k in closing]
    units = [u for k, u in enumerate(units) if k not in closing]

    # Shared words weigh 1 / (paragraphs containing them): a word found in every paragraph
    # ("model") says nothing about where a paragraph belongs; a rare one ("pitfall") does.
    unit_stems = [set(content_stems(u)) for u in units]
    unit_df = Counter(s for stems in unit_stems for s in stems)
    point_stems = [set(content_stems(p)) for p in points]
    assigned: list[int] = []
    for stems in unit_stems:
        overlaps = [sum(1 / unit_df[s] for s in stems & ps) for ps in point_stems]
        best = max(range(len(points)), key=lambda i: (overlaps[i], -i))
        if overlaps[best] == 0:  # no shared word: stay with the previous paragraph's point
            best = assigned[-1] if assigned else 0
        assigned.append(best)

    used = sorted(set(assigned))
    preface = ("**Approach.** A precise answer needs: "
               + "; ".join(f"({i + 1}) {p[0].lower() + p[1:]}" for i, p in enumerate(points))
               + ". I take these points in order.")
    sections = [preface]
    for i in used:
        body = "\n\n".join(u for u, a in zip(units, assigned) if a == i)
        sections.append(f"### {i + 1}. {_heading(points[i])}\n\n{body}")
    sections += conclusion
    uncovered = [str(i + 1) for i in range(len(points)) if i not in used]
    if uncovered:
        sections.append(f"_Guideline point(s) {', '.join(uncovered)} are not addressed here._")
    return "\n\n".join(sections)


# ----------------------------------------------------------------------------------- teacher
class MissingText(ValueError):
    """An item lacks a text the offline teacher needs: that item fails, the batch goes on."""


def _reference(question: dict) -> str:
    reference = question.get("answer")
    if not isinstance(reference, str) or not reference.strip():
        raise MissingText(f"question id={question.get('id')!r} has no reference 'answer': the "
                          "offline teacher needs the accepted answer of each question")
    return reference


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
            lambda q, g: shape_by_guideline(_reference(q), g),
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
