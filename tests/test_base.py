"""base stage: tiny pre-training, deterministic saves, load_student, revisions, train split only."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch
import yaml

from meteor.student.pretrain import BaseParams
from meteor.student.load import directory_hash, load_student, resolve_revision
from meteor.student.pretrain import pack_blocks, pretrain, warmup_cosine
from meteor.student.tiny import BOS, EOS, PAD

REPO = Path(__file__).resolve().parents[1]
TINY = dict(vocab_size=400, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
            max_seq_len=64, block_size=32, steps=30, batch_size=4, lr=1e-2, warmup_steps=3, seed=0)
TOPICS = ["dropout", "batch normalization", "tokenization", "cross-validation", "data augmentation"]
# A word repeated in every row of a split becomes one BPE token if (and only if) that split is read.
TRAIN_MARKER, HELD_OUT_MARKER = "trainonlyword", "heldoutword"


def synthetic_rows(n: int, split: str = "train", marker: str = "") -> list[dict]:
    rows = []
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        rows.append({
            "id": i, "category": "DL", "split": split, "tags": ["deep-learning"],
            "title": f"How does {topic} work? {marker}",
            "question": f"I train a model with {topic} and the loss does not fall. What is wrong? {marker}",
            "answer": f"Check how {topic} is applied. Use `model.eval()` at test time and lower the "
                      f"learning rate. {marker}",
        })
    return rows


def file_hashes(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


def test_pretraining_loss_falls_and_counts_are_reported():
    result = pretrain(synthetic_rows(30), BaseParams(**TINY), progress=False)
    assert len(result.loss_history) == TINY["steps"]
    assert result.final_loss < result.loss_history[0] - 1.0, result.loss_history
    assert result.tokens_seen == TINY["steps"] * TINY["batch_size"] * TINY["block_size"]
    assert result.parameters == sum(p.numel() for p in result.model.parameters())
    assert not result.model.training


def test_two_runs_save_byte_identical_files_and_the_seed_matters(tmp_path):
    short = {**TINY, "steps": 8}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        result = pretrain(synthetic_rows(30), BaseParams(**{**short, "seed": seed}), progress=False)
        result.model.save_pretrained(tmp_path / name)
        result.tokenizer.save_pretrained(tmp_path / name)
    hashes = {name: file_hashes(tmp_path / name) for name in "abc"}
    assert "model.safetensors" in hashes["a"] and "tokenizer.json" in hashes["a"]
    assert hashes["a"] == hashes["b"]
    # Control: the comparison can fail; another seed gives other weights.
    assert hashes["a"]["model.safetensors"] != hashes["c"]["model.safetensors"]


def test_rows_without_text_are_rejected_by_id():
    rows = synthetic_rows(3)
    del rows[1]["answer"]
    with pytest.raises(ValueError, match=r"id=1.*answer"):
        pretrain(rows, BaseParams(**TINY), progress=False)


def test_too_little_text_for_one_block_is_a_clear_error():
    with pytest.raises(ValueError, match="block_size=32"):
        pack_blocks([[1, 2, 3]], 32, torch.Generator().manual_seed(0))


def test_warmup_then_cosine_decay():
    factor = warmup_cosine(warmup_steps=4, total_steps=20, min_ratio=0.1)
    assert factor(0) == pytest.approx(0.25) and factor(3) == pytest.approx(1.0)
    assert factor(4) == pytest.approx(1.0)
    assert factor(12) == pytest.approx(0.55)
    assert factor(20) == pytest.approx(0.1)


# ----------------------------------------------------------------------------- the stage itself
def _run_stage(workdir: Path):
    spec = importlib.util.spec_from_file_location("base_stage", REPO / "stages" / "base.py")
    stage = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stage)
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        return stage.main()
    finally:
        os.chdir(cwd)


@pytest.fixture(scope="module")
def stage_dir(tmp_path_factory):
    """Run stages/base.py in a scratch copy with tiny params and train/dev/test splits."""
    workdir = tmp_path_factory.mktemp("base_stage")
    (workdir / "params.yaml").write_text(yaml.safe_dump({"student": {"model": "tiny"}, "base": TINY}))
    scraped = workdir / "data" / "scraped"
    scraped.mkdir(parents=True)
    for split, marker in (("train", TRAIN_MARKER), ("dev", HELD_OUT_MARKER), ("test", HELD_OUT_MARKER)):
        rows = synthetic_rows(30, split, marker)
        (scraped / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    _run_stage(workdir)
    return workdir


def test_stage_writes_model_metrics_and_samples(stage_dir):
    model_dir = stage_dir / "models" / "base"
    assert (model_dir / "model.safetensors").is_file()
    assert not list(model_dir.glob("*.bin")), "safetensors only"
    metrics = json.loads((stage_dir / "metrics" / "base.json").read_text())
    assert metrics["tokens_seen"] == TINY["steps"] * TINY["batch_size"] * TINY["block_size"]
    assert metrics["final_loss"] < metrics["initial_loss"]
    # The recorded revision is the content hash of the saved directory.
    assert metrics["revision"] == resolve_revision(model_dir)["revision"]
    samples = json.loads((stage_dir / "metrics" / "base_samples.json").read_text())
    assert len(samples) == 3 and all(isinstance(s["reply"], str) for s in samples)
    assert not list((stage_dir / "models").glob(".*")), "no temporary dirs left behind"


def test_stage_reads_the_train_split_only(stage_dir):
    vocab = json.loads((stage_dir / "models" / "base" / "tokenizer.json").read_text())["model"]["vocab"]
    assert any(TRAIN_MARKER in token for token in vocab)  # control: a frequent train word is learnt
    assert not any(HELD_OUT_MARKER in token for token in vocab)


def test_saved_student_reloads_with_chat_template_and_special_tokens(stage_dir):
    model, tokenizer = load_student(stage_dir / "models" / "base")
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (BOS, EOS, PAD)
    assert tokenizer.padding_side == "left"
    assert not model.training
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "What is dropout?"}],
                                         tokenize=False, add_generation_prompt=True)
    assert chat == f"{BOS}<|user|>\nWhat is dropout?{EOS}\n<|assistant|>\n"
    for special in (BOS, EOS, PAD, "<|user|>", "<|assistant|>"):
        assert len(tokenizer.encode(special, add_special_tokens=False)) == 1, special
    assert model.config.vocab_size == len(tokenizer)
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id


def test_stage_copies_a_local_model_and_records_its_revision(tiny_model_dir, tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"student": {"model": str(tiny_model_dir)}}))
    metrics = _run_stage(tmp_path)  # no data/scraped: a given model needs no train split
    expected = f"sha256:{directory_hash(tiny_model_dir)}"
    assert metrics["revision"] == expected and metrics["tokens_seen"] == 0
    saved = tmp_path / "models" / "base"
    assert json.loads((saved / "meteor_source.json").read_text())["revision"] == expected
    original, _ = load_student(tiny_model_dir)
    copy, _ = load_student(saved)
    for (name, a), (_, b) in zip(original.state_dict().items(), copy.state_dict().items()):
        assert torch.equal(a, b), name


# ------------------------------------------------------------------------------- load_student
def test_load_student_falls_back_to_eos_for_padding(tiny_model_dir, tmp_path):
    model, tokenizer = load_student(tiny_model_dir)
    tokenizer.pad_token = None
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    _, reloaded = load_student(tmp_path)
    assert reloaded.pad_token == reloaded.eos_token == EOS
    assert reloaded.padding_side == "left"


def test_load_student_loads_a_peft_adapter_dir(tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    base, tokenizer = load_student(tiny_model_dir)
    ids = torch.tensor([[1, 10, 20, 30]])
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
    # init_lora_weights=False: a random (non-zero) delta, so the adapter visibly changes outputs.
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                 init_lora_weights=False))
    peft_model.eval()
    with torch.no_grad():
        adapted_logits = peft_model(input_ids=ids).logits
    peft_model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        tiny_model_dir)

    loaded, loaded_tokenizer = load_student(tmp_path)
    with torch.no_grad():
        loaded_logits = loaded(input_ids=ids).logits
    assert not torch.allclose(adapted_logits, base_logits)
    torch.testing.assert_close(loaded_logits, adapted_logits)
    assert loaded_tokenizer.chat_template == tokenizer.chat_template
    assert not any(p.requires_grad for p in loaded.parameters())
    trainable, _ = load_student(tmp_path, adapter_trainable=True)
    assert any(p.requires_grad for p in trainable.parameters())


def test_load_student_refuses_pickle_checkpoints(tiny_model_dir, tmp_path):
    for f in Path(tiny_model_dir).iterdir():
        if f.name != "model.safetensors":
            (tmp_path / f.name).write_bytes(f.read_bytes())
    model, _ = load_student(tiny_model_dir)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")  # loadable only by unpickling
    with pytest.raises(OSError, match="safetensors"):
        load_student(tmp_path)


# ---------------------------------------------------------------------------- resolve_revision
def test_local_dir_revision_is_a_content_hash(tiny_model_dir, tmp_path):
    rev = resolve_revision(tiny_model_dir)
    assert rev["kind"] == "local" and rev["revision"] == f"sha256:{directory_hash(tiny_model_dir)}"
    assert resolve_revision(tiny_model_dir) == rev  # stable
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in Path(tiny_model_dir).iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    assert resolve_revision(copy)["revision"] == rev["revision"]  # the path does not matter
    (copy / "config.json").write_text((copy / "config.json").read_text() + " ")
    assert resolve_revision(copy)["revision"] != rev["revision"]  # the content does


def test_hub_revision_is_read_from_the_local_cache_offline(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub_constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--some-org--tiny-model"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "config.json").write_text("{}")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)

    assert resolve_revision("some-org/tiny-model")["revision"] == commit
    assert resolve_revision("some-org/tiny-model", "main")["revision"] == commit
    assert resolve_revision("some-org/not-cached")["revision"] is None


# ---------------------------------------------------------------------------- no downloads
def test_load_student_never_downloads_unless_allowed(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty hub cache
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(OSError, match="downloads are off.*student.allow_download"):
        load_student("meteor-tests/not-in-any-cache")

    import meteor.student.load as load_mod

    seen = []

    def from_pretrained(name, **kwargs):
        seen.append(kwargs["local_files_only"])
        raise OSError("stop here")

    monkeypatch.setattr(load_mod.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    for allow in (False, True):
        with pytest.raises(OSError):
            load_student("meteor-tests/not-in-any-cache", allow_download=allow)
    assert seen == [True, False]


@pytest.mark.parametrize("key, value", [("revision", "main"), ("trust_remote_code", True),
                                        ("allow_download", True)])
def test_hub_only_student_options_are_refused_for_the_tiny_student(tmp_path, key, value):
    from meteor.all_params import load_params
    from meteor.params import ParamsError

    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"student": {"model": "tiny", key: value}}))
    with pytest.raises(ParamsError, match=f"student.{key} applies to a hub or local model only"):
        load_params(path)
    path.write_text(yaml.safe_dump({"student": {"model": "org/model", key: value}}))
    assert getattr(load_params(path).student, key) == value
