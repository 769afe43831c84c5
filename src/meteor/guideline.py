"""METEOR 1a: the student writes, per question, a numbered guideline of what a precise answer needs.

:func:`write_guidelines` builds the chat prompts (:func:`guideline_messages`),
generates them in batches with the student, cleans each output and flags degenerate ones by reason
(:data:`DEGENERATE_REASONS`, checked in that order):

- ``empty``: nothing but whitespace or punctuation;
- ``prompt_echo``: at least half of the output's word 6-grams are copied from the prompt;
- ``repetitive``: the same line again and again, a loop of the same few words (under half of the
  word trigrams distinct), or one word making up over half of the text;
- ``no_numbered_item``: no line of the form ``1. ...`` / ``2) ...``.

A degenerate guideline is still written, with its reason, so no question silently vanishes; the
distill stage then asks the teacher *without* a guideline for it (a junk guideline would only
mislead the teacher).

Questions too long for the student's context are shortened (the body is cut, marked ``[...]``,
the title kept) so that prompt + ``max_new_tokens`` fit; they are counted in the metrics.
"""

from __future__ import annotations

import logging
import re
import statistics
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from meteor.prompts import field_of, format_question
from pydantic import Field

from meteor.params import Section
from meteor.student.generate import (GenerationParams, encode_prompts, generate,
                                     generation_kwargs)
from meteor.student.load import context_length


class GuidelineParams(Section):
    max_new_tokens: int = Field(96, ge=1)
    limit: int | None = Field(None, ge=1, description="Only N train questions, taken in turn from "
                              "each category (debugging, small profiles).")

log = logging.getLogger(__name__)

EMPTY, PROMPT_ECHO, REPETITIVE, NO_NUMBERED_ITEM = "empty", "prompt_echo", "repetitive", "no_numbered_item"
DEGENERATE_REASONS = (EMPTY, PROMPT_ECHO, REPETITIVE, NO_NUMBERED_ITEM)
TRUNCATION_MARK = " [...]"
ECHO_NGRAM = 6

_WORD = re.compile(r"\w+")
_NUMBERED_ITEM = re.compile(r"^\s*(?:[-*]\s*)?\(?\d{1,2}[.)]\s+\w", re.M)
_BLANK_LINES = re.compile(r"\n{3,}")


# ------------------------------------------------------------------------------- post-processing
def clean_guideline(text: str) -> str:
    """Strip outer and trailing whitespace per line and squeeze runs of blank lines."""
    lines = [line.rstrip() for line in text.strip().splitlines()]
    return _BLANK_LINES.sub("\n\n", "\n".join(lines))


def _words(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(text)]


def _ngrams(words: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]


def degenerate_reason(guideline: str, prompt_text: str) -> str | None:
    """Why ``guideline`` is unusable (one of :data:`DEGENERATE_REASONS`), or ``None`` if usable."""
    words = _words(guideline)
    if not words:
        return EMPTY

    grams = _ngrams(words, ECHO_NGRAM)
    if grams:
        prompt_grams = set(_ngrams(_words(prompt_text), ECHO_NGRAM))
        if sum(g in prompt_grams for g in grams) / len(grams) >= 0.5:
            return PROMPT_ECHO

    lines = [line.strip() for line in guideline.splitlines() if line.strip()]
    if len(lines) >= 3 and len(set(lines)) / len(lines) <= 0.5:
        return REPETITIVE
    trigrams = _ngrams(words, 3)
    if len(trigrams) >= 10 and len(set(trigrams)) / len(trigrams) < 0.5:
        return REPETITIVE
    if len(words) >= 8 and Counter(words).most_common(1)[0][1] / len(words) > 0.5:
        return REPETITIVE

    if not _NUMBERED_ITEM.search(guideline):
        return NO_NUMBERED_ITEM
    return None


# ------------------------------------------------------------------------------------ prompts
GUIDELINE_ASPECTS = (
    "the scope of the question: what exactly is asked and what is out of scope",
    "the definitions and concepts the answer must explain",
    "the steps or reasoning that lead to the answer",
    "the pitfalls and common mistakes to warn about",
    "the resources worth citing (documentation, papers, libraries)",
)


def guideline_messages(question: dict) -> list[dict]:
    """METEOR 1a: the student, as an expert of the field, writes a numbered guideline of what a
    precise answer needs. It must *not* answer: the guideline steers the teacher's answer."""
    aspects = "\n".join(f"- {a}" for a in GUIDELINE_ASPECTS)
    instruction = (
        f"Here is a {field_of(question)} question. Do NOT answer it. Instead, write a numbered "
        "guideline (1., 2., 3., ...) of what a precise answer to it needs, covering:\n"
        f"{aspects}\n"
        "Write only the numbered list, one short point per line.\n\n"
        f"Question:\n{format_question(question)}"
    )
    return [
        {"role": "system", "content": f"You are an expert in {field_of(question)}."},
        {"role": "user", "content": instruction},
    ]


