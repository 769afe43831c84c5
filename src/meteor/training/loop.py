"""The one training loop (sft, refine, self_train, merge), on accelerate.

Runs unchanged on one CPU, one GPU, or many GPUs under ``accelerate launch`` (DDP or DeepSpeed
ZeRO-2, see ``configs/accelerate/`` and ``docs/training.md``):

* AdamW, warmup then linear/cosine decay (``transformers.get_scheduler``), gradient clipping;
* gradient accumulation over ``grad_accum`` micro-batches, with the loss normalised by the number
  of answer tokens in the whole accumulation window on all processes, so every answer token
  weighs the same whatever the padding, batch composition or number of GPUs;
* bf16 (or fp16) autocast when a GPU is present, fp32 on CPU; an ``accelerate launch`` config
  that sets ``mixed_precision`` wins;
* deterministic on CPU for a given ``seed``;
* per-step loss and learning rate logged with DVCLive by the main process only.

The loss is pluggable (:class:`Objective`): :func:`train` runs the answer-token cross-entropy of
sft and refine; :func:`meteor.training.preference.train_pairs` runs self_train's pairwise losses
through the same :func:`run_training`, normalised by pairs instead of tokens.

The model is trained in place: pass it through :func:`meteor.training.lora.make_trainable` first.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler

from meteor.kernels import adamw
from meteor.student.load import context_length
from meteor.training.config import TrainParams
from meteor.training.data import (IGNORE_INDEX, ChatExample, EncodedData, PadCollator,
                                  encode_examples, make_batch_sampler)
from meteor.training.session import TrainSession
from meteor.utils import seed_everything

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    steps: int  # optimiser steps taken
    epochs: int  # passes started over the data
    loss_history: list[float] = field(default_factory=list)  # mean answer-token loss per step
    lr_history: list[float] = field(default_factory=list)  # learning rate used at each step
    tokens_seen: int = 0  # real (non-pad) tokens fed to the model, all processes
    # What the loss is normalised by, all processes: answer tokens (sft), pairs (pairwise).
    loss_tokens: int = 0
    # Per-step means of an objective's extra statistics (e.g. rewards/chosen), by name.
    history: dict[str, list[float]] = field(default_factory=dict)
    seconds: float = 0.0
    data: dict[str, int] = field(default_factory=dict)  # EncodedData.stats()

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_seen / self.seconds if self.seconds > 0 else 0.0

    @property
    def final_loss(self) -> float | None:
        return self.loss_history[-1] if self.loss_history else None

    def metrics(self) -> dict:
        """A flat summary for ``metrics/*.json``."""
        return {
            "final_loss": self.final_loss,
            "first_loss": self.loss_history[0] if self.loss_history else None,
            "steps": self.steps,
            "epochs": self.epochs,
            "tokens_seen": self.tokens_seen,
            "loss_tokens": self.loss_tokens,
            "train_seconds": round(self.seconds, 3),
            "tokens_per_s": round(self.tokens_per_s, 1),
            **self.data,
        }


def _windows(batches: Iterable[dict], size: int) -> Iterator[list[dict]]:
    """Group micro-batches into accumulation windows of ``size`` (the last may be shorter)."""
    window: list[dict] = []
    for batch in batches:
        window.append(batch)
        if len(window) == size:
            yield window
            window = []
    if window:
        yield window


def _answer_token_loss_sum(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy over answer tokens, and how many there were (fp32)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    loss_sum = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)),
                               targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
    return loss_sum, (targets != IGNORE_INDEX).sum()


class Objective(Protocol):
    """A loss the loop can optimise: a sum over *units* (tokens, pairs), normalised by the loop.

    ``units`` counts a micro-batch's units; ``loss_sum`` returns the summed loss over them and
    summed statistics (name -> scalar tensor) that the loop logs as per-unit means.
    """

    def units(self, batch: dict) -> int: ...

    def loss_sum(self, model, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...


class AnswerTokenLoss:
    """sft / refine: next-token cross-entropy, every answer token weighing the same."""

    def units(self, batch: dict) -> int:
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    def loss_sum(self, model, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss_sum, _ = _answer_token_loss_sum(model, batch)
        return loss_sum, {}


def _optimizer(model, params: TrainParams) -> torch.optim.Optimizer:
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("the model has no trainable parameters; call make_trainable() first")
    for name, p in trainable:
        if p.dtype != torch.float32:
            # AdamW on half-precision weights loses small updates; keep fp32 master weights
            # (autocast still computes in bf16/fp16 on GPU).
            log.info("upcasting trainable parameters to fp32 (first: %s was %s)", name, p.dtype)
            break
    for _, p in trainable:
        if p.dtype != torch.float32:
            p.data = p.data.float()
    # No weight decay on biases and norm weights (1-D), as is standard for transformers.
    groups = [
        {"params": [p for _, p in trainable if p.ndim >= 2], "weight_decay": params.weight_decay},
        {"params": [p for _, p in trainable if p.ndim < 2], "weight_decay": 0.0},
    ]
    return adamw([g for g in groups if g["params"]], lr=params.lr)  # fused: same bits on any CPU


def train(
    model,
    tokenizer,
    examples: Sequence[ChatExample] | EncodedData,
    params: TrainParams,
    *,
    log_dir: str | Path | None = None,
    live=None,
    desc: str = "train",
    session: TrainSession | None = None,
) -> TrainResult:
    """Fine-tune ``model`` in place on chat ``examples`` (loss on assistant tokens only).

    ``log_dir`` starts a DVCLive log there (per-step ``train/loss`` and ``train/lr``); or pass
    an open ``dvclive.Live`` as ``live`` to continue one (refine logs all its updates in one
    curve). ``session``: the stage's :class:`~meteor.training.session.TrainSession`, so repeated
    calls (refine's in-loop updates) share one Accelerator and prepare the model once; without
    it the call makes and closes its own. Returns a :class:`TrainResult`.
    """
    data = examples if isinstance(examples, EncodedData) else encode_examples(
        tokenizer, examples, params.max_seq_len)
    if data.n_input == 0:
        raise ValueError("no training examples: the input data is empty")
    if not data.examples:
        raise ValueError(f"no training examples left: all {data.n_input} had their answer cut off "
                         f"by max_seq_len={params.max_seq_len}")
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token first")
    return run_training(model, data.examples, data.lengths, PadCollator(tokenizer.pad_token_id),
                        AnswerTokenLoss(), params, log_dir=log_dir, live=live, desc=desc,
                        data_stats=data.stats(), session=session)


def run_training(
    model,
    items: Sequence,
    lengths: Sequence[int],
    collate_fn: Callable[[list], dict],
    objective: Objective,
    params: TrainParams,
    *,
    log_dir: str | Path | None = None,
    live=None,
    desc: str = "train",
    data_stats: dict[str, int] | None = None,
    session: TrainSession | None = None,
) -> TrainResult:
    """The optimisation machinery shared by every objective: ``items`` (batched by the length
    sampler on ``lengths``, collated by ``collate_fn``) trained with ``objective``'s loss, summed
    and divided by its units in each accumulation window. See :func:`train` for the rest."""
    if not items:
        raise ValueError("no training items")
    context = context_length(model)
    if context is not None and max(lengths) > context:
        raise ValueError(f"examples of up to {max(lengths)} tokens (max_seq_len="
                         f"{params.max_seq_len}) exceed the model's context of {context} tokens; "
                         "lower max_seq_len (or, for the tiny student, raise base.max_seq_len)")
    seed_everything(params.seed)
    own_session = session is None  # a one-off call: its own Accelerator, closed at the end
    if own_session:
        session = TrainSession(model, params)
    session.check(model, params)
    accelerator = session.accelerator

    sampler = make_batch_sampler(lengths, params.batch_size,
                                 group_by_length=params.group_by_length, seed=params.seed)
    loader = DataLoader(items, batch_sampler=sampler, collate_fn=collate_fn)
    optimizer = _optimizer(model, params)
    model, optimizer, loader = session.prepare(optimizer, loader)

    # `accelerate launch` (env) or a DeepSpeed config may override grad_accum; theirs is used.
    grad_accum = accelerator.gradient_accumulation_steps
    if grad_accum != params.grad_accum:
        log.warning("grad_accum=%d from the accelerate config overrides params (%d)",
                    grad_accum, params.grad_accum)
    steps_per_epoch = math.ceil(len(loader) / grad_accum)  # len(loader): this process's batches
    total_steps = params.max_steps or params.epochs * steps_per_epoch
    # The scheduler is stepped by hand once per optimiser step (not prepared: accelerate would
    # step it once per process).
    scheduler = get_scheduler(params.lr_scheduler, optimizer,
                              num_warmup_steps=math.ceil(params.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    log.info("%s: %d examples, %d steps (%d per epoch, batch %d x accum %d x %d processes), "
             "mixed precision %s", desc, len(items), total_steps, steps_per_epoch,
             params.batch_size, grad_accum, accelerator.num_processes, accelerator.mixed_precision)

    own_live = None
    if accelerator.is_main_process and live is None and log_dir is not None:
        from dvclive import Live

        # No git side effects: the DVC stage, not DVCLive, records the experiment.
        live = own_live = Live(dir=str(log_dir), save_dvc_exp=False, dvcyaml=None)
    if not accelerator.is_main_process:
        live = None

    result = TrainResult(steps=0, epochs=0, data=dict(data_stats or {}))
    model.train()
    progress = tqdm(total=total_steps, desc=desc, disable=not accelerator.is_local_main_process)
    start = time.perf_counter()
    try:
        while result.steps < total_steps:
            sampler.set_epoch(result.epochs)
            if hasattr(loader, "set_epoch"):
                loader.set_epoch(result.epochs)
            result.epochs += 1
            for window in _windows(loader, grad_accum):
                _train_step(accelerator, model, optimizer, scheduler, window, params, result,
                            objective)
                progress.update(1)
                progress.set_postfix(loss=f"{result.loss_history[-1]:.4f}")
                if live is not None:
                    live.log_metric("train/loss", result.loss_history[-1])
                    live.log_metric("train/lr", result.lr_history[-1])
                    for name, values in result.history.items():
                        live.log_metric(f"train/{name}", values[-1])
                    live.next_step()
                if result.steps >= total_steps:
                    break
    finally:
        accelerator.sync_gradients = True
        progress.close()
        if own_live is not None:
            own_live.end()
    accelerator.wait_for_everyone()
    result.seconds = time.perf_counter() - start
    model.eval()
    if own_session:
        session.close()  # drop DDP/DeepSpeed wrappers; the caller's model is trained
    else:
        session.release(optimizer, loader)  # the prepared model stays for the next call
    log.info("%s: %d steps, loss %.4f -> %.4f, %.0f tokens/s", desc, result.steps,
             result.loss_history[0], result.loss_history[-1], result.tokens_per_s)
    return result


def _train_step(accelerator: Accelerator, model, optimizer, scheduler, window: list[dict],
                params: TrainParams, result: TrainResult, objective: Objective) -> None:
    """One optimiser step over an accumulation window of micro-batches."""
    local_tokens = sum(objective.units(b) for b in window)
    window_tokens = accelerator.reduce(
        torch.tensor(local_tokens, device=accelerator.device), reduction="sum").item()
    # A window without a unit (e.g. pairs whose masks are all empty) has a zero loss sum: divide
    # by 1 rather than 0, so it gives a zero gradient and a 0 loss, never NaN.
    denominator = max(window_tokens, 1)
    # accelerator.backward divides by grad_accum (DeepSpeed by its own, equal, value) and DDP
    # averages over processes; undo both so the gradient is that of sum(loss) / window_tokens.
    scale = accelerator.gradient_accumulation_steps * accelerator.num_processes / denominator
    loss_sum = torch.zeros((), device=accelerator.device)
    seen = torch.zeros((), device=accelerator.device, dtype=torch.long)
    stats: dict[str, torch.Tensor] = {}
    for i, batch in enumerate(window):
        last = i == len(window) - 1
        # Sync gradients across processes (and let DeepSpeed step) only on the last micro-batch.
        accelerator.sync_gradients = last
        with contextlib.nullcontext() if last else accelerator.no_sync(model):
            batch_loss, batch_stats = objective.loss_sum(model, batch)
            accelerator.backward(batch_loss * scale)
        loss_sum += batch_loss.detach()
        seen += batch["attention_mask"].sum()
        for name, value in batch_stats.items():
            stats[name] = stats.get(name, 0) + value.detach().float()
    accelerator.clip_grad_norm_(model.parameters(), params.max_grad_norm)
    result.lr_history.append(scheduler.get_last_lr()[0])
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)

    names = sorted(stats)  # the same order on every process
    totals = accelerator.reduce(torch.stack([loss_sum, seen.to(loss_sum.dtype),
                                             *(stats[n].to(loss_sum.device) for n in names)]),
                                reduction="sum")
    result.steps += 1
    result.loss_history.append(totals[0].item() / denominator)
    result.tokens_seen += int(totals[1].item())
    result.loss_tokens += int(window_tokens)
    for name, total in zip(names, totals[2:].tolist()):
        result.history.setdefault(name, []).append(total / denominator)
