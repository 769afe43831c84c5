"""The refine stage's student prompts (METEOR 2, SelFee, SELF): revision given feedback, the
student's self-critique, and SelFee's answer -> feedback -> revision chains.

:func:`student_answer_messages` (the first turn of each) is re-exported from
:mod:`meteor.prompts`, so refine finds every prompt it uses here.
"""

from __future__ import annotations

from meteor.prompts import student_answer_messages

__all__ = ["student_answer_messages", "EMPTY_ANSWER_FEEDBACK", "feedback_text", "revision_messages",
           "self_critique_messages", "SELFEE_FEEDBACK", "SELFEE_REVISION", "REVISION_NEEDED",
           "REVISION_NOT_NEEDED", "selfee_chain"]

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
