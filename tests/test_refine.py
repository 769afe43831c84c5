"""Refine (METEOR 2): attempts and revisions, in-loop updates, keep_failed, SelFee chain, SELF
feedback, bad input, and a re-run that retraces the same trajectory from the teacher cache.

The student is the tiny untrained Llama of ``tiny_model_dir``; a scripted teacher decides exactly
which attempt is accepted. Spies on ``meteor.refine.generate`` / ``meteor.refine.train`` see what
the student was asked, with which weights, and what each update trained on.
"""

from __future__ import annotations

import json
import re
import runpy
from pathlib import Path

import pytest
import torch
import yaml
from fake_openai_server import FakeOpenAIServer
from transformers import AutoModelForCausalLM, AutoTokenizer

import meteor.refine as refine_mod
from meteor import refine_prompts as prompts
from meteor.refine import RefineParams
from meteor.student.generate import GenerationParams
from meteor.teacher.config import TeacherParams
from meteor.refine import (RefineInput, final_revision, refine, refine_inputs, training_example,
                           weight_fingerprint)
from meteor.student.generate import encode_prompts
from meteor.student.load import prepare_tokenizer_for_generation
from meteor.teacher.base import Teacher, TeacherResult, TeacherStats, Verdict
from meteor.teacher.chat import ChatTeacher
from meteor.teacher.openai_backend import OpenAIBackend
from meteor.training.lora import make_trainable, save_trained

REPO = Path(__file__).resolve().parents[1]
GENERATION = GenerationParams(batch_size=8, max_new_tokens=4)
LORA = {"r": 4, "alpha": 8, "dropout": 0.0}


def refine_params(**overrides) -> RefineParams:
    base = dict(max_iterations=2, fine_tune_interval=2, max_new_tokens=4, keep_failed="drop",
                train=dict(epochs=1, batch_size=2, lr=1e-2, warmup_ratio=0.0, max_seq_len=256,
                           lora=LORA))
    return RefineParams.model_validate({**base, **overrides})


def make_question(i: int) -> dict:
    return {"id": 100 + i, "category": ("ML", "DL", "NLP", "CV")[i % 4],
            "title": f"Question {i} about gradient descent",
            "question": f"Why does the loss of model {i} go down?",
            "answer": f"Reference answer {i}: the gradient points uphill, so step against it."}


def make_inputs(n: int) -> list[RefineInput]:
    return [RefineInput(make_question(i), f"Teacher answer {i}.") for i in range(n)]


class ScriptedTeacher(Teacher):
    """Verdicts from a script: per question id, one entry per attempt: True (accept), False
    (reject with feedback FIX-<id>-<attempt>) or "error" (no verdict). Missing entries accept."""

    name = "scripted:test"

    def __init__(self, script: dict[int, list]):
        self.script = script
        self.stats = TeacherStats()
        self.asked: list[tuple[int, str]] = []  # (question id, answer) per verdict request

    def verdict(self, questions, answers):
        results = []
        for q, a in zip(questions, answers):
            attempt = sum(qid == q["id"] for qid, _ in self.asked)
            self.asked.append((q["id"], a))
            self.stats.calls += 1
            plan = self.script.get(q["id"], [])
            step = plan[attempt] if attempt < len(plan) else True
            if step == "error":
                self.stats.failures += 1
                results.append(TeacherResult(ok=False,
                                             error="invalid JSON after 3 replies: correct"))
                continue
            verdict = Verdict(correct=step,
                              feedback="Accepted." if step else f"FIX-{q['id']}-{attempt}",
                              hints=[] if step else [f"hint-{q['id']}"])
            results.append(TeacherResult(ok=True, text=verdict.model_dump_json(), parsed=verdict))
        return results

    def answer(self, questions, guidelines):
        raise NotImplementedError

    def score(self, questions, answers, criteria=()):
        raise NotImplementedError

    def compare(self, questions, answers_a, answers_b, criteria=()):
        raise NotImplementedError


# ------------------------------------------------------------------------------------ students
@pytest.fixture
def tokenizer(tiny_model_dir):
    return prepare_tokenizer_for_generation(AutoTokenizer.from_pretrained(tiny_model_dir))


