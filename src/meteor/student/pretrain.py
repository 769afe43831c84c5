"""Pre-train the tiny offline student on the train split (the ``base`` stage for ``student.model: tiny``).

Each train row contributes two documents, so the model learns both the domain's prose and the chat
format the later stages prompt it with:

* plain text: title, question and answer (markdown) one after another;
* a chat: user = title + question, assistant = answer, rendered by the tokenizer's chat template.

Documents are tokenised, shuffled by a seeded generator, concatenated and cut into ``block_size``
blocks (GPT-style packing: no padding, every token trains). AdamW with linear warmup and cosine decay
runs exactly ``steps`` optimiser steps. Everything random comes from ``seed``, so two CPU runs on the
same machine save byte-identical files.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from meteor.kernels import adamw
from meteor.params import Section
from pydantic import Field, model_validator
from meteor.student.tiny import build_tiny_model, tiny_llama_config, train_tokenizer


class BaseParams(Section):
    """Pre-training of the tiny student (ignored when student.model is not 'tiny')."""

    vocab_size: int = Field(4096, ge=300, description="Byte-level BPE vocabulary size.")
    hidden_size: int = Field(192, ge=8)
    num_layers: int = Field(4, ge=1)
    num_heads: int = Field(4, ge=1)
    intermediate_size: int = Field(512, ge=8)
    max_seq_len: int = Field(
        1024, ge=16, description="Context length of the model: fits sft/refine examples whole "
                                 "(question + answer + end-of-turn), so the student learns to stop.")
    block_size: int = Field(512, ge=16, description="Tokens per pre-training sequence.")
    steps: int = Field(300, ge=1, description="Optimiser steps (bounded: ~2 min on 2 CPU cores).")
    batch_size: int = Field(4, ge=1, description="Blocks per step (300 x 4 x 512 = 614k tokens).")
    lr: float = Field(3e-3, gt=0)
    warmup_steps: int = Field(20, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    seed: int = 0

    @model_validator(mode="after")
    def _shapes(self) -> BaseParams:
        if self.hidden_size % self.num_heads:
            raise ValueError("hidden_size must be divisible by num_heads")
        if self.block_size > self.max_seq_len:
            raise ValueError("block_size must be <= max_seq_len")
        return self
from meteor.utils import seed_everything

log = logging.getLogger(__name__)

REQUIRED_FIELDS = ("title", "question", "answer")
MIN_LR_RATIO = 0.1  # cosine decays to 10% of the peak lr, not to zero (the usual LLM recipe)
FINAL_LOSS_WINDOW = 10  # final_loss averages the last steps: one batch's loss is noisy


@dataclass
class PretrainResult:
    model: LlamaForCausalLM
    tokenizer: PreTrainedTokenizerFast
    parameters: int
    tokens_seen: int
    final_loss: float
    loss_history: list[float] = field(default_factory=list)
    seconds: float = 0.0
    blocks: int = 0


def _check_row(row: dict[str, Any], index: int) -> None:
    missing = [k for k in REQUIRED_FIELDS if not isinstance(row.get(k), str)]
    if missing:
        raise ValueError(f"train row {index} (id={row.get('id')!r}) lacks text field(s) {missing}")


def plain_text(row: dict[str, Any]) -> str:
    """The row as one plain document (what the model reads as pre-training prose)."""
    return f"{row['title']}\n\n{row['question']}\n\n{row['answer']}"


def chat_messages(row: dict[str, Any]) -> list[dict[str, str]]:
    """The row as a chat: the user asks (title + body), the assistant gives the accepted answer."""
    return [
        {"role": "user", "content": f"{row['title']}\n\n{row['question']}"},
        {"role": "assistant", "content": row["answer"]},
    ]


def tokenize_documents(rows: Sequence[dict[str, Any]], tokenizer: PreTrainedTokenizerFast) -> list[list[int]]:
    """Token ids of every document: ``bos + text + eos`` for plain text, the chat template for chats."""
    docs = []
    for row in rows:
        docs.append([tokenizer.bos_token_id, *tokenizer.encode(plain_text(row), add_special_tokens=False),
                     tokenizer.eos_token_id])
        # The template already writes bos and the role/end tokens; encoding must not add more.
        chat = tokenizer.apply_chat_template(chat_messages(row), tokenize=False)
        docs.append(tokenizer.encode(chat, add_special_tokens=False))
    return docs


def pack_blocks(docs: Sequence[list[int]], block_size: int, generator: torch.Generator) -> torch.Tensor:
    """Shuffle documents, concatenate them and cut into ``(n_blocks, block_size)``; drop the tail."""
    order = torch.randperm(len(docs), generator=generator).tolist()
    stream = [tok for i in order for tok in docs[i]]
    n_blocks = len(stream) // block_size
    if n_blocks == 0:
        raise ValueError(
            f"the train split has only {len(stream)} tokens, fewer than one block of "
            f"base.block_size={block_size}; add data or lower base.block_size")
    return torch.tensor(stream[: n_blocks * block_size], dtype=torch.long).view(n_blocks, block_size)


def batch_indices(n_blocks: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless batches of block indices: a fresh seeded permutation per epoch, batches may span two."""
    pending = torch.empty(0, dtype=torch.long)
    while True:
        while len(pending) < batch_size:
            pending = torch.cat([pending, torch.randperm(n_blocks, generator=generator)])
        yield pending[:batch_size]
        pending = pending[batch_size:]


