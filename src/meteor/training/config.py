"""The training loop's params: ``sft.train`` and the base of ``refine.train``,
``self_train.train`` and ``merge.train`` (each a subclass beside its own stage's code, so a
partial section keeps that stage's defaults), and the LoRA shape."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from meteor.params import Section


class LoraParams(Section):
    enabled: bool = Field(True, description="LoRA (True) or full fine-tuning (False).")
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                 "down_proj"])


class TrainParams(Section):
    """One training loop for sft, refine, self_train and merge."""

    epochs: int = Field(2, ge=1)
    max_steps: int | None = Field(
        None, ge=1, description="Exactly this many optimiser steps (overrides epochs) when set.")
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(2e-3, gt=0)
    warmup_ratio: float = Field(0.1, ge=0, le=1, description="Warmup steps / total steps.")
    lr_scheduler: Literal["linear", "cosine", "constant_with_warmup"] = Field(
        "linear", description="Decay after warmup (transformers.get_scheduler).")
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    max_seq_len: int = Field(
        1024, ge=8, description="Examples are cut to this many tokens; one cut in its answer "
                                "loses the end-of-turn token, and with it the lesson to stop.")
    group_by_length: bool = Field(True, description="Length-grouped batches (less padding).")
    seed: int = 0
    lora: LoraParams = Field(default_factory=LoraParams)


class SftParams(Section):
    train: TrainParams = Field(default_factory=TrainParams)
