"""The training core: answer-only labels, batching, the accelerate loop, LoRA, the sft stage."""

from __future__ import annotations

import copy
import json
import runpy
import shutil
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from ddp_harness import run_single_and_ddp
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from meteor.training.config import TrainParams
from meteor.training.data import (IGNORE_INDEX, LengthGroupedBatchSampler, PadCollator,
                                  RandomBatchSampler, answer_examples, encode_examples,
                                  has_generation_tags, question_answer_example)
from meteor.training.loop import train
from meteor.training.lora import make_trainable, save_trained

REPO = Path(__file__).resolve().parents[1]

QA = [
    ("What does gradient descent do?", "It moves the weights in the direction that lowers loss."),
    ("Why use cross-validation?", "It estimates how well a model generalises to unseen data."),
    ("What is a convolutional layer?", "It slides learned filters over the image to detect edges."),
    ("What is tokenization?", "It splits text into subword units before the embedding lookup."),
    ("How do I run inference in PyTorch?", "Use `model.eval()` and `torch.no_grad()`."),
    ("What is overfitting?", "The training loss falls while the validation loss rises."),
]


def chat(question: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


EXAMPLES = [chat(q, a) for q, a in QA] * 2


def tiny_params(**overrides) -> TrainParams:
    base = dict(epochs=2, batch_size=4, lr=1e-2, warmup_ratio=0.0, max_seq_len=128,
                lora={"r": 4, "alpha": 8, "dropout": 0.0})
    return TrainParams.model_validate({**base, **overrides})


@pytest.fixture
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture
def base_model(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir)


def without_generation_tags(tokenizer):
    """A copy of the tokenizer whose template has no {% generation %} tags (like most hub ones)."""
    plain = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    plain.chat_template = (tokenizer.chat_template.replace("{% generation %}", "")
                           .replace("{% endgeneration %}", ""))
    assert not has_generation_tags(plain)
    return plain


# ------------------------------------------------------------------------------- labels
def test_labels_are_ignored_exactly_off_the_assistant_tokens(tokenizer):
    assert has_generation_tags(tokenizer)
    data = encode_examples(tokenizer, EXAMPLES[:3], max_seq_len=128)
    for example, (question, answer) in zip(data.examples, QA):
        mask = tokenizer.apply_chat_template(chat(question, answer), tokenize=True,
                                             return_dict=True,
                                             return_assistant_tokens_mask=True)["assistant_masks"]
        assert sum(mask) > 0
        for token, label, is_answer in zip(example.input_ids, example.labels, mask):
            assert label == (token if is_answer else IGNORE_INDEX)
        trained = [t for t in example.labels if t != IGNORE_INDEX]
        assert tokenizer.decode(trained) == answer + "<|end|>"
        ignored = tokenizer.decode([t for t, lab in zip(example.input_ids, example.labels)
                                    if lab == IGNORE_INDEX])
        assert question in ignored and answer not in ignored

    batch = PadCollator(tokenizer.pad_token_id)(data.examples)
    for row, example in enumerate(data.examples):
        n = len(example)
        assert batch["labels"][row, :n].tolist() == example.labels
        assert batch["labels"][row, n:].eq(IGNORE_INDEX).all()
        assert batch["input_ids"][row, n:].eq(tokenizer.pad_token_id).all()
        width = batch["labels"].shape[1]
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (width - n)


def test_template_without_generation_tags_labels_what_follows_the_prompt(tokenizer):
    tagged = encode_examples(tokenizer, EXAMPLES[:6], max_seq_len=128)
    plain = encode_examples(without_generation_tags(tokenizer), EXAMPLES[:6], max_seq_len=128)
    for p, t, (_, answer) in zip(plain.examples, tagged.examples, QA):
        n_prompt = p.labels.index(next(x for x in p.labels if x != IGNORE_INDEX))
        assert p.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
        assert p.input_ids[:n_prompt] == t.input_ids[:n_prompt]  # same prompt, ignored alike
        assert t.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
        # The newline the template writes after the end token is not trained on, with or
        # without tags (the model stops at the end token and never generates it).
        assert tokenizer.decode([x for x in p.labels if x != IGNORE_INDEX]) == answer + "<|end|>"
        assert p.labels[-1] == IGNORE_INDEX and tokenizer.decode(p.input_ids[-1:]) == "\n"
        assert [x for x in p.labels if x != IGNORE_INDEX] == [x for x in t.labels if x != IGNORE_INDEX]


def test_prompt_answer_pairs_encode_like_message_lists(tokenizer):
    pairs = [([{"role": "user", "content": q}], a) for q, a in QA]
    as_pairs = encode_examples(tokenizer, pairs, max_seq_len=128)
    as_chats = encode_examples(tokenizer, [chat(q, a) for q, a in QA], max_seq_len=128)
    assert [e.labels for e in as_pairs.examples] == [e.labels for e in as_chats.examples]


def test_inconsistent_generation_prompt_is_a_clear_error(tokenizer):
    odd = without_generation_tags(tokenizer)
    # Renders the history differently once an answer is present: the prompt is not a prefix.
    odd.chat_template = ("{% if messages[-1]['role'] == 'assistant' %}<|system|>{% endif %}"
                         + odd.chat_template)
    with pytest.raises(ValueError, match="example 0: .*not a prefix"):
        encode_examples(odd, EXAMPLES[:1], max_seq_len=128)


def test_last_turn_must_be_the_assistant(tokenizer):
    with pytest.raises(ValueError, match="example 1: the last message must be the assistant"):
        encode_examples(tokenizer, [EXAMPLES[0], EXAMPLES[0][:1]], max_seq_len=128)


def test_truncation_is_counted_and_cut_off_answers_are_skipped(tokenizer):
    long_question = chat("why? " * 200, "Because.")
    long_answer = chat("Why?", "because " * 200)
    data = encode_examples(tokenizer, [long_question, long_answer, EXAMPLES[0]], max_seq_len=64)
    # The truncated answer lost its end-of-turn token; the short example kept it.
    assert data.stats() == {"examples_in": 3, "examples_used": 2, "examples_truncated": 1,
                            "examples_skipped_too_long": 1, "examples_with_eos": 1,
                            "examples_with_eos_share": 0.5}
    assert max(data.lengths) == 64
    assert any(t != IGNORE_INDEX for t in data.examples[0].labels)
    assert tokenizer.eos_token_id not in data.examples[0].labels
    assert tokenizer.eos_token_id in data.examples[1].labels


def test_answer_examples_skip_and_count_bad_rows():
    rows = [
        {"id": 1, "title": "T", "question": "Q?", "answer": "A."},
        {"id": 2, "title": "T", "question": "Q?", "answer": "A.", "ok": False},
        {"id": 3, "title": "T", "question": "Q?", "answer": "  "},
        {"id": 4, "title": "T", "question": "Q?"},
        {"id": 5, "title": "", "question": "Q?", "answer": "A."},
    ]
    examples, skipped = answer_examples(rows)
    assert examples == [question_answer_example(rows[0], "A.")]
    assert [m["role"] for m in examples[0]] == ["system", "user", "assistant"]
    assert examples[0][1]["content"] == "Title: T\n\nQ?"
    assert skipped == {"not_ok": 1, "no_answer": 2, "no_question": 1}


# ------------------------------------------------------------------------------ batching
@pytest.mark.parametrize("sampler_cls", [LengthGroupedBatchSampler, RandomBatchSampler])
def test_batch_samplers_cover_every_example_once_per_epoch(sampler_cls):
    lengths = [(i * 37) % 101 + 1 for i in range(103)]
    sampler = sampler_cls(lengths, batch_size=8, seed=3)
    orders = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler) == 13
        assert all(1 <= len(b) <= 8 for b in batches)
        flat = [i for b in batches for i in b]
        assert sorted(flat) == list(range(103))
        orders.append(flat)
    assert orders[0] != orders[1]  # reshuffled per epoch
    sampler.set_epoch(1)
    assert [i for b in sampler for i in b] == orders[1]  # and reproducibly so