def silence_blank_tokens(model, tokenizer) -> None:
    """The untrained tiny model greedily writes only newlines (empty after stripping). Zeroing the
    (tied) embeddings of every token that decodes to blank text makes it write words instead."""
    blank = [i for i in range(len(tokenizer))
             if not tokenizer.decode([i], skip_special_tokens=True).strip()]
    with torch.no_grad():
        model.get_input_embeddings().weight[blank] = 0.0


@pytest.fixture
def student(tiny_model_dir, tokenizer):
    """A LoRA-wrapped tiny student that writes non-empty answers."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    silence_blank_tokens(model, tokenizer)
    return make_trainable(model, refine_params().train.lora, seed=0)


@pytest.fixture
def spy(monkeypatch):
    """Record every generate call (conversations, outputs, trainable-weight fingerprint) and every
    update's training examples, while still running the real functions."""
    calls = {"generate": [], "train": []}
    real_generate, real_train = refine_mod.generate, refine_mod.train

    def generate(model, tokenizer, conversations, **kwargs):
        outputs = real_generate(model, tokenizer, conversations, **kwargs)
        calls["generate"].append({"conversations": conversations, "outputs": outputs,
                                  "weights": weight_fingerprint(model)})
        return outputs

    def train(model, tokenizer, examples, params, **kwargs):
        result = real_train(model, tokenizer, examples, params, **kwargs)
        calls["train"].append({"examples": examples, "steps": result.steps})
        return result

    monkeypatch.setattr(refine_mod, "generate", generate)
    monkeypatch.setattr(refine_mod, "train", train)
    return calls


def user_turns(conversation: list[dict]) -> list[str]:
    return [m["content"] for m in conversation if m["role"] == "user"]


# ------------------------------------------------------------------------------------ inputs
def test_inputs_join_train_by_id_and_count_skipped_rows():
    train = [make_question(i) for i in range(4)]
    distilled = [{"id": 100, "answer": "A0", "ok": True},
                 {"id": 101, "answer": None, "ok": False},
                 {"id": 102, "answer": "  ", "ok": True},
                 {"id": 103, "answer": "A3", "ok": True}]
    inputs, skipped = refine_inputs(distilled, train)
    assert [(i.question["id"], i.teacher_answer) for i in inputs] == [(100, "A0"), (103, "A3")]
    assert inputs[0].question["answer"].startswith("Reference answer 0")  # for the offline teacher
    assert skipped == {"not_ok": 1, "no_answer": 1}
    assert len(refine_inputs(distilled, train, limit=1)[0]) == 1
    with pytest.raises(ValueError, match=r"not in the train split \(e.g. \[999\]\)"):
        refine_inputs([{"id": 999, "answer": "A", "ok": True}], train)
    with pytest.raises(ValueError, match="duplicate question id 100"):
        refine_inputs(distilled, train + [make_question(0)])


def test_empty_data_is_a_clear_error(student, tokenizer):
    with pytest.raises(ValueError, match="no questions to refine"):
        refine(student, tokenizer, ScriptedTeacher({}), [], refine_params(), GENERATION)


def test_questions_too_long_are_skipped_and_counted(student, tokenizer):
    inputs = make_inputs(3)
    long_q = {**inputs[1].question, "question": "overfitting " * 300}
    inputs[1] = RefineInput(long_q, "T")
    run = refine(student, tokenizer, ScriptedTeacher({}), inputs,
                 refine_params(fine_tune_interval=5), GENERATION)
    assert [r["id"] for r in run.rows] == [100, 102]
    assert run.skipped["too_long"] == 1
    with pytest.raises(ValueError, match="all 1 questions are too long"):
        refine(student, tokenizer, ScriptedTeacher({}), [RefineInput(long_q, "T")],
               refine_params(), GENERATION)


