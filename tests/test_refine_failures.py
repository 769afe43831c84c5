"""The refine stage fails (non-zero, outputs and metrics written) when too many questions got no
teacher verdict, and a re-run asks only what is missing: the finished verdicts come from the cache."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest
import yaml
from fake_openai_server import FakeOpenAIServer, Faults
from test_refine import LORA, make_question, refine_params, silence_blank_tokens, tokenizer  # noqa: F401
from transformers import AutoModelForCausalLM

from meteor.training.lora import make_trainable, save_trained

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # two stage runs with a model: ~20 s


def run_stage() -> int:
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(REPO / "stages" / "refine.py"), run_name="__main__")
    return exit_info.value.code


def test_failed_verdicts_fail_the_stage_and_a_rerun_takes_the_rest_from_the_cache(
        tiny_model_dir, tokenizer, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    silence_blank_tokens(base, tokenizer)
    base.save_pretrained(tmp_path / "models" / "base")
    tokenizer.save_pretrained(tmp_path / "models" / "base")
    monkeypatch.chdir(tmp_path)
    save_trained(make_trainable(AutoModelForCausalLM.from_pretrained("models/base"),
                                refine_params().train.lora), tokenizer, "models/sft")
    questions = [make_question(i) for i in range(6)]
    (tmp_path / "data" / "scraped").mkdir(parents=True)
    (tmp_path / "data" / "scraped" / "train.jsonl").write_text(
        "".join(json.dumps(q) + "\n" for q in questions))
    (tmp_path / "data" / "distilled.jsonl").write_text(
        "".join(json.dumps({**q, "answer": f"Teacher answer {i}.", "ok": True}) + "\n"
                for i, q in enumerate(questions)))

    with FakeOpenAIServer(Faults(rate_500=0.4, seed=2)) as server:
        (tmp_path / "params.yaml").write_text(yaml.safe_dump({
            "generation": {"batch_size": 8, "max_new_tokens": 4},
            # no in-loop update: the second run asks exactly the same verdicts
            "refine": {"max_iterations": 1, "fine_tune_interval": 100, "max_new_tokens": 4,
                       "train": {"epochs": 1, "batch_size": 2, "max_seq_len": 256, "lora": LORA}},
            "teacher": {"backend": "openai", "model": "fake-model", "base_url": server.base_url,
                        "cache_dir": str(tmp_path / "cache"), "max_retries": 0},
        }))
        assert run_stage() == 3
        metrics = json.loads((tmp_path / "metrics" / "refine.json").read_text())
        rows = [json.loads(line) for line in
                (tmp_path / "data" / "refined.jsonl").read_text().splitlines()]
        no_verdict = sum(r["outcome"] == "teacher_error" for r in rows)
        assert 0 < no_verdict < len(rows), "the seed must fail some verdicts, not all"
        assert not metrics["complete"] and metrics["failed_fraction"] == round(no_verdict / 6, 4)
        assert (tmp_path / "models" / "refine" / "adapter_model.safetensors").exists()

        server.faults = Faults()
        calls_before = server.calls
        assert run_stage() == 0
        metrics = json.loads((tmp_path / "metrics" / "refine.json").read_text())
        assert metrics["complete"] and metrics["outcomes"]["teacher_error"] == 0
        assert server.calls - calls_before == no_verdict  # only the missing verdicts
        assert metrics["teacher"]["cache_hits"] == len(rows) - no_verdict
