"""Batched chat generation shared by guideline, refine, self_train, evaluate and the local teacher.

Conversations are rendered with the tokenizer's chat template (with the generation prompt), sorted
by length so each batch holds prompts of similar length (less padding), left-padded, generated
under ``torch.inference_mode`` and decoded without the prompt. Results come back in input order.
Sampling is seeded per call: the same inputs, seed and batch size give the same outputs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from pydantic import Field

from meteor.params import Section


class GenerationParams(Section):
    """Student decoding defaults shared by guideline, refine, self_train and evaluate."""

    batch_size: int = Field(16, ge=1)
    max_new_tokens: int = Field(128, ge=1)
    do_sample: bool = Field(False, description="Greedy (False) or seeded sampling.")
    temperature: float = Field(0.7, gt=0)
    top_p: float = Field(0.95, gt=0, le=1)
    repetition_penalty: float = Field(1.1, gt=0)
    no_repeat_ngram_size: int = Field(
        4, ge=0, description="Never repeat an n-gram of this size (0 = off); small students loop.")
    seed: int = 0

log = logging.getLogger(__name__)

Conversation = list[dict[str, str]]


@dataclass(frozen=True)
class Generation:
    """One reply with what it cost (``generate(..., return_stats=True)``)."""

    text: str
    tokens: int  # generated tokens, up to and including the first end token (no padding)
    seconds: float  # wall time of the batch it was decoded in, divided by the batch size
    stopped: bool = False  # the model ended the reply itself (an end token), not max_new_tokens


def generation_kwargs(params: GenerationParams, **overrides: Any) -> dict[str, Any]:
    """Keyword arguments for :func:`generate` from the ``generation`` params section."""
    kwargs = {
        "batch_size": params.batch_size,
        "max_new_tokens": params.max_new_tokens,
        "do_sample": params.do_sample,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "repetition_penalty": params.repetition_penalty,
        "no_repeat_ngram_size": params.no_repeat_ngram_size,
        "seed": params.seed,
    }
    kwargs.update(overrides)
    return kwargs


def encode_prompts(tokenizer, conversations: Sequence[Conversation]) -> list[list[int]]:
    """Token ids of each conversation rendered by the chat template, ending with the assistant turn."""
    ids = []
    for i, conv in enumerate(conversations):
        if not conv or not all(isinstance(m, dict) and "role" in m and "content" in m for m in conv):
            raise ValueError(f"conversation {i} is not a non-empty list of {{role, content}} messages")
        text = tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        # The template writes bos and role tokens itself; adding special tokens would double bos.
        ids.append(tokenizer.encode(text, add_special_tokens=False))
    return ids


def left_pad(prompts: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` with every prompt right-aligned, as decoder-only models need."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, width - len(ids):] = 1
    return input_ids, attention_mask


def _decoding_config(model, tokenizer, *, max_new_tokens: int, do_sample: bool, temperature: float,
                     top_p: float, repetition_penalty: float, no_repeat_ngram_size: int,
                     num_beams: int) -> dict[str, Any]:
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    config: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "do_sample": do_sample,
        "num_beams": num_beams,
        "repetition_penalty": repetition_penalty,
        "no_repeat_ngram_size": no_repeat_ngram_size,
        "pad_token_id": pad_id,
        "eos_token_id": (model.generation_config.eos_token_id
                         if model.generation_config.eos_token_id is not None else tokenizer.eos_token_id),
    }
    if do_sample:
        config.update(temperature=temperature, top_p=top_p, top_k=0)  # top_k=0: only top_p filters
    else:
        # Greedy/beam: neutralise sampling knobs a model's generation_config may carry (no warnings).
        config.update(temperature=None, top_p=None, top_k=None)
    return config


def generate(
    model,
    tokenizer,
    conversations: Sequence[Conversation],
    *,
    max_new_tokens: int,
    batch_size: int = 16,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    no_repeat_ngram_size: int = 0,
    num_beams: int = 1,
    seed: int = 0,
    progress: bool | str = True,
    return_stats: bool = False,
) -> list[str] | list[Generation]:
    """Generate one assistant reply per conversation; return only the new text, in input order.

    ``progress`` is ``False`` (silent), ``True`` or a string used as the progress bar's label.
    ``return_stats`` returns :class:`Generation` records (text, generated tokens, seconds, stopped) instead
    of plain strings, so a caller can measure what a decoding costs (self_train: beam vs greedy).
    """
    if batch_size < 1 or max_new_tokens < 1 or num_beams < 1:
        raise ValueError(f"batch_size ({batch_size}), max_new_tokens ({max_new_tokens}) and "
                         f"num_beams ({num_beams}) must be >= 1")
    if not conversations:
        return []
    prompts = encode_prompts(tokenizer, conversations)
    decoding = _decoding_config(model, tokenizer, max_new_tokens=max_new_tokens, do_sample=do_sample,
                                temperature=temperature, top_p=top_p,
                                repetition_penalty=repetition_penalty,
                                no_repeat_ngram_size=no_repeat_ngram_size, num_beams=num_beams)
    # Longest first: similar lengths share a batch, and an out-of-memory error shows up at once.
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    results: list[Generation | None] = [None] * len(prompts)
    end_ids = decoding["eos_token_id"]
    end_ids = set(end_ids if isinstance(end_ids, list) else [end_ids]) - {None}
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    rng_devices = [device] if device.type == "cuda" else []
    bar = tqdm(total=len(prompts), desc=progress if isinstance(progress, str) else "generate",
               disable=progress is False)
    try:
        # Fork the RNG so seeding here neither depends on nor disturbs the caller's random state.
        with torch.random.fork_rng(devices=rng_devices), torch.inference_mode():
            torch.manual_seed(seed)
            for start in range(0, len(order), batch_size):
                batch = order[start:start + batch_size]
                input_ids, attention_mask = left_pad([prompts[i] for i in batch], decoding["pad_token_id"])
                started = time.perf_counter()
                out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                     **decoding)
                new_tokens = out[:, input_ids.shape[1]:]  # left padding: every prompt ends at the same column
                texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
                seconds = (time.perf_counter() - started) / len(batch)
                for i, text, row in zip(batch, texts, new_tokens.tolist()):
                    results[i] = Generation(text.strip(), _generated_length(row, end_ids), seconds,
                                            stopped=any(t in end_ids for t in row))
                bar.update(len(batch))
    finally:
        bar.close()
        model.train(was_training)
    if return_stats:
        return results  # type: ignore[return-value]
    return [r.text for r in results]  # type: ignore[union-attr]


def _generated_length(row: list[int], end_ids: set[int]) -> int:
    """Tokens a reply took: up to and including its first end token; the rest is padding."""
    for position, token in enumerate(row):
        if token in end_ids:
            return position + 1
    return len(row)
