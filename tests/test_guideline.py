"""The guideline stage: prompts, post-processing, degenerate detection, ids and order kept."""

from __future__ import annotations

import json
import runpy
import shutil
from pathlib import Path

import pytest
import yaml

import meteor.guideline as guideline_lib
from meteor.guideline import (
    DEGENERATE_REASONS,
    clean_guideline,
    degenerate_reason,
    fit_question,
    guideline_messages,
    write_guidelines,
)
from meteor.student.generate import GenerationParams
from meteor.student.generate import encode_prompts
from meteor.student.load import load_student

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = [
    {"id": 30, "category": "CV", "title": "Why are my OpenCV colours wrong?",
     "question": "`cv2.imread` gives blue faces in matplotlib.", "answer": "BGR vs RGB."},
    {"id": 10, "category": "ML", "title": "What does cross-validation estimate?",
     "question": "Is `cross_val_score` the test error?", "answer": "Generalisation error."},
    {"id": 20, "category": "DL", "title": "Why is my loss NaN?",
     "question": "After 3 epochs my PyTorch loss becomes NaN.", "answer": "Learning rate."},
    {"id": 40, "category": "NLP", "title": "Why does BPE split words?",
     "question": "The tokenizer splits 'unhappiness'.", "answer": "Subword units."},
]
GOOD = "1. Scope: what the loss measures\n2. Define NaN and overflow\n3. Steps: lower the learning rate"
GEN = GenerationParams(batch_size=3, max_new_tokens=8)


def prompt_text(question: dict) -> str:
    return "\n".join(m["content"] for m in guideline_messages(question))


def test_prompt_asks_the_field_expert_for_a_numbered_guideline_not_an_answer():
    messages = guideline_messages(QUESTIONS[0])
    assert messages[0] == {"role": "system", "content": "You are an expert in computer vision."}
    user = messages[1]["content"]
    assert "Do NOT answer" in user and "numbered guideline" in user
    for aspect in ("scope", "definitions", "steps", "pitfalls", "resources"):
        assert aspect in user
    assert "Title: Why are my OpenCV colours wrong?" in user and "cv2.imread" in user
    assert "BGR vs RGB" not in user  # the reference answer never reaches the student
    assert "machine learning" in guideline_messages(QUESTIONS[1])[0]["content"]


@pytest.mark.parametrize("text, reason", [
    ("", "empty"),
    ("  \n ... \n", "empty"),
    # copied from the prompt: "Do NOT answer it. Instead, write a numbered guideline ..."
    ("Do NOT answer it. Instead, write a numbered guideline (1., 2., 3., ...) of what a precise "
     "answer to it needs", "prompt_echo"),
    ("1. the loss\n1. the loss\n1. the loss\n1. the loss", "repetitive"),
    ("1. the the the the model the the the the", "repetitive"),
    ("1. learn rate decay learn rate decay learn rate decay learn rate decay learn rate decay",
     "repetitive"),
    ("Lower the learning rate and check the data for NaN values first.", "no_numbered_item"),
    (GOOD, None),
    ("- 1) Scope of the question", None),
])
def test_degenerate_reason(text, reason):
    assert degenerate_reason(clean_guideline(text), prompt_text(QUESTIONS[2])) == reason


def test_clean_guideline_strips_and_squeezes_blank_lines():
    assert clean_guideline("\n\n  1. a   \n\n\n\n2. b  \n") == "1. a\n\n2. b"


def test_long_question_is_cut_to_fit_the_context(tiny_model_dir):
    _, tokenizer = load_student(tiny_model_dir)

    def length(q: dict) -> int:
        return len(encode_prompts(tokenizer, [guideline_messages(q)])[0])

    budget = length({**QUESTIONS[1], "question": ""}) + 60  # room for part of the body
    long = {**QUESTIONS[1], "question": "Why does the validation error rise? " * 200}
    fitted, cut = fit_question(long, tokenizer, max_prompt_tokens=budget)
    assert cut and budget - 60 < length(fitted) <= budget
    assert fitted["title"] == long["title"] and fitted["question"].endswith("[...]")
    same, cut = fit_question(QUESTIONS[1], tokenizer, max_prompt_tokens=budget)
    assert not cut and same == QUESTIONS[1]
    # Too small for even the title and instructions: left whole rather than mangled.
    same, cut = fit_question(long, tokenizer, max_prompt_tokens=10)
    assert not cut and same == long


