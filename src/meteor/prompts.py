"""Every prompt of the pipeline, in one place.

Prompts are data: changing one changes the chat ``messages`` and therefore the teacher cache key
(a changed prompt never replays stale answers), and this module is a ``dvc.yaml`` dependency of
every stage that prompts, so editing it re-runs exactly those stages. Bump :data:`PROMPT_VERSION`
when the meaning of a prompt changes, so old cache entries and outputs are visibly superseded.

Question records are the scrape rows ``{"id", "category", "title", "question", "answer", ...}``.
The reference ``answer`` is never put into a teacher or judge prompt: the teacher must answer
from its own knowledge, and the judge must not be anchored on Stack Overflow's accepted answer.
"""

from __future__ import annotations

from meteor.teacher.base import CRITERIA

PROMPT_VERSION = "v1"

FIELDS = {
    "ML": "machine learning",
    "DL": "deep learning",
    "NLP": "natural language processing",
    "CV": "computer vision",
}


def field_of(question: dict) -> str:
    """The field of study named in prompts, from the record's category (ML/DL/NLP/CV)."""
    category = question.get("category")
    return FIELDS.get(category, "computer science")


def format_question(question: dict) -> str:
    """Title and body of a question record, as shown to any model."""
    missing = [k for k in ("title", "question") if not isinstance(question.get(k), str)]
    if missing:
        raise ValueError(f"question record id={question.get('id')!r} lacks text field(s) {missing}")
    return f"Title: {question['title'].strip()}\n\n{question['question'].strip()}"


def _system_expert(question: dict) -> dict:
    return {
        "role": "system",
        "content": f"You are an expert in {field_of(question)} and a careful, precise teacher.",
    }


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
    return [_system_expert(question), {"role": "user", "content": instruction}]


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
    return [_system_expert(question), {"role": "user", "content": instruction}]


# ----------------------------------------------------------------------------- score (judge)
CRITERIA_DESCRIPTIONS = {
    "accuracy": "facts, code and reasoning are correct",
    "completeness": "every part of the question is addressed",
    "relevance": "the answer stays on the question asked",
    "coherence": "the answer is well organised and easy to follow",
    "reliability": "claims are justified; no hallucinated APIs or sources",
}


def score_messages(question: dict, answer: str, criteria: tuple[str, ...] = CRITERIA) -> list[dict]:
    """Judge an answer 1-10 on each criterion with a justification; JSON :class:`Scores` reply."""
    lines = "\n".join(f"- {c}: {CRITERIA_DESCRIPTIONS.get(c, c)}" for c in criteria)
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
    return [
        {"role": "system", "content": "You are an impartial, strict expert judge of answers to "
                                      f"{field_of(question)} questions."},
        {"role": "user", "content": instruction},
    ]


def compare_messages(question: dict, answer_a: str, answer_b: str,
                     criteria: tuple[str, ...] = CRITERIA) -> list[dict]:
    """Pairwise judgement of two answers (A shown first) per criterion; JSON :class:`Comparison`
    reply. Callers ask both orders to cancel position bias."""
    lines = "\n".join(f"- {c}: {CRITERIA_DESCRIPTIONS.get(c, c)}" for c in criteria)
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
    return [
        {"role": "system", "content": "You are an impartial, strict expert judge of answers to "
                                      f"{field_of(question)} questions."},
        {"role": "user", "content": instruction},
    ]


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


# ------------------------------------------------------------------ student guideline (METEOR 1a)
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


# --------------------------------------------------------------------- student refine (METEOR 2)
def student_answer_messages(question: dict) -> list[dict]:
    """METEOR 2: the student answers with its reasoning. Refine trains its ``final`` target on
    these same messages, so each in-loop update acts directly on how the student is asked."""
    return [
        {"role": "system", "content": f"You are an expert in {field_of(question)}. Answer the "
                                      "question accurately and show the reasoning steps that "
                                      "lead to your answer."},
        {"role": "user", "content": format_question(question)},
    ]


# An empty answer is rejected without asking the teacher; this is the feedback the student gets.
EMPTY_ANSWER_FEEDBACK = "Your answer was empty. Answer the question, with the reasoning steps."


def feedback_text(feedback: str, hints: list[str]) -> str:
    """A teacher verdict's feedback and hints as one text addressed to the student."""
    text = feedback.strip()
    hints = [h.strip() for h in hints if h.strip()]
    if hints:
        text += "\nHints:\n" + "\n".join(f"- {h}" for h in hints)
    return text


def revision_messages(question: dict, previous_answer: str, feedback: str) -> list[dict]:
    """METEOR 2: revise the previous answer given feedback (the teacher's, or SELF's own critique)."""
    return [
        *student_answer_messages(question),
        {"role": "assistant", "content": previous_answer.strip()},
        {"role": "user", "content": (
            "Your answer was not accepted. Feedback on it:\n"
            f"{feedback.strip()}\n\n"
            "Write a revised, complete answer to the question that fixes these problems, with "
            "the reasoning steps. Reply with the revised answer only.")},
    ]


def self_critique_messages(question: dict, answer: str) -> list[dict]:
    """SELF: the student critiques its own answer (the teacher still decides correctness)."""
    return [
        *student_answer_messages(question),
        {"role": "assistant", "content": answer.strip()},
        {"role": "user", "content": (
            "Review your answer above critically. What is wrong, missing or unclear? Give "
            "feedback and concrete hints to fix it. Do not rewrite the answer.")},
    ]


SELFEE_FEEDBACK = "### Feedback {n}"
SELFEE_REVISION = "### Revision {n}"
REVISION_NEEDED = "Revision is needed."
REVISION_NOT_NEEDED = "Revision is not needed."


def selfee_chain(answers: list[str], feedbacks: list[str], closing_feedback: str | None) -> str:
    """SelFee's training target: answer -> feedback -> revision -> ... -> closing feedback.

    ``feedbacks[i]`` is the feedback on ``answers[i]`` that led to ``answers[i + 1]``, so there is
    one fewer feedback than answers. The chain ends with feedback on the last answer saying that
    no revision is needed, which teaches the model when to stop revising (as in SelFee).
    """
    if not answers or len(feedbacks) != len(answers) - 1:
        raise ValueError(f"a SelFee chain needs n answers and n-1 feedbacks, got {len(answers)} "
                         f"and {len(feedbacks)}")
    parts = [answers[0].strip()]
    for n, (feedback, revision) in enumerate(zip(feedbacks, answers[1:]), start=1):
        parts.append(f"{SELFEE_FEEDBACK.format(n=n)}\n{feedback.strip()}\n{REVISION_NEEDED}")
        parts.append(f"{SELFEE_REVISION.format(n=n)}\n{revision.strip()}")
    closing = f"{closing_feedback.strip()}\n" if closing_feedback and closing_feedback.strip() else ""
    parts.append(f"{SELFEE_FEEDBACK.format(n=len(answers))}\n{closing}{REVISION_NOT_NEEDED}")
    return "\n\n".join(parts)
