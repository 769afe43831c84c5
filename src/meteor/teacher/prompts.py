"""What the teacher and judge are asked: answers (distill), verdicts (refine), scores and pairwise
comparisons (judge), and the re-ask after an invalid JSON reply.

Prompts are data: changing one changes the chat ``messages`` and therefore the teacher cache key
(a changed prompt never replays stale answers). Bump :data:`PROMPT_VERSION` when the meaning of a
prompt changes, so old cache entries and outputs are visibly superseded. ``format_question`` and
``field_of`` are re-exported from :mod:`meteor.prompts` (how a question is shown to any model).
"""

from __future__ import annotations

from meteor.criteria import CRITERIA
from meteor.prompts import expert_system_message, field_of, format_question

__all__ = ["PROMPT_VERSION", "field_of", "format_question", "teacher_answer_messages",
           "verdict_messages", "score_messages", "compare_messages", "json_reask_message"]

PROMPT_VERSION = "v1"


# ------------------------------------------------------------------------ teacher answer (distill)
def teacher_answer_messages(question: dict, guideline: str | None) -> list[dict]:
    """METEOR 1b: a detailed answer following the student's guideline (or none, for the ablation)."""
    if guideline is not None and guideline.strip():
        instruction = (
            f"Answer the following {field_of(question)} question in detail and accurately.\n"
            "Follow the guideline below: cover every point it lists, in a sensible order, and "
            "show the reasoning steps that lead to your answer.\n\n"
            f"Guideline:\n{guideline.strip()}\n\n"
            f"Question:\n{format_question(question)}"
        )
    else:
        instruction = (
            f"Answer the following {field_of(question)} question in detail and accurately, "
            "showing the reasoning steps that lead to your answer.\n\n"
            f"Question:\n{format_question(question)}"
        )
    return [expert_system_message(question), {"role": "user", "content": instruction}]


# --------------------------------------------------------------------------- verdict (refine)
# Formats are templates, not sample values: a sample score would anchor the judge on it.
VERDICT_FORMAT = ('{"correct": <true or false>, "feedback": "<what is wrong or missing>", '
                  '"hints": ["<a concrete pointer>", ...]}')


def verdict_messages(question: dict, student_answer: str) -> list[dict]:
    """METEOR 2: judge a student answer; the reply is a JSON :class:`~meteor.teacher.base.Verdict`."""
    instruction = (
        "A student answered the question below. Decide whether the answer is correct and "
        "complete enough to be accepted. If it is not, explain to the student what is wrong or "
        "missing and give concrete hints to fix it, without writing the answer for them.\n\n"
        f"Question:\n{format_question(question)}\n\n"
        f"Student answer:\n{student_answer.strip()}\n\n"
        "Reply with a single JSON object and nothing else, in this format:\n"
        f"{VERDICT_FORMAT}"
    )
    return [expert_system_message(question), {"role": "user", "content": instruction}]


# ----------------------------------------------------------------------------- score (judge)
CRITERIA_DESCRIPTIONS = {
    "accuracy": "facts, code and reasoning are correct",
    "completeness": "every part of the question is addressed",
    "relevance": "the answer stays on the question asked",
    "coherence": "the answer is well organised and easy to follow",
    "reliability": "claims are justified; no hallucinated APIs or sources",
}


def _criteria_lines(criteria: tuple[str, ...]) -> str:
    return "\n".join(f"- {c}: {CRITERIA_DESCRIPTIONS.get(c, c)}" for c in criteria)


def _judge_conversation(question: dict, instruction: str) -> list[dict]:
    return [
        {"role": "system", "content": "You are an impartial, strict expert judge of answers to "
                                      f"{field_of(question)} questions."},
        {"role": "user", "content": instruction},
    ]


def score_messages(question: dict, answer: str, criteria: tuple[str, ...] = CRITERIA) -> list[dict]:
    """Judge an answer 1-10 on each criterion with a justification; JSON :class:`Scores` reply."""
    lines = _criteria_lines(criteria)
    entries = ", ".join(f'"{c}": {{"score": <integer 1-10>, "justification": "<one or two '
                        f'sentences>"}}' for c in criteria)
    instruction = (
        "Evaluate the answer to the question below. Score it from 1 (very poor) to 10 (excellent) "
        "on each criterion, each with a short justification.\n\n"
        f"Criteria: {', '.join(criteria)}\n{lines}\n\n"
        f"Question:\n{format_question(question)}\n\n"
        f"Answer:\n{answer.strip()}\n\n"
        "Reply with a single JSON object and nothing else, in this format:\n"
        f'{{"scores": {{{entries}}}}}'
    )
    return _judge_conversation(question, instruction)


def compare_messages(question: dict, answer_a: str, answer_b: str,
                     criteria: tuple[str, ...] = CRITERIA) -> list[dict]:
    """Pairwise judgement of two answers (A shown first) per criterion; JSON :class:`Comparison`
    reply. Callers ask both orders to cancel position bias."""
    lines = _criteria_lines(criteria)
    entries = ", ".join(f'"{c}": {{"winner": "<A, B or tie>", "justification": "<one or two '
                        f'sentences>"}}' for c in criteria)
    instruction = (
        "Compare the two answers to the question below. For each criterion say which answer is "
        "better (A or B), or tie when neither is, each with a short justification. Do not let "
        "the order in which the answers are shown or their length influence you.\n\n"
        f"Criteria: {', '.join(criteria)}\n{lines}\n\n"
        f"Question:\n{format_question(question)}\n\n"
        f"Answer A:\n{answer_a.strip()}\n\n"
        f"Answer B:\n{answer_b.strip()}\n\n"
        "Reply with a single JSON object and nothing else, in this format:\n"
        f'{{"preferences": {{{entries}}}}}'
    )
    return _judge_conversation(question, instruction)


# ------------------------------------------------------------------------------- JSON re-ask
def json_reask_message(error: str) -> dict:
    """Follow-up turn when a JSON reply failed validation (the bad reply precedes it)."""
    return {
        "role": "user",
        "content": (
            f"Your reply could not be used: {error}\n"
            "Reply again with only the corrected JSON object, in the requested format."
        ),
    }