def test_revision_prompts_are_shortened_to_fit_the_context_or_stop(student, tokenizer, spy):
    class VerboseTeacher(ScriptedTeacher):
        def verdict(self, questions, answers):
            results = super().verdict(questions, answers)
            for r in results:
                if not r.parsed.correct:  # feedback far longer than the 512-token context
                    r.parsed = r.parsed.model_copy(update={"feedback": "learning rate " * 400})
            return results

    def answer_prompt_tokens(q):
        return len(encode_prompts(tokenizer, [prompts.student_answer_messages(q)])[0])

    crowded = {**make_question(1), "question": ""}  # an answer prompt that nearly fills the context
    while answer_prompt_tokens(crowded) < 480:
        crowded["question"] += "overfitting "
    inputs = [make_inputs(1)[0], RefineInput(crowded, "Teacher answer 1.")]
    teacher = VerboseTeacher({100: [False, True], 101: [False, True]})
    params = refine_params(fine_tune_interval=5, keep_failed="last",
                           train={**refine_params().train.model_dump(), "max_seq_len": 1024})
    run = refine(student, tokenizer, teacher, inputs, params, GENERATION)

    shortened, stopped = run.rows
    assert shortened["passed_at"] == 2 and shortened["attempts"][0]["revision_prompt_shortened"]
    assert shortened["attempts"][0]["feedback"].startswith("learning rate " * 399)  # recorded whole
    revision = spy["generate"][1]["conversations"][0]
    assert "[...]" in revision[-1]["content"]
    assert len(encode_prompts(tokenizer, [revision])[0]) + params.max_new_tokens <= 512
    assert stopped["stopped_by_context"] and len(stopped["attempts"]) == 1
    assert stopped["outcome"] == "kept_last" and stopped["attempts"][0]["feedback"] is None
    metrics = run.metrics(2)
    assert metrics["revision_prompts_shortened"] == 1 and metrics["stopped_by_context"] == 1


# --------------------------------------------------------------------------- attempts / revision
def test_accepted_on_second_attempt_revises_with_the_teachers_feedback(student, tokenizer, spy):
    teacher = ScriptedTeacher({100: [False, True]})
    run = refine(student, tokenizer, teacher, make_inputs(1),
                 refine_params(max_iterations=3, fine_tune_interval=5), GENERATION)

    row = run.rows[0]
    assert row["passed"] is True and row["passed_at"] == 2 and row["outcome"] == "passed"
    first, second = row["attempts"]
    assert first["verdict"] == {"correct": False, "feedback": "FIX-100-0", "hints": ["hint-100"]}
    assert first["feedback"] == "FIX-100-0\nHints:\n- hint-100"
    assert second["verdict"]["correct"] is True and second["feedback"] is None
    assert row["final_answer"] == second["answer"] and row["source"] == "student"
    assert teacher.asked == [(100, first["answer"]), (100, second["answer"])]

    # The revision prompt holds the question, the previous answer and the feedback with hints.
    assert len(spy["generate"]) == 2  # accepted at attempt 2: no third generation
    revision = spy["generate"][1]["conversations"][0]
    assert revision[:2] == prompts.student_answer_messages(make_question(0))
    assert revision[2] == {"role": "assistant", "content": first["answer"]}
    assert "FIX-100-0" in revision[3]["content"] and "hint-100" in revision[3]["content"]
    assert run.metrics(3)["pass_rate_by_iteration"] == {"iter_1": 0.0, "iter_2": 1.0, "iter_3": 1.0}


def expected_updates(script: dict[int, list], n: int, interval: int) -> list[int | None]:
    """One question at a time: the update index each question's row is trained in."""
    update, pending, out = 0, [], []
    for i in range(n):
        out.append(None)
        if script.get(100 + i, [True])[0] is True:
            pending.append(i)
        if len(pending) == interval:
            update += 1
            for j in pending:
                out[j] = update
            pending = []
    return out


def test_updates_fire_exactly_at_multiples_of_the_interval_and_change_the_student(
        student, tokenizer, spy):
    script = {101: [False], 105: [True]}  # every other question passes at once
    teacher = ScriptedTeacher(script)
    run = refine(student, tokenizer, teacher, make_inputs(6),
                 refine_params(max_iterations=1, fine_tune_interval=2), GENERATION)

    updates = [r["update"] for r in run.rows]
    assert updates == expected_updates(script, 6, 2) == [1, None, 1, 2, 2, None]
    # Groups are sized by the rows still missing before the next update.
    assert [len(c["conversations"]) for c in spy["generate"]] == [2, 1, 2, 1]
    # Each update trained on the rows accepted since the previous one, with real steps...
    assert [[m[-1]["content"] for m in t["examples"]] for t in spy["train"]] == [
        [run.rows[0]["final_answer"], run.rows[2]["final_answer"]],
        [run.rows[3]["final_answer"], run.rows[4]["final_answer"]]]
    assert all(u["steps"] >= 1 for u in run.updates) and len(run.updates) == 2
    # ... and generation after an update ran on the updated weights.
    weights = [c["weights"] for c in spy["generate"]]
    assert weights[0] == weights[1] != weights[2] != weights[3]
    metrics = run.metrics(1)
    assert metrics["updates"] == 2 and metrics["examples_trained"] == 4
    assert metrics["optimizer_steps"] == sum(t["steps"] for t in spy["train"])
    assert metrics["rows_after_last_update"] == 1  # question 5: fewer than the interval