def test_length_grouping_cuts_padding():
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(8, 512, (400,), generator=generator).tolist()

    def padded_tokens(sampler):
        return sum(max(lengths[i] for i in b) * len(b) for b in sampler)

    grouped = padded_tokens(LengthGroupedBatchSampler(lengths, 8, seed=0))
    random = padded_tokens(RandomBatchSampler(lengths, 8, seed=0))
    assert sum(lengths) <= grouped < 0.8 * random


# ---------------------------------------------------------------------------------- loop
def trainable_snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_lora_training_takes_real_steps_and_lowers_the_loss(base_model, tokenizer, tmp_path):
    model = make_trainable(base_model, tiny_params().lora)
    before = trainable_snapshot(model)
    result = train(model, tokenizer, EXAMPLES, tiny_params(epochs=5), log_dir=tmp_path / "live")

    assert result.steps == 5 * 3  # 12 examples / batch 4 = 3 steps per epoch
    assert len(result.loss_history) == len(result.lr_history) == result.steps
    assert sum(result.loss_history[-3:]) / 3 < result.loss_history[0] - 0.2
    after = dict(model.named_parameters())
    lora = [n for n in before if "lora_" in n]
    frozen = [n for n in before if "lora_" not in n]
    assert lora and frozen
    assert all(after[n].requires_grad and not torch.equal(before[n], after[n]) for n in lora
               if "lora_B" in n or "lora_A" in n)
    assert all(not after[n].requires_grad and torch.equal(before[n], after[n]) for n in frozen)
    assert result.tokens_seen > result.loss_tokens > 0 and result.tokens_per_s > 0

    loss_log = (tmp_path / "live" / "plots" / "metrics" / "train" / "loss.tsv").read_text()
    assert len(loss_log.strip().splitlines()) == 1 + result.steps  # header + one row per step
    assert (tmp_path / "live" / "plots" / "metrics" / "train" / "lr.tsv").exists()


