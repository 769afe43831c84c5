"""merge: in-memory weights are exact, the saved adapter is exact, the search works and resumes,
and the stage script runs on tiny params."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from peft import PeftModel
from peft.tuners.lora import LoraLayer

from meteor.merging.chunks import load_chunks
from meteor.merging.deltas import SELF_TRAIN, DeltaModel
from meteor.merging.search import param_name, run_search, seed_points
from meteor.merging.run import MergeParams
from meteor.training.config import LoraParams, TrainParams
from meteor.student.load import load_student
from meteor.training.data import answer_examples
from meteor.training.loop import train
from meteor.training.lora import make_trainable, save_trained

ROOT = Path(__file__).resolve().parents[1]
LORA = LoraParams(r=4, alpha=8, dropout=0.0)


def _randomise_lora(model, adapter: str, seed: int, scale: float = 0.05) -> None:
    """Give an adapter non-zero B (a fresh LoRA is a no-op), so differences show in logits."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, LoraLayer) and adapter in m.lora_B:
            w = m.lora_B[adapter].weight
            w.data = torch.randn(w.shape, generator=g) * scale


@pytest.fixture(scope="module")
def self_train_dir(tiny_model_dir, tmp_path_factory):
    model, tok = load_student(tiny_model_dir)
    model = make_trainable(model, LORA, seed=1)
    _randomise_lora(model, "default", seed=1)
    out = tmp_path_factory.mktemp("self_train")
    save_trained(model, tok, out)
    return out


@pytest.fixture()
def delta_model(tiny_model_dir, self_train_dir):
    """θ_self_train + two deltas with random (non-zero) weights."""
    base, tok = load_student(tiny_model_dir)
    dm = DeltaModel.from_self_train(base, self_train_dir)
    for i, name in enumerate(["delta_a", "delta_b"]):
        dm.add_delta(name, LORA, seed=0)
        _randomise_lora(dm.model, name, seed=10 + i)
    return dm, tok


@pytest.fixture(scope="module")
def batch(tiny_model_dir):
    _, tok = load_student(tiny_model_dir)
    ids = tok(["Gradient descent lowers the loss.", "A filter slides over the image pixels."],
              return_tensors="pt", padding=True)
    return {"input_ids": ids["input_ids"], "attention_mask": ids["attention_mask"]}


def logits(model, batch) -> torch.Tensor:
    with torch.inference_mode():
        return model(**batch).logits.float()


def weight_space_model(tiny_model_dir, dm: DeltaModel, weights: dict[str, float]):
    """The base model with W + s0·B0A0 + Σ w_k·s_k·B_kA_k written into its weights by hand: an
    independent reference for θ_self_train + Σ w_k·Δ_k (no peft forward involved)."""
    ref, _ = load_student(tiny_model_dir)
    modules = dict(ref.named_modules())
    for name, layer in dm.model.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        target = modules[name.removeprefix("base_model.model.")]
        delta = torch.zeros_like(target.weight)
        for adapter, w in [(SELF_TRAIN, 1.0), *weights.items()]:
            nominal = layer.lora_alpha[adapter] / layer.r[adapter]
            delta += w * nominal * (layer.lora_B[adapter].weight @ layer.lora_A[adapter].weight)
        target.weight.data += delta
    return ref.eval()


# ------------------------------------------------------------------------------ in memory
def test_zero_weights_reproduce_the_self_trained_model(delta_model, tiny_model_dir,
                                                       self_train_dir, batch):
    dm, _ = delta_model
    dm.set_weights({"delta_a": 0.0, "delta_b": 0.0})
    base, _ = load_student(tiny_model_dir)
    plain = PeftModel.from_pretrained(base, str(self_train_dir)).eval()
    assert torch.equal(logits(dm.model, batch), logits(plain, batch))
    # and the deltas do change the model when weighted
    dm.set_weights({"delta_a": 1.0})
    assert not torch.allclose(logits(dm.model, batch), logits(plain, batch), atol=1e-3)