def fit_question(question: dict, tokenizer, max_prompt_tokens: int | None) -> tuple[dict, bool]:
    """``question`` with its body cut so that its guideline prompt fits ``max_prompt_tokens``.

    Returns the (possibly shortened) record and whether it was shortened. The title is never cut;
    if the prompt is too long even with an empty body, it is left as is (the model sees it all).
    """
    if max_prompt_tokens is None:
        return question, False

    def length(q: dict) -> int:
        return len(encode_prompts(tokenizer, [guideline_messages(q)])[0])

    if length(question) <= max_prompt_tokens:
        return question, False
    fixed = length({**question, "question": TRUNCATION_MARK})  # everything but the body
    if fixed > max_prompt_tokens:
        log.warning("question id=%s: prompt exceeds %d tokens even without its body; left as is",
                    question.get("id"), max_prompt_tokens)
        return question, False
    body = question["question"]
    keep = len(body)
    while True:  # shrink the body in proportion to its own tokens; converges in a few rounds
        candidate = {**question, "question": body[:keep].rstrip() + TRUNCATION_MARK}
        n = length(candidate)
        if n <= max_prompt_tokens or keep == 0:
            return candidate, True
        ratio = (max_prompt_tokens - fixed) / max(n - fixed, 1)
        keep = min(keep - 1, int(keep * ratio * 0.95))


# ------------------------------------------------------------------------------------- results
@dataclass
class GuidelineRun:
    rows: list[dict]
    degenerate: Counter = field(default_factory=Counter)
    truncated_prompts: int = 0
    token_counts: list[int] = field(default_factory=list)
    seconds: float = 0.0

    def metrics(self, max_new_tokens: int) -> dict:
        words = [len(r["guideline"].split()) for r in self.rows]
        return {
            "count": len(self.rows),
            "usable": sum(r["degenerate"] is None for r in self.rows),
            "degenerate": {reason: self.degenerate[reason] for reason in DEGENERATE_REASONS},
            "degenerate_total": sum(self.degenerate.values()),
            "words": _summary(words),
            # Student tokens of the cleaned text, re-encoded: close to, not exactly, what was
            # generated (junk bytes can re-encode into more tokens).
            "tokens": _summary(self.token_counts),
            "max_new_tokens": max_new_tokens,
            "truncated_prompts": self.truncated_prompts,
            "seconds": round(self.seconds, 1),
        }


def _summary(values: list[int]) -> dict:
    if not values:
        return {"mean": None, "median": None, "min": None, "max": None}
    return {"mean": round(statistics.fmean(values), 1), "median": statistics.median(values),
            "min": min(values), "max": max(values)}


def guideline_row(question: dict, guideline: str, reason: str | None) -> dict:
    return {"id": question["id"], "category": question.get("category"), "title": question["title"],
            "question": question["question"], "guideline": guideline, "degenerate": reason}


def write_guidelines(
    model,
    tokenizer,
    questions: Sequence[dict],
    *,
    generation: GenerationParams,
    max_new_tokens: int,
    progress: bool = True,
) -> GuidelineRun:
    """One guideline row per question, in question order (see the module docstring)."""
    start = time.perf_counter()
    context = context_length(model)
    max_prompt_tokens = context - max_new_tokens if context else None
    fitted = [fit_question(q, tokenizer, max_prompt_tokens) for q in questions]
    conversations = [guideline_messages(q) for q, _ in fitted]
    outputs = generate(model, tokenizer, conversations,
                       **generation_kwargs(generation, max_new_tokens=max_new_tokens),
                       progress="guidelines" if progress else False)

    run = GuidelineRun(rows=[], truncated_prompts=sum(cut for _, cut in fitted))
    for question, conversation, output in zip(questions, conversations, outputs):
        guideline = clean_guideline(output)
        prompt_text = "\n".join(m["content"] for m in conversation)
        reason = degenerate_reason(guideline, prompt_text)
        if reason:
            run.degenerate[reason] += 1
        run.token_counts.append(len(tokenizer.encode(guideline, add_special_tokens=False)))
        run.rows.append(guideline_row(question, guideline, reason))
    run.seconds = time.perf_counter() - start
    if run.degenerate:
        log.warning("%d of %d guidelines are degenerate (%s); distill answers those without one",
                    sum(run.degenerate.values()), len(run.rows), dict(run.degenerate))
    return run