def test_saved_adapter_reloads_with_peft_and_gives_the_same_logits(base_model, tokenizer,
                                                                    tiny_model_dir, tmp_path):
    model = make_trainable(base_model, tiny_params().lora)
    train(model, tokenizer, EXAMPLES, tiny_params(max_steps=3))
    save_trained(model, tokenizer, tmp_path / "sft")
    assert (tmp_path / "sft" / "adapter_model.safetensors").exists()
    assert (tmp_path / "sft" / "tokenizer.json").exists()

    fresh_base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    reloaded = PeftModel.from_pretrained(fresh_base, tmp_path / "sft").eval()
    encoded = encode_examples(tokenizer, EXAMPLES[:2], 128).examples
    batch = PadCollator(tokenizer.pad_token_id)(encoded)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        expected = model.eval()(**inputs).logits
        got = reloaded(**inputs).logits
        untrained = AutoModelForCausalLM.from_pretrained(tiny_model_dir)(**inputs).logits
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(untrained, expected)  # the adapter did change the model
    # peft writes target_modules in set (hash) order, which differs between processes; we sort
    # it so two runs of a stage save byte-identical adapters.
    config = json.loads((tmp_path / "sft" / "adapter_config.json").read_text())
    assert config["target_modules"] == sorted(tiny_params().lora.target_modules)


def test_full_finetuning_trains_every_weight_and_saves_a_full_model(base_model, tokenizer,
                                                                    tmp_path):
    params = tiny_params(max_steps=2, lora={"enabled": False})
    model = make_trainable(base_model, params.lora)
    assert not isinstance(model, PeftModel)
    before = trainable_snapshot(model)
    train(model, tokenizer, EXAMPLES, params)
    after = dict(model.named_parameters())
    assert all(not torch.equal(before[n], after[n]) for n in before)

    save_trained(model, tokenizer, tmp_path / "full")
    assert not (tmp_path / "full" / "adapter_config.json").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "full")
    for name, p in reloaded.named_parameters():
        torch.testing.assert_close(p, after[name])


def test_training_is_deterministic_on_cpu(tiny_model_dir, tokenizer):
    params = tiny_params(epochs=2, lora={"r": 4, "alpha": 8, "dropout": 0.1})
    histories = []
    for _ in range(2):
        model = make_trainable(AutoModelForCausalLM.from_pretrained(tiny_model_dir), params.lora,
                               seed=params.seed)
        histories.append(train(model, tokenizer, EXAMPLES, params).loss_history)
    assert histories[0] == histories[1]
    assert len(set(histories[0])) > 1