def test_an_update_without_optimiser_steps_is_refused(student, tokenizer, monkeypatch):
    class NoSteps:
        steps, loss_history, data = 0, [], {}

    monkeypatch.setattr(refine_mod, "train", lambda *a, **k: NoSteps())
    with pytest.raises(RuntimeError, match="took no optimiser step"):
        refine(student, tokenizer, ScriptedTeacher({}), make_inputs(2), refine_params(), GENERATION)


def test_an_update_that_leaves_the_weights_unchanged_is_refused(student, tokenizer):
    # One step, all of it warmup: the learning rate of that step is 0.
    params = refine_params(train={**refine_params().train.model_dump(), "warmup_ratio": 1.0})
    with pytest.raises(RuntimeError, match="left the trainable weights unchanged"):
        refine(student, tokenizer, ScriptedTeacher({}), make_inputs(2), params, GENERATION)


@pytest.mark.parametrize("keep_failed, outcome, trained", [
    ("drop", "dropped", False), ("last", "kept_last", False), ("reference", "reference", True)])
def test_keep_failed(student, tokenizer, spy, keep_failed, outcome, trained):
    teacher = ScriptedTeacher({100: [False, False]})  # question 0 is never accepted
    run = refine(student, tokenizer, teacher, make_inputs(2),
                 refine_params(keep_failed=keep_failed, fine_tune_interval=1), GENERATION)
    failed, passed = run.rows
    assert failed["outcome"] == outcome
    assert failed["passed"] is False and failed["passed_at"] is None
    assert len(failed["attempts"]) == 2 and passed["outcome"] == "passed"
    expected_final = {"dropped": None, "kept_last": failed["attempts"][-1]["answer"],
                      "reference": "Teacher answer 0."}[outcome]
    assert failed["final_answer"] == expected_final
    assert failed["update"] == (1 if trained else None)
    assert passed["update"] == (2 if trained else 1)
    trained_answers = [m[-1]["content"] for t in spy["train"] for m in t["examples"]]
    assert ("Teacher answer 0." in trained_answers) == trained
    assert run.metrics(2)["outcomes"][outcome] == 1


# ------------------------------------------------------------------------- targets / feedback
def test_chain_target_trains_on_the_selfee_answer_feedback_revision_chain(student, tokenizer, spy):
    teacher = ScriptedTeacher({100: [False, True], 101: [False, False]})
    run = refine(student, tokenizer, teacher, make_inputs(2),
                 refine_params(target="chain", keep_failed="reference", fine_tune_interval=2),
                 GENERATION)
    passed_row, reference_row = run.rows
    passed_chain, reference_chain = [m[-1]["content"] for m in spy["train"][0]["examples"]]
    a1, a2 = (a["answer"] for a in passed_row["attempts"])
    assert passed_chain == (f"{a1}\n\n### Feedback 1\nFIX-100-0\nHints:\n- hint-100\n"
                            f"Revision is needed.\n\n### Revision 1\n{a2}\n\n"
                            "### Feedback 2\nAccepted.\nRevision is not needed.")
    # Never accepted: both attempts with their feedback, then the teacher's answer as the revision.
    b1, b2 = (a["answer"] for a in reference_row["attempts"])
    assert reference_chain == prompts.selfee_chain(
        [b1, b2, "Teacher answer 1."],
        ["FIX-101-0\nHints:\n- hint-101", "FIX-101-1\nHints:\n- hint-101"], None)
    assert reference_chain.endswith("### Revision 2\nTeacher answer 1.\n\n### Feedback 3\n"
                                    "Revision is not needed.")
    # The chain follows the same prompt the student answered under.
    assert spy["train"][0]["examples"][0][:-1] == prompts.student_answer_messages(make_question(0))