def warmup_cosine(warmup_steps: int, total_steps: int, min_ratio: float = MIN_LR_RATIO):
    """LR multiplier: linear warmup to 1, then cosine decay to ``min_ratio`` at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _optimizer(model: torch.nn.Module, params: BaseParams) -> torch.optim.AdamW:
    # Weight decay on matrices only; norms' gains shrinking towards 0 would only hurt.
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": params.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return adamw(groups, lr=params.lr, betas=(0.9, 0.95), eps=1e-8)  # fused: same bits on any CPU


def build_student(rows: Sequence[dict[str, Any]], params: BaseParams) -> tuple[LlamaForCausalLM,
                                                                                PreTrainedTokenizerFast]:
    """Train the tokenizer on the rows' plain text and build the untrained model sized by ``params``."""
    tokenizer = train_tokenizer((plain_text(r) for r in rows), vocab_size=params.vocab_size)
    config = tiny_llama_config(
        tokenizer,
        hidden_size=params.hidden_size,
        num_layers=params.num_layers,
        num_heads=params.num_heads,
        intermediate_size=params.intermediate_size,
        max_seq_len=params.max_seq_len,
    )
    return build_tiny_model(config, seed=params.seed), tokenizer


def pretrain(rows: Sequence[dict[str, Any]], params: BaseParams, *, progress: bool = True) -> PretrainResult:
    """Build the tiny student from ``rows`` (train split only) and pre-train it for ``params.steps``."""
    if not rows:
        raise ValueError("no train rows to pre-train on")
    for i, row in enumerate(rows):
        _check_row(row, i)
    start = time.perf_counter()
    seed_everything(params.seed)
    model, tokenizer = build_student(rows, params)
    n_params = sum(p.numel() for p in model.parameters())

    generator = torch.Generator().manual_seed(params.seed)
    blocks = pack_blocks(tokenize_documents(rows, tokenizer), params.block_size, generator)
    log.info("pre-training %.2fM parameters on %d rows -> %d blocks of %d tokens, %d steps of %d blocks",
             n_params / 1e6, len(rows), len(blocks), params.block_size, params.steps, params.batch_size)

    optimizer = _optimizer(model, params)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(params.warmup_steps, params.steps))
    batches = batch_indices(len(blocks), params.batch_size, generator)
    model.train()
    history: list[float] = []
    bar = tqdm(range(params.steps), desc="pretrain", disable=not progress)
    for _ in bar:
        input_ids = blocks[next(batches)]
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        history.append(loss.item())
        bar.set_postfix(loss=f"{history[-1]:.3f}")
    model.eval()

    final_loss = sum(history[-FINAL_LOSS_WINDOW:]) / len(history[-FINAL_LOSS_WINDOW:])
    seconds = time.perf_counter() - start
    log.info("pre-training done: final loss %.3f (first %.3f) in %.0fs", final_loss, history[0], seconds)
    return PretrainResult(
        model=model,
        tokenizer=tokenizer,
        parameters=n_params,
        tokens_seen=params.steps * params.batch_size * params.block_size,
        final_loss=final_loss,
        loss_history=history,
        seconds=seconds,
        blocks=len(blocks),
    )