@pytest.mark.parametrize(("n_examples", "batch_size", "grad_accum", "epochs", "max_steps",
                          "steps"), [
    (10, 2, 1, 1, None, 5),
    (10, 2, 2, 2, None, 6),  # 5 micro-batches -> windows of 2, 2, 1 -> 3 steps per epoch
    (10, 2, 3, 1, None, 2),
    (10, 2, 2, 1, 7, 7),  # max_steps overrides epochs and runs over several passes
])
def test_optimiser_steps_are_counted_with_gradient_accumulation(
        base_model, tokenizer, n_examples, batch_size, grad_accum, epochs, max_steps, steps):
    params = tiny_params(batch_size=batch_size, grad_accum=grad_accum, epochs=epochs,
                         max_steps=max_steps)
    examples = (EXAMPLES * 2)[:n_examples]
    model = make_trainable(base_model, params.lora)
    calls = []
    original_step = torch.optim.AdamW.step

    def counting_step(self, *args, **kwargs):
        calls.append(1)
        return original_step(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.optim.AdamW, "step", counting_step)
        result = train(model, tokenizer, examples, params)
    assert result.steps == len(calls) == steps
    answer_tokens = sum(sum(t != IGNORE_INDEX for t in e.labels[1:])
                        for e in encode_examples(tokenizer, examples, 128).examples)
    if max_steps is None:
        assert result.loss_tokens == epochs * answer_tokens


def test_gradient_accumulation_matches_one_big_batch(tiny_model_dir, tokenizer):
    """Batch 4 equals 2 micro-batches of 2: the loss is normalised over the whole window."""
    histories = []
    for batch_size, grad_accum in ((4, 1), (2, 2)):
        params = tiny_params(batch_size=batch_size, grad_accum=grad_accum, group_by_length=False)
        model = make_trainable(AutoModelForCausalLM.from_pretrained(tiny_model_dir), params.lora)
        histories.append(train(model, tokenizer, EXAMPLES, params).loss_history)
    assert len(histories[0]) == len(histories[1]) == 6
    torch.testing.assert_close(torch.tensor(histories[1]), torch.tensor(histories[0]),
                               rtol=1e-4, atol=1e-5)