def test_chain_target_judges_revises_and_stores_the_final_revision(student, tokenizer,
                                                                      monkeypatch):
    """A chain-trained student writes answer -> feedback -> revision: only its last revision is
    judged, revised from and stored; the whole text stays in the attempt's ``chain``."""
    chains = iter([
        "draft one\n\n### Feedback 1\nmissing things\nRevision is needed.\n\n"
        "### Revision 1\nbetter one\n\n### Feedback 2\nRevision is not needed.",
        "plain second answer",
    ])
    asked_with = []

    def generate(model, tokenizer, conversations, **kwargs):
        asked_with.extend(conversations)
        return [next(chains) for _ in conversations]

    monkeypatch.setattr(refine_mod, "generate", generate)
    teacher = ScriptedTeacher({100: [False, True]})
    run = refine(student, tokenizer, teacher, make_inputs(1),
                 refine_params(target="chain", fine_tune_interval=5), GENERATION)
    row = run.rows[0]
    assert [a for _, a in teacher.asked] == ["better one", "plain second answer"]
    first, second = row["attempts"]
    assert first["answer"] == "better one" and first["chain"].startswith("draft one")
    assert second["answer"] == "plain second answer"
    assert row["final_answer"] == "plain second answer"
    assert asked_with[1] == prompts.revision_messages(make_question(0), "better one",
                                                      "FIX-100-0\nHints:\n- hint-100")


@pytest.mark.parametrize("text, final", [
    ("just an answer", "just an answer"),
    ("a\n\n### Feedback 1\nf\nRevision is needed.\n\n### Revision 1\nb\n\n### Feedback 2\n"
     "Revision is not needed.", "b"),
    ("a\n\n### Feedback 1\nf\nRevision is needed.\n\n### Revision 1\nb\n\n### Feedback 2\nf2"
     "\n\n### Revision 2\nc, cut off by max_new_tok", "c, cut off by max_new_tok"),
    ("a\n### Feedback 1\nno revision follows", "a"),
    ("### Feedback 1\nonly feedback", ""),
])
def test_final_revision_of_a_generated_chain(text, final):
    assert final_revision(text) == final
    chain = prompts.selfee_chain(["x", "y", "z"], ["f1", "f2"], "ok")
    assert final_revision(chain) == "z"


def test_self_feedback_trains_the_student_to_critique_like_the_teacher(student, tokenizer, spy):
    """SELF's meta-skill: each critiqued answer adds (self-critique prompt -> teacher feedback)."""
    teacher = ScriptedTeacher({100: [False, False], 101: [True]})
    run = refine(student, tokenizer, teacher, make_inputs(2),
                 refine_params(feedback="self", keep_failed="reference", fine_tune_interval=2),
                 GENERATION)
    failed = run.rows[0]
    examples = spy["train"][0]["examples"]
    answer_prompts = [prompts.student_answer_messages(make_question(i)) for i in range(2)]
    answers = [e for e in examples if e[:-1] in answer_prompts]
    critiques = [e for e in examples if e not in answers]
    # Two answer rows (question 101 passed, 100 trained on the reference) + one critique: the
    # student critiqued its first answer to question 100 (the second ended the revisions).
    assert len(answers) == 2 and len(critiques) == 1
    assert critiques[0] == [
        *prompts.self_critique_messages(make_question(0), failed["attempts"][0]["answer"]),
        {"role": "assistant", "content": "FIX-100-0\nHints:\n- hint-100"}]
    metrics = run.metrics(2)
    assert metrics["critique_examples_trained"] == 1
    assert metrics["update_log"][0]["critique_examples"] == 1


def test_teacher_feedback_adds_no_critique_examples(student, tokenizer, spy):
    run = refine(student, tokenizer, ScriptedTeacher({100: [False, False]}), make_inputs(2),
                 refine_params(keep_failed="reference", fine_tune_interval=2), GENERATION)
    assert len(spy["train"][0]["examples"]) == 2
    assert run.metrics(2)["critique_examples_trained"] == 0


def test_refine_lora_params_must_describe_the_loaded_adapter(student):
    lora = refine_params().train.lora
    assert make_trainable(student, lora, key="refine.train.lora") is student  # same: kept as is
    for change, named in [({"r": 8}, "refine.train.lora.r=8"),
                          ({"alpha": 4}, "refine.train.lora.alpha=4"),
                          ({"dropout": 0.1}, "refine.train.lora.dropout=0.1"),
                          ({"target_modules": ["q_proj"]}, "refine.train.lora.target_modules"),
                          ({"enabled": False}, "refine.train.lora.enabled=False")]:
        with pytest.raises(ValueError, match=re.escape(named)):
            make_trainable(student, lora.model_copy(update=change), key="refine.train.lora")


