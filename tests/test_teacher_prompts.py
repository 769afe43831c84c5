"""Teacher and judge prompts: what goes in, and what must never go in."""

from __future__ import annotations

import json

import pytest

from meteor.teacher import prompts

QUESTION = {"id": 42, "category": "NLP", "title": "Why pad on the left?",
            "question": "Batched generation gives garbage with right padding.",
            "answer": "REFERENCE: decoder-only models continue from the last token."}


def all_text(messages: list[dict]) -> str:
    return json.dumps(messages)


@pytest.mark.parametrize("messages", [
    prompts.teacher_answer_messages(QUESTION, "1. explain padding\n2. show the fix"),
    prompts.teacher_answer_messages(QUESTION, None),
    prompts.verdict_messages(QUESTION, "Because of attention masks."),
    prompts.score_messages(QUESTION, "Because of attention masks."),
])
def test_prompts_carry_the_question_but_never_the_reference_answer(messages):
    text = all_text(messages)
    assert "Why pad on the left?" in text and "garbage with right padding" in text
    assert "REFERENCE" not in text
    assert "natural language processing" in text
    assert [m["role"] for m in messages] == ["system", "user"]


def test_guideline_is_followed_only_when_given():
    with_guideline = all_text(prompts.teacher_answer_messages(QUESTION, "1. explain padding"))
    without = all_text(prompts.teacher_answer_messages(QUESTION, None))
    blank = all_text(prompts.teacher_answer_messages(QUESTION, "  "))
    assert "1. explain padding" in with_guideline and "Guideline" in with_guideline
    assert "Guideline" not in without and blank == without


def test_structured_prompts_ask_for_json_with_every_criterion():
    verdict = all_text(prompts.verdict_messages(QUESTION, "my answer"))
    assert "my answer" in verdict and "JSON" in verdict and '\\"correct\\"' in verdict
    score = prompts.score_messages(QUESTION, "my answer", ("accuracy", "relevance"))[1]["content"]
    assert "Criteria: accuracy, relevance" in score and "completeness" not in score


def test_a_record_without_text_is_named():
    with pytest.raises(ValueError, match=r"id=7 .*'title'"):
        prompts.teacher_answer_messages({"id": 7, "category": "ML", "question": "body"}, None)
