"""The student on the accelerator: where load_student puts it, and one accelerate set-up per stage.

No GPU is needed: CUDA availability is monkeypatched to test the placement logic, a "meta" device
stands in for the accelerator to see that the model is moved, and the Accelerator is counted.
"""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator
from transformers import AutoModelForCausalLM, AutoTokenizer

import meteor.student.load as load_mod
import meteor.training.session as session_mod
from meteor.training.config import LoraParams, TrainParams
from meteor.refine import weight_fingerprint
from meteor.student.load import default_device, load_student, prepare_tokenizer_for_generation
from meteor.training.loop import train
from meteor.training.lora import make_trainable, save_trained
from meteor.training.session import TrainSession

EXAMPLES = [[{"role": "user", "content": f"Question {i} about the loss?"},
             {"role": "assistant", "content": f"Answer {i}: step against the gradient."}]
            for i in range(6)]
PARAMS = TrainParams(epochs=1, batch_size=2, lr=1e-2, warmup_ratio=0.0, max_seq_len=64)
LORA = LoraParams(r=4, alpha=8, dropout=0.0)


@pytest.fixture
def no_accelerator_env(monkeypatch):
    for var in ("ACCELERATE_USE_CPU", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


def test_default_device_is_the_gpu_of_this_process_when_there_is_one(monkeypatch,
                                                                      no_accelerator_env):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert default_device() == torch.device("cuda", 0)
    monkeypatch.setenv("LOCAL_RANK", "3")  # accelerate launch: one GPU per process
    assert default_device() == torch.device("cuda", 3)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")  # accelerate launch --cpu
    assert default_device() == torch.device("cpu")


def test_default_device_falls_back_to_the_cpu(monkeypatch, no_accelerator_env):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_device() == torch.device("cpu")


def test_default_device_is_where_accelerate_trains():
    assert Accelerator().device == default_device()


def test_load_student_moves_the_model_once_to_the_default_device(tiny_model_dir, tmp_path,
                                                                  monkeypatch):
    model, tokenizer = load_student(tiny_model_dir, device=None)
    adapter = make_trainable(model, LORA, seed=0)
    save_trained(adapter, tokenizer, tmp_path / "adapter")
    # "meta" stands in for a GPU: every parameter ends up there, base and adapter alike.
    monkeypatch.setattr(load_mod, "default_device", lambda: torch.device("meta"))
    for path in (tiny_model_dir, tmp_path / "adapter"):
        loaded, _ = load_student(path)
        assert {p.device.type for p in loaded.parameters()} == {"meta"}
    kept, _ = load_student(tiny_model_dir, device=None)
    assert {p.device.type for p in kept.parameters()} == {"cpu"}


@pytest.fixture
def student(tiny_model_dir):
    tokenizer = prepare_tokenizer_for_generation(AutoTokenizer.from_pretrained(tiny_model_dir))
    model = make_trainable(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LORA, seed=0)
    return model, tokenizer


@pytest.fixture
def count_accelerators(monkeypatch):
    made = []

    class CountingAccelerator(Accelerator):
        def __init__(self, *args, **kwargs):
            made.append(self)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(session_mod, "Accelerator", CountingAccelerator)
    return made


def test_repeated_training_calls_share_one_accelerator_and_one_prepared_model(
        student, count_accelerators, monkeypatch):
    model, tokenizer = student
    prepared = []
    real_prepare = Accelerator.prepare

    def prepare(self, *objects, **kwargs):
        prepared.extend(type(o).__name__ for o in objects if isinstance(o, torch.nn.Module))
        return real_prepare(self, *objects, **kwargs)

    monkeypatch.setattr(Accelerator, "prepare", prepare)
    session = TrainSession(model, PARAMS)
    for seed in range(3):
        train(model, tokenizer, EXAMPLES, PARAMS.model_copy(update={"seed": seed}), session=session)
    assert len(count_accelerators) == 1 and session.prepare_count == 1 and len(prepared) == 1
    # Each call's optimizer and loader are dropped; only the model stays prepared.
    assert session.accelerator._optimizers == [] and session.accelerator._dataloaders == []
    session.close()


def test_a_shared_session_trains_exactly_like_separate_calls(tiny_model_dir):
    def run(shared: bool):
        tokenizer = prepare_tokenizer_for_generation(AutoTokenizer.from_pretrained(tiny_model_dir))
        model = make_trainable(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LORA, seed=0)
        session = TrainSession(model, PARAMS) if shared else None
        for seed in range(2):
            train(model, tokenizer, EXAMPLES, PARAMS.model_copy(update={"seed": seed}),
                  session=session)
        return weight_fingerprint(model)

    assert run(shared=True) == run(shared=False)


def test_a_session_refuses_another_model_or_grad_accum(student, tiny_model_dir):
    model, tokenizer = student
    session = TrainSession(model, PARAMS)
    other = make_trainable(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LORA, seed=0)
    with pytest.raises(ValueError, match="another model"):
        train(other, tokenizer, EXAMPLES, PARAMS, session=session)
    with pytest.raises(ValueError, match="grad_accum=2"):
        train(model, tokenizer, EXAMPLES, PARAMS.model_copy(update={"grad_accum": 2}),
              session=session)


def test_refine_makes_one_accelerator_for_all_its_updates(student, count_accelerators):
    from test_refine import ScriptedTeacher, make_inputs, refine_params

    from meteor.student.generate import GenerationParams
    from meteor.refine import refine

    model, tokenizer = student
    run = refine(model, tokenizer, ScriptedTeacher({}), make_inputs(6),
                 refine_params(keep_failed="reference"), GenerationParams(max_new_tokens=4))
    assert len(run.updates) == 3
    assert len(count_accelerators) == 1


def test_training_longer_than_the_models_context_is_refused(student):
    model, tokenizer = student
    long = [[{"role": "user", "content": "why " * 300}, {"role": "assistant", "content": "ok"}]]
    with pytest.raises(ValueError, match="exceed the model's context of 512 tokens"):
        train(model, tokenizer, long, PARAMS.model_copy(update={"max_seq_len": 2048}))