def test_final_target_is_question_to_final_answer():
    from meteor.refine import _Question
    item = _Question(make_inputs(1)[0], final_answer="The final answer.", outcome="passed")
    assert training_example(item, "final") == [
        *prompts.student_answer_messages(make_question(0)),
        {"role": "assistant", "content": "The final answer."}]


def test_selfee_chain_needs_one_feedback_fewer_than_answers():
    with pytest.raises(ValueError, match="n answers and n-1 feedbacks"):
        prompts.selfee_chain(["a", "b"], [], None)


def test_self_feedback_asks_the_student_and_the_teacher_still_judges(student, tokenizer, spy):
    teacher = ScriptedTeacher({100: [False, True]})
    run = refine(student, tokenizer, teacher, make_inputs(1),
                 refine_params(feedback="self", fine_tune_interval=5), GENERATION)
    row = run.rows[0]
    assert row["passed_at"] == 2 and len(teacher.asked) == 2  # the teacher decided both times
    answer_call, critique_call, revision_call = spy["generate"]
    critique_prompt = critique_call["conversations"][0]
    assert critique_prompt == prompts.self_critique_messages(make_question(0),
                                                             row["attempts"][0]["answer"])
    critique = critique_call["outputs"][0]
    assert row["attempts"][0]["feedback"] == critique
    revision_prompt = revision_call["conversations"][0]
    assert revision_prompt == prompts.revision_messages(make_question(0),
                                                        row["attempts"][0]["answer"], critique)
    assert "FIX-100" not in json.dumps(revision_prompt)  # the teacher's feedback is not used


# ------------------------------------------------------------------------------- failures
def test_failed_verdict_is_recorded_and_counted_not_crashed(student, tokenizer):
    teacher = ScriptedTeacher({100: [False, "error"]})
    run = refine(student, tokenizer, teacher, make_inputs(3),
                 refine_params(keep_failed="reference", fine_tune_interval=2), GENERATION)
    broken = run.rows[0]
    assert broken["outcome"] == "teacher_error" and broken["final_answer"] is None
    assert broken["error"].startswith("invalid JSON") and broken["update"] is None
    assert broken["attempts"][1]["verdict"] is None and broken["attempts"][1]["error"]
    assert [r["update"] for r in run.rows] == [None, 1, 1]  # the others carried on
    assert run.metrics(2)["outcomes"]["teacher_error"] == 1


def test_empty_answers_are_rejected_without_a_teacher_call(tiny_model_dir, tokenizer):
    # Under plain greedy decoding the untrained tiny model writes only newlines: every answer is
    # empty (no_repeat_ngram_size would force it to write something else).
    model = make_trainable(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           refine_params().train.lora)
    teacher = ScriptedTeacher({})
    plain_greedy = GENERATION.model_copy(update={"no_repeat_ngram_size": 0})
    run = refine(model, tokenizer, teacher, make_inputs(2),
                 refine_params(keep_failed="reference"), plain_greedy)
    assert teacher.asked == []
    assert all(a["answer"] == "" and a["judged_by"] == "empty_answer_rule"
               and a["verdict"]["correct"] is False for r in run.rows for a in r["attempts"])
    assert [r["outcome"] for r in run.rows] == ["reference", "reference"]
    assert run.metrics(2)["empty_answers"] == 4 and len(run.updates) == 1


# ------------------------------------------------------------------------ determinism + cache
def rejecting_responder(body: dict) -> str:
    return json.dumps({"correct": False, "feedback": "Explain the learning rate.",
                       "hints": ["Mention the step size."]})