def test_one_hot_weights_reproduce_the_delta_as_trained(delta_model, tiny_model_dir, batch):
    dm, tok = delta_model
    rows = [{"title": "Why scale features?", "question": "k-means only uses income.",
             "answer": "Standardise the features so each contributes to the distance."}] * 4
    examples, _ = answer_examples(rows)
    dm.training_mode("delta_a")
    before = {n: p.detach().clone() for n, p in dm.model.named_parameters()}
    train(dm.model, tok, examples, TrainParams(max_steps=2, batch_size=2, lr=1e-2,
                                               warmup_ratio=0.0, lora=LORA))
    changed = {n for n, p in dm.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".delta_a." in n for n in changed)  # only delta_a was trained
    dm.model.eval()
    as_trained = logits(dm.model, batch)  # the forward pass training used: self_train + delta_a

    dm.set_weights({"delta_a": 0.4, "delta_b": 1.3})  # switch away and back
    dm.set_weights({"delta_a": 1.0, "delta_b": 0.0})
    assert torch.equal(logits(dm.model, batch), as_trained)
    reference = weight_space_model(tiny_model_dir, dm, {"delta_a": 1.0})
    torch.testing.assert_close(logits(reference, batch), as_trained, atol=1e-5, rtol=1e-5)


def test_weights_are_task_arithmetic_on_the_self_trained_model(delta_model, tiny_model_dir, batch):
    dm, _ = delta_model
    weights = {"delta_a": 0.3, "delta_b": 1.7}
    dm.set_weights(weights)
    reference = weight_space_model(tiny_model_dir, dm, weights)
    torch.testing.assert_close(logits(dm.model, batch), logits(reference, batch),
                               atol=1e-5, rtol=1e-5)
    with pytest.raises(KeyError, match="unknown deltas"):
        dm.set_weights({"delta_z": 1.0})


def test_saved_cat_adapter_reproduces_the_in_memory_merge_and_linear_does_not(
        delta_model, tiny_model_dir, batch, tmp_path):
    dm, tok = delta_model
    weights = {"delta_a": 0.6, "delta_b": 0.9}
    dm.set_weights(weights)
    in_memory = logits(dm.model, batch)
    dm.save_merged(weights, tmp_path / "merged", tok, base_model_name_or_path=str(tiny_model_dir))
    config = json.loads((tmp_path / "merged" / "adapter_config.json").read_text())
    assert config["r"] == 3 * LORA.r and config["target_modules"] == sorted(config["target_modules"])
    assert not (tmp_path / "merged" / "merged").exists()  # one adapter, at the top level
    base, _ = load_student(tiny_model_dir)
    saved = PeftModel.from_pretrained(base, str(tmp_path / "merged")).eval()
    cat_error = (logits(saved, batch) - in_memory).abs().max().item()
    assert cat_error < 1e-5
    # the in-memory model is unchanged by saving
    assert torch.equal(logits(dm.model, batch), in_memory)

    # peft's linear combination averages A and B separately: cross terms, not the merge
    dm.merged_adapter(weights, adapter_name="linear", combination_type="linear")
    dm.use_only("linear")
    linear_error = (logits(dm.model, batch) - in_memory).abs().max().item()
    assert linear_error > 100 * max(cat_error, 1e-7)


def test_delta_round_trip_through_the_cache_is_exact(delta_model, batch, tmp_path):
    dm, _ = delta_model
    dm.set_weights({"delta_b": 0.7})
    expected = logits(dm.model, batch)
    dm.save_delta("delta_b", tmp_path / "b")
    dm.load_delta("delta_b_copy", tmp_path / "b")
    dm.set_weights({"delta_b_copy": 0.7})
    assert torch.equal(logits(dm.model, batch), expected)