def test_rows_keep_ids_and_order_and_never_echo_the_prompt(tiny_model_dir):
    """The untrained model writes junk (greedy: only newlines), so sample to get some text."""
    model, tokenizer = load_student(tiny_model_dir)
    sampling = GenerationParams(batch_size=3, max_new_tokens=8, do_sample=True, seed=0)
    run = write_guidelines(model, tokenizer, QUESTIONS, generation=sampling, max_new_tokens=8,
                           progress=False)
    assert [r["id"] for r in run.rows] == [q["id"] for q in QUESTIONS]
    assert any(r["guideline"] for r in run.rows)  # otherwise the echo check below is vacuous
    again = write_guidelines(model, tokenizer, QUESTIONS, generation=sampling, max_new_tokens=8,
                             progress=False)
    assert again.rows == run.rows  # seeded: the same guidelines every run
    for row, q in zip(run.rows, QUESTIONS):
        assert set(row) == {"id", "category", "title", "question", "guideline", "degenerate"}
        assert (row["title"], row["question"], row["category"]) == (q["title"], q["question"],
                                                                    q["category"])
        assert "Do NOT answer" not in row["guideline"] and q["title"] not in row["guideline"]
        assert row["degenerate"] in (None, *DEGENERATE_REASONS)
    metrics = run.metrics(8)
    assert metrics["count"] == 4
    assert metrics["usable"] + metrics["degenerate_total"] == 4
    assert sum(metrics["degenerate"].values()) == metrics["degenerate_total"]
    assert set(metrics["degenerate"]) == set(DEGENERATE_REASONS)
    assert [n > 0 for n in run.token_counts] == [bool(r["guideline"]) for r in run.rows]


def test_degenerate_outputs_are_kept_and_counted_by_reason(tiny_model_dir, monkeypatch):
    """With a fake generator: echoes, junk and a good guideline, all rows kept with reasons."""
    model, tokenizer = load_student(tiny_model_dir)
    replies = iter([
        "\n".join(m["content"] for m in guideline_messages(QUESTIONS[0]))[:400],  # echo
        "",
        GOOD,
        "ok ok ok ok ok ok ok ok ok ok",
    ])
    monkeypatch.setattr(guideline_lib, "generate",
                        lambda model, tok, convs, **kw: [next(replies) for _ in convs])
    run = write_guidelines(model, tokenizer, QUESTIONS, generation=GEN, max_new_tokens=8,
                           progress=False)
    assert [r["degenerate"] for r in run.rows] == ["prompt_echo", "empty", None, "repetitive"]
    assert run.rows[2]["guideline"] == GOOD
    assert run.metrics(8)["degenerate"] == {"empty": 1, "prompt_echo": 1, "repetitive": 1,
                                            "no_numbered_item": 0}


def test_stage_writes_rows_and_metrics(tiny_model_dir, tmp_path, monkeypatch):
    shutil.copytree(tiny_model_dir, tmp_path / "models" / "base")
    (tmp_path / "data" / "scraped").mkdir(parents=True)
    (tmp_path / "data" / "scraped" / "train.jsonl").write_text(
        "".join(json.dumps(q) + "\n" for q in QUESTIONS))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(
        {"generation": {"batch_size": 2, "max_new_tokens": 8},
         "guideline": {"max_new_tokens": 6, "limit": 3}}))
    monkeypatch.chdir(tmp_path)
    metrics = runpy.run_path(str(ROOT / "stages" / "guideline.py"))["main"]()
    rows = [json.loads(line) for line in (tmp_path / "data" / "guidelines.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [30, 10, 20]  # the limit keeps the first 3, in order
    written = json.loads((tmp_path / "metrics" / "guideline.json").read_text())
    assert written == metrics and written["count"] == 3 and written["max_new_tokens"] == 6
    assert {"words", "tokens", "degenerate", "usable", "seconds", "truncated_prompts"} <= set(written)
