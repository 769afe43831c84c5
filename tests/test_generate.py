"""Batched chat generation: same greedy outputs as one at a time, input order, no prompt echo,
reproducible seeded sampling, and no side effects on the caller's model or random state."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_TEXTS

from meteor.student.generate import GenerationParams
from meteor.student.generate import encode_prompts, generate, generation_kwargs, left_pad
from meteor.student.tiny import build_tiny_model, tiny_llama_config, train_tokenizer

QUESTIONS = [
    "What is overfitting?",
    "Why is my loss NaN after a few epochs when I train a convolutional network on images?",
    "Explain tokenization.",
    "How should I run inference in PyTorch so that dropout is off and no gradients are kept?",
    "Is cross-validation needed?",
    "What does a convolutional layer learn?",
    "Gradient descent?",
]
CONVERSATIONS = [[{"role": "user", "content": q}] for q in QUESTIONS]


@pytest.fixture(scope="module")
def student():
    """An untrained tiny student with a wide weight init, so greedy replies are varied text rather
    than one repeated token (which would make every comparison below trivially pass)."""
    tokenizer = train_tokenizer(TINY_TEXTS, vocab_size=400)
    config = tiny_llama_config(tokenizer, hidden_size=64, num_layers=2, intermediate_size=128)
    config.initializer_range = 0.3
    return build_tiny_model(config, seed=0), tokenizer


def test_batched_greedy_equals_one_at_a_time(student):
    model, tokenizer = student
    batched = generate(model, tokenizer, CONVERSATIONS, max_new_tokens=16, batch_size=3, progress=False)
    single = [generate(model, tokenizer, [c], max_new_tokens=16, batch_size=1, progress=False)[0]
              for c in CONVERSATIONS]
    assert batched == single
    assert all(batched) and len(set(batched)) > 1, batched  # real, varied text, not trivially equal


def test_results_follow_the_input_order(student):
    model, tokenizer = student
    forward = generate(model, tokenizer, CONVERSATIONS, max_new_tokens=12, batch_size=4, progress=False)
    backward = generate(model, tokenizer, CONVERSATIONS[::-1], max_new_tokens=12, batch_size=4,
                        progress=False)
    assert backward == forward[::-1]
    assert forward != backward  # the replies differ, so a wrong order could not go unnoticed


def test_only_new_tokens_are_returned(student):
    model, tokenizer = student
    conversation = CONVERSATIONS[1]
    reply = generate(model, tokenizer, [conversation], max_new_tokens=12, progress=False)[0]
    prompt = encode_prompts(tokenizer, [conversation])[0]
    full = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=12, do_sample=False)[0]
    assert reply == tokenizer.decode(full[len(prompt):], skip_special_tokens=True).strip()
    assert QUESTIONS[1] in tokenizer.decode(full) and QUESTIONS[1] not in reply
    assert "<|" not in reply  # special tokens stripped


def test_seeded_sampling_is_reproducible(student):
    model, tokenizer = student
    kwargs = dict(max_new_tokens=12, batch_size=4, do_sample=True, temperature=1.5, top_p=0.95,
                  progress=False)
    first = generate(model, tokenizer, CONVERSATIONS, seed=7, **kwargs)
    assert generate(model, tokenizer, CONVERSATIONS, seed=7, **kwargs) == first
    assert generate(model, tokenizer, CONVERSATIONS, seed=8, **kwargs) != first


def test_caller_state_is_left_alone(student):
    model, tokenizer = student
    model.train()
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    generate(model, tokenizer, CONVERSATIONS[:2], max_new_tokens=4, do_sample=True, progress=False)
    assert torch.equal(torch.rand(1), expected_next)  # global RNG untouched
    assert model.training  # training mode restored
    model.eval()


def test_progress_off_is_silent_and_a_label_shows(student, capsys):
    model, tokenizer = student
    quiet = generate(model, tokenizer, CONVERSATIONS[:2], max_new_tokens=4, progress=False)
    assert capsys.readouterr().err == ""
    labelled = generate(model, tokenizer, CONVERSATIONS[:2], max_new_tokens=4, progress="guidelines")
    assert "guidelines" in capsys.readouterr().err
    assert quiet == labelled


def test_beam_search_runs_and_empty_input(student):
    model, tokenizer = student
    beams = generate(model, tokenizer, CONVERSATIONS[:3], max_new_tokens=8, num_beams=3, batch_size=2,
                     progress=False)
    assert len(beams) == 3 and all(isinstance(b, str) for b in beams)
    assert generate(model, tokenizer, [], max_new_tokens=8) == []


def test_bad_conversation_is_named(student):
    model, tokenizer = student
    with pytest.raises(ValueError, match="conversation 1"):
        generate(model, tokenizer, [CONVERSATIONS[0], [{"text": "no role"}]], max_new_tokens=4)


def test_left_pad_right_aligns_prompts():
    input_ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert input_ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_generation_kwargs_come_from_params():
    params = GenerationParams(batch_size=4, max_new_tokens=32, do_sample=True, seed=3)
    kwargs = generation_kwargs(params, max_new_tokens=8)
    assert kwargs["batch_size"] == 4 and kwargs["do_sample"] and kwargs["seed"] == 3
    assert kwargs["max_new_tokens"] == 8  # overrides win
