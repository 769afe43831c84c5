"""The student's core prompts, shared by every stage that asks the student or shows it a question.

Prompts live with the stage that uses them, so editing one re-runs only that stage in `dvc repro`
(each module is a ``dvc.yaml`` dependency of exactly the stages that import it):

- here: how a question is shown (:func:`format_question`, :func:`field_of`), the expert system
  prompt, and the student's answer prompt (:func:`student_answer_messages`, also the training
  prompt of sft and refine);
- :mod:`meteor.guideline`: the guideline prompt (METEOR 1a);
- :mod:`meteor.refine_prompts`: revision, self-critique and SelFee chains (METEOR 2);
- :mod:`meteor.teacher.prompts`: everything the teacher and judge are asked (answers, verdicts,
  scores, pairwise comparisons, JSON re-asks) and ``PROMPT_VERSION``, part of the cache key.

Question records are the scrape rows ``{"id", "category", "title", "question", "answer", ...}``.
The reference ``answer`` is never put into a teacher or judge prompt: the teacher must answer
from its own knowledge, and the judge must not be anchored on Stack Overflow's accepted answer.
"""

from __future__ import annotations

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


def expert_system_message(question: dict) -> dict:
    """The system turn that casts the model as an expert teacher of the question's field."""
    return {
        "role": "system",
        "content": f"You are an expert in {field_of(question)} and a careful, precise teacher.",
    }


# ---------------------------------------------------------------- student answer (refine, sft, ...)
def student_answer_messages(question: dict) -> list[dict]:
    """METEOR 2: the student answers with its reasoning. Refine trains its ``final`` target on
    these same messages, so each in-loop update acts directly on how the student is asked."""
    return [
        {"role": "system", "content": f"You are an expert in {field_of(question)}. Answer the "
                                      "question accurately and show the reasoning steps that "
                                      "lead to your answer."},
        {"role": "user", "content": format_question(question)},
    ]