def test_rerun_retraces_the_trajectory_with_teacher_calls_from_the_cache(
        tiny_model_dir, tokenizer, tmp_path):
    params = refine_params(keep_failed="reference", fine_tune_interval=2)
    teacher_params = TeacherParams(backend="openai", model="fake-model", cache_dir=str(tmp_path))

    def run_once(server):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        silence_blank_tokens(model, tokenizer)
        model = make_trainable(model, params.train.lora, seed=0)
        teacher = ChatTeacher(teacher_params.model_copy(update={"base_url": server.base_url}),
                              OpenAIBackend(teacher_params.model_copy(
                                  update={"base_url": server.base_url})), progress=False)
        try:
            return refine(model, tokenizer, teacher, make_inputs(3), params, GENERATION), teacher
        finally:
            teacher.close()

    with FakeOpenAIServer(responder=rejecting_responder) as server:
        first, first_teacher = run_once(server)
        calls_after_first = server.calls
        second, second_teacher = run_once(server)

    assert first.rows == second.rows and first.updates == second.updates
    # Question 2 was answered after the update (every question became a reference row).
    assert [r["update"] for r in first.rows] == [1, 1, None]
    assert first.rows[2]["attempts"][0]["feedback"] == (
        "Explain the learning rate.\nHints:\n- Mention the step size.")
    verdicts = sum(len(r["attempts"]) for r in first.rows)
    # (A revision identical to its previous answer is already a cache hit in the first run.)
    assert first_teacher.stats.calls == calls_after_first > 0
    assert first_teacher.stats.calls + first_teacher.stats.cache_hits == verdicts
    assert second_teacher.stats.calls == 0 and second_teacher.stats.cache_hits == verdicts
    assert server.calls == calls_after_first


# ---------------------------------------------------------------------------------- the stage
def test_stage_writes_rows_adapter_and_metrics(tiny_model_dir, tokenizer, tmp_path, monkeypatch):
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    silence_blank_tokens(base, tokenizer)
    base.save_pretrained(tmp_path / "models" / "base")
    tokenizer.save_pretrained(tmp_path / "models" / "base")
    monkeypatch.chdir(tmp_path)
    sft = make_trainable(AutoModelForCausalLM.from_pretrained("models/base"),
                         refine_params().train.lora)
    save_trained(sft, tokenizer, "models/sft")

    questions = [make_question(i) for i in range(5)]
    (tmp_path / "data" / "scraped").mkdir(parents=True)
    (tmp_path / "data" / "scraped" / "train.jsonl").write_text(
        "".join(json.dumps(q) + "\n" for q in questions))
    distilled = [{**q, "answer": f"Teacher answer {i}.", "ok": i != 4}
                 for i, q in enumerate(questions)]
    (tmp_path / "data" / "distilled.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in distilled))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({
        "generation": {"batch_size": 8, "max_new_tokens": 4},
        "refine": {"max_iterations": 2, "fine_tune_interval": 2, "max_new_tokens": 4,
                   "train": {"epochs": 1, "batch_size": 2, "max_seq_len": 256, "lora": LORA}},
        "teacher": {"cache_dir": str(tmp_path / "cache")},
    }))
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(REPO / "stages" / "refine.py"), run_name="__main__")
    assert exit_info.value.code == 0

    refined = (tmp_path / "data" / "refined.jsonl").read_text()
    rows = [json.loads(line) for line in refined.splitlines()]
    assert [r["id"] for r in rows] == [100, 101, 102, 103]
    metrics = json.loads((tmp_path / "metrics" / "refine.json").read_text())
    assert metrics["rows_in"] == 5 and metrics["rows_skipped"]["not_ok"] == 1
    assert metrics["keep_failed"] == "reference"  # the default: the offline run trains in the loop
    assert metrics["updates"] == 2 and metrics["optimizer_steps"] >= 2
    assert metrics["teacher"]["name"] == "offline:offline-reference"
    assert metrics["teacher"]["calls"] == metrics["attempts"] - metrics["empty_answers"]
    assert metrics["examples_with_eos_share"] == 1.0  # short answers: none cut by max_seq_len
    assert metrics["reproducibility"]["intra_op_threads"] >= 1
    assert set(metrics["pass_rate_by_iteration"]) == {"iter_1", "iter_2"}
    out = tmp_path / "models" / "refine"
    assert (out / "adapter_model.safetensors").exists() and (out / "tokenizer.json").exists()
    assert (out / "adapter_model.safetensors").read_bytes() != (
        tmp_path / "models" / "sft" / "adapter_model.safetensors").read_bytes()
    assert (tmp_path / "dvclive" / "refine" / "plots" / "metrics" / "train" / "loss.tsv").exists()