def test_added_deltas_leave_the_model_in_eval_mode(tiny_model_dir, self_train_dir, batch):
    """peft builds a new adapter's dropout in training mode; a merge is evaluated without it."""
    base, _ = load_student(tiny_model_dir)
    dm = DeltaModel.from_self_train(base, self_train_dir)
    dm.add_delta("delta_a", LoraParams(r=4, alpha=8, dropout=0.5), seed=0)
    _randomise_lora(dm.model, "delta_a", seed=3)
    dm.set_weights({"delta_a": 1.0})
    assert not any(m.training for m in dm.model.modules())
    expected = logits(dm.model, batch)
    assert torch.equal(logits(dm.model, batch), expected)
    dm.use_only(dm.merged_adapter({"delta_a": 1.0}))  # a new adapter copies that dropout
    assert not any(m.training for m in dm.model.modules())
    torch.testing.assert_close(logits(dm.model, batch), expected, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------ objectives
DEV = [{"id": i, "category": "ML", "title": f"Why does model {i} overfit?",
        "question": "Training accuracy is high, validation is low. " * (1 + i),
        "answer": "Regularise it: fewer parameters, more data, early stopping. " * (1 + i % 3)}
       for i in range(5)]


def test_answer_nll_is_the_training_loss_on_answer_tokens_whatever_the_batch(delta_model):
    from meteor.merging.objective import AnswerNLL
    from meteor.training.data import PadCollator, encode_examples
    from meteor.training.loop import _answer_token_loss_sum

    dm, tok = delta_model
    dm.set_weights({"delta_a": 0.5})
    one = AnswerNLL(tok, DEV, max_seq_len=256, batch_size=1)
    many = AnswerNLL(tok, DEV, max_seq_len=256, batch_size=4)
    assert one.tokens == many.tokens > 0
    assert abs(one(dm.model) - many(dm.model)) < 1e-5
    data = encode_examples(tok, answer_examples(DEV)[0], 256)
    total, n = 0.0, 0
    with torch.inference_mode():
        for e in data.examples:
            loss, count = _answer_token_loss_sum(dm.model, PadCollator(tok.pad_token_id)([e]))
            total, n = total + loss.item(), n + int(count)
    assert n == one.tokens and abs(one(dm.model) - total / n) < 1e-5


def test_judge_objective_scores_greedy_dev_answers(delta_model):
    from meteor.merging.objective import JudgeScore
    from meteor.teacher.config import TeacherParams
    from meteor.teacher import make_teacher

    dm, tok = delta_model
    judge = make_teacher(TeacherParams(), section="judge")  # offline: deterministic
    objective = JudgeScore(judge, tok, DEV[:3], {"max_new_tokens": 6, "batch_size": 3,
                                                 "no_repeat_ngram_size": 0})
    first = objective(dm.model)
    assert 1.0 <= first <= 10.0 and objective.failures == 0
    assert objective(dm.model) == first  # greedy answers, deterministic judge


# ------------------------------------------------------------------------------ chunks
def test_chunks_by_file_or_field(tmp_path):
    (tmp_path / "ML.jsonl").write_text(json.dumps({"id": 1, "source": "distilled"}) + "\n"
                                       + json.dumps({"id": 2, "source": "refined"}) + "\n")
    (tmp_path / "CV.jsonl").write_text(json.dumps({"id": 3, "source": "distilled"}) + "\n"
                                       + json.dumps({"id": 4}) + "\n")
    (tmp_path / "NLP.jsonl").write_text("")
    chunks, skipped = load_chunks(tmp_path, "file")
    assert list(chunks) == ["CV", "ML"] and skipped["empty_chunk"] == 1
    chunks, skipped = load_chunks(tmp_path, "source")
    assert {k: [r["id"] for r in v] for k, v in chunks.items()} == {"distilled": [3, 1],
                                                                     "refined": [2]}
    assert skipped["no_source"] == 1
    with pytest.raises(FileNotFoundError, match="no chunk files"):
        load_chunks(tmp_path / "missing")


# ------------------------------------------------------------------------------ search
OPTIMUM = {"a": 0.8, "b": 0.1, "c": 0.45}


def quadratic(weights: dict[str, float]) -> tuple[float, float, float]:
    return sum((weights[k] - OPTIMUM[k]) ** 2 for k in OPTIMUM), 0.0, 0.0


def test_seed_points():
    roles = [r for r, _ in seed_points(["a", "b", "c"])]
    assert roles == ["zeros", "one_hot:a", "one_hot:b", "one_hot:c", "uniform", "sum"]
    assert [r for r, _ in seed_points(["a"])] == ["zeros", "one_hot:a"]  # = uniform = sum


@pytest.mark.parametrize("sampler", ["gp", "tpe"])
def test_search_beats_uniform_on_a_known_optimum(tmp_path, sampler):
    result = run_search(quadratic, list(OPTIMUM), storage_path=tmp_path / "s.db",
                        study_name="q", direction="minimize", w_max=1.0, trials=20,
                        sampler=sampler, seed=0)
    uniform = result.find_point({k: 1 / 3 for k in OPTIMUM})
    assert uniform is not None and uniform.role == "uniform"
    assert result.best.objective < 0.25 * uniform.objective
    roles = [r.role for r in result.records]
    assert roles[:6] == ["zeros", "one_hot:a", "one_hot:b", "one_hot:c", "uniform", "sum"]
    assert roles.count("search") == 20
    if sampler == "gp":
        pm = result.posterior_mean
        assert pm is not None and pm.measured is not None
        assert pm.measured < uniform.objective
        assert roles[-1] == "posterior_mean" or pm.trial in [r.number for r in result.records]
    else:
        assert result.posterior_mean is None


class Crash(Exception):
    pass


def test_interrupted_study_resumes_from_its_stored_trials(tmp_path):
    calls = []

    def crashing(weights):
        if len(calls) == 4:
            raise Crash
        calls.append(weights)
        return quadratic(weights)

    kwargs = dict(storage_path=tmp_path / "s.db", study_name="q", direction="minimize",
                  w_max=1.0, trials=5, sampler="gp", seed=0)
    with pytest.raises(Crash):
        run_search(crashing, list(OPTIMUM), **kwargs)
    # a hard kill leaves a trial RUNNING: simulate one
    study = optuna.load_study(study_name="q", storage=f"sqlite:///{tmp_path / 's.db'}")
    study.ask()

    resumed_calls = []

    def counting(weights):
        resumed_calls.append(weights)
        return quadratic(weights)

    result = run_search(counting, list(OPTIMUM), **kwargs)
    assert result.trials_from_store == 4
    total = 6 + 5 + 1  # seeds + trials + the posterior-mean point
    assert len(result.records) == total and result.trials_run == len(resumed_calls) == total - 4
    assert [r.weights for r in result.records[:4]] == calls  # the stored ones are kept as they were
    assert sorted(r.role for r in result.records if r.role != "search") == sorted(
        ["zeros", "one_hot:a", "one_hot:b", "one_hot:c", "uniform", "sum", "posterior_mean"])

    # a finished study is read back, not re-run
    resumed_calls.clear()
    again = run_search(counting, list(OPTIMUM), **kwargs)
    assert resumed_calls == [] and again.trials_run == 0
    assert [r.objective for r in again.records] == [r.objective for r in result.records]
    assert again.posterior_mean.weights == result.posterior_mean.weights


def test_params_validate():
    with pytest.raises(ValueError, match="needs sampler: gp"):
        MergeParams(sampler="tpe", recommend="posterior_mean")
    with pytest.raises(ValueError):
        MergeParams(w_max=0.5)  # the all-ones seed must fit


# ------------------------------------------------------------------------------ stage
def _stage_repo(tmp_path: Path, tiny_model_dir: Path, self_train_dir: Path) -> Path:
    repo = tmp_path / "repo"
    (repo / "stages").mkdir(parents=True)
    shutil.copy(ROOT / "stages" / "merge.py", repo / "stages" / "merge.py")
    shutil.copytree(tiny_model_dir, repo / "models" / "base")
    shutil.copytree(self_train_dir, repo / "models" / "self_train")
    config = json.loads((repo / "models/self_train/adapter_config.json").read_text())
    config["base_model_name_or_path"] = "models/base"
    (repo / "models/self_train/adapter_config.json").write_text(json.dumps(config))
    texts = [("Why scale features for k-means?", "Distances are dominated by large ranges."),
             ("What does dropout do?", "It zeroes random activations during training."),
             ("Why use a validation set?", "To estimate generalisation before the test set."),
             ("What is a convolution?", "A learned filter slid over the image.")]
    rows = [{"id": i, "category": "ML" if i % 2 else "CV", "title": t, "question": t + " Thanks.",
             "answer": a, "source": "distilled"} for i, (t, a) in enumerate(texts)]
    (repo / "data" / "selected").mkdir(parents=True)
    for chunk in ("CV", "ML"):
        (repo / "data" / "selected" / f"{chunk}.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in rows if r["category"] == chunk))
    (repo / "data" / "scraped").mkdir(parents=True)
    (repo / "data" / "scraped" / "dev.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in rows[:3]))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["merge"].update(trials=2, eval_batch_size=2)
    params["merge"]["train"].update(max_steps=1, batch_size=2, max_seq_len=128,
                                    lora={"r": 4, "alpha": 8, "dropout": 0.0})
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return repo


def _run_stage(repo: Path, cache: Path) -> None:
    env = {**os.environ, "METEOR_CACHE_DIR": str(cache), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "stages/merge.py"], cwd=repo, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


@pytest.mark.slow
def test_stage_on_tiny_params(tmp_path, tiny_model_dir, self_train_dir):
    repo = _stage_repo(tmp_path, tiny_model_dir, self_train_dir)
    _run_stage(repo, tmp_path / "cache")

    metrics = json.loads((repo / "metrics" / "merge.json").read_text())
    table = metrics["table"]
    assert set(table) == {"no_delta", "train_all", "delta_CV", "delta_ML", "average", "sum", "auto"}
    assert all(isinstance(row["objective"], float) for row in table.values())
    assert table["auto"]["trials"] == len(seed_points(["CV", "ML"])) + 2 + (
        metrics["recommendation"]["posterior_mean"]["trial"] >= 5)
    assert metrics["exactness"]["max_abs_logit_diff"] <= metrics["exactness"]["tolerance"]
    trials = [json.loads(line) for line in (repo / "data/merge_trials.jsonl").read_text().splitlines()]
    assert len(trials) == table["auto"]["trials"]
    assert {"weights", "objective", "seconds_switch", "seconds_eval"} <= set(trials[0])
    assert (repo / "metrics" / "merge_trace.png").read_bytes()[:4] == b"\x89PNG"
    best = min(t["objective"] for t in trials)
    assert table["auto"]["objective"] == best  # recommend: best (the default)

    base, _ = load_student(repo / "models" / "base")
    merged = PeftModel.from_pretrained(base, str(repo / "models" / "merged"))
    assert list(merged.peft_config) == ["default"]
    adapter = (repo / "models/merged/adapter_model.safetensors").read_bytes()

    # again: deltas and the finished study are read back, nothing is trained or evaluated
    _run_stage(repo, tmp_path / "cache")
    again = json.loads((repo / "metrics" / "merge.json").read_text())
    assert again["search"]["trials_run"] == 0 and again["search"]["trials_from_store"] == len(trials)
    assert all(d["from_cache"] for d in again["deltas"].values())
    assert (repo / "models/merged/adapter_model.safetensors").read_bytes() == adapter

    # a clean cache gives the same merge (deterministic training and search)
    _run_stage(repo, tmp_path / "cache2")
    assert (repo / "models/merged/adapter_model.safetensors").read_bytes() == adapter