def test_accumulated_gradient_is_that_of_the_mean_answer_token_loss(base_model, tokenizer):
    """One window of 4 micro-batches = the gradient of the mean loss over all answer tokens."""
    params = tiny_params(batch_size=3, grad_accum=4, max_steps=1, max_grad_norm=1e9)
    model = make_trainable(base_model, params.lora)
    reference = copy.deepcopy(model)
    batch = PadCollator(tokenizer.pad_token_id)(encode_examples(tokenizer, EXAMPLES, 128).examples)
    reference(**batch).loss.backward()  # HF loss: mean over all non-ignored shifted labels
    expected = {n: p.grad.clone() for n, p in reference.named_parameters() if p.requires_grad}

    seen = {}
    original_step = torch.optim.AdamW.step

    def capturing_step(self, *args, **kwargs):
        seen.update({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
        return original_step(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.optim.AdamW, "step", capturing_step)
        train(model, tokenizer, EXAMPLES, params)
    assert seen.keys() == expected.keys()
    assert any(g.abs().sum() > 0 for g in expected.values())
    for name, grad in expected.items():
        torch.testing.assert_close(seen[name], grad, rtol=1e-4, atol=1e-6)


def test_empty_or_fully_truncated_data_is_a_clear_error(base_model, tokenizer):
    model = make_trainable(base_model, tiny_params().lora)
    with pytest.raises(ValueError, match="no training examples: the input data is empty"):
        train(model, tokenizer, [], tiny_params())
    with pytest.raises(ValueError, match="all 1 had their answer cut off by max_seq_len=16"):
        train(model, tokenizer, [chat("why? " * 50, "Because.")], tiny_params(max_seq_len=16))


def test_unknown_lora_target_module_is_a_clear_error(base_model):
    with pytest.raises(ValueError, match=r"\['c_attn'\] are not modules"):
        make_trainable(base_model, tiny_params(lora={"target_modules": ["q_proj", "c_attn"]}).lora)


# ------------------------------------------------------------------------------ the stage
def test_sft_stage_writes_adapter_metrics_and_curve(tiny_model_dir, tmp_path, monkeypatch):
    shutil.copytree(tiny_model_dir, tmp_path / "models" / "base")
    rows = [{"id": i, "category": "ML", "title": q, "question": "Please explain.", "answer": a,
             "guideline": "1. Define it."} for i, (q, a) in enumerate(QA)]
    rows += [{"id": 99, "category": "ML", "title": "T", "question": "Q", "ok": False,
              "answer": None}]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "distilled.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"sft": {"train": {
        "epochs": 2, "batch_size": 2, "max_seq_len": 320, "lora": {"r": 4, "alpha": 8}}}}))
    monkeypatch.chdir(tmp_path)
    runpy.run_path(str(REPO / "stages" / "sft.py"), run_name="__main__")

    metrics = json.loads((tmp_path / "metrics" / "sft.json").read_text())
    assert metrics["steps"] == 6 and metrics["examples_used"] == 6
    assert metrics["rows_in"] == 7
    assert metrics["rows_skipped"] == {"not_ok": 1, "no_answer": 0, "no_question": 0}
    assert metrics["final_loss"] < metrics["first_loss"]
    # Every example fits max_seq_len whole, so every one trains on its end-of-turn token.
    assert metrics["examples_with_eos"] == 6 and metrics["examples_with_eos_share"] == 1.0
    assert metrics["reproducibility"]["torch"] == torch.__version__
    assert (tmp_path / "models" / "sft" / "adapter_model.safetensors").exists()
    assert (tmp_path / "models" / "sft" / "tokenizer.json").exists()
    assert not list((tmp_path / "models").glob(".sft*"))  # no temporary dir left behind
    assert (tmp_path / "dvclive" / "sft" / "plots" / "metrics" / "train" / "loss.tsv").exists()


# ----------------------------------------------------------------------------------- DDP
DDP_SCRIPT = textwrap.dedent("""
    import json, sys
    from accelerate import PartialState
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from meteor.training.config import TrainParams
    from meteor.training.loop import train
    from meteor.training.lora import make_trainable

    model_dir, examples_file, grad_accum, out = sys.argv[1:]
    state = PartialState(cpu=True)  # gloo on CPU when launched by torchrun
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    examples = json.load(open(examples_file))
    params = TrainParams(epochs=2, batch_size=3, grad_accum=int(grad_accum), lr=1e-2,
                         group_by_length=False, lora={"r": 4, "alpha": 8, "dropout": 0.0})
    model = make_trainable(AutoModelForCausalLM.from_pretrained(model_dir), params.lora)
    result = train(model, tokenizer, examples, params)
    if state.is_main_process:
        json.dump({"processes": state.num_processes, "loss": result.loss_history,
                   "tokens_seen": result.tokens_seen, "loss_tokens": result.loss_tokens},
                  open(out, "w"))
""")


@pytest.mark.slow
def test_ddp_on_two_processes_equals_one_process_with_accumulation(tiny_model_dir, tmp_path):
    """2 DDP processes x 1 micro-batch == 1 process x 2 accumulated micro-batches, step by step.

    Accelerate hands batch i to process i % 2, so both runs see the same batches per step.
    """
    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT)
    examples = tmp_path / "examples.json"
    examples.write_text(json.dumps([chat(q, a + " " * i) for i, (q, a) in enumerate(QA * 4)]))
    results = run_single_and_ddp(script, [str(tiny_model_dir), str(examples)], tmp_path)
    assert len(results["ddp"]["loss"]) == len(results["single"]["loss"]) == 8
    torch.testing.assert_close(torch.tensor(results["ddp"]["loss"]),
                               torch.tensor(results["single"]["loss"]), rtol=1e-5, atol=1e-6)
    assert results["ddp"]["loss_tokens"] == results["single"]["loss_tokens"]
