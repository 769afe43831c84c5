"""Chat examples -> token ids + labels with the loss on assistant tokens only, plus batching.

An *example* is either a list of chat messages whose last turn is the assistant's, or a pair
``(prompt_messages, answer)``. Encoding puts ``labels = -100`` on every token that is not written
by the assistant (system, user, role headers) and, after collation, on padding, so the loss is
the answer's alone (METEOR's published code also trains on the prompt).

Two ways to find the assistant tokens:

* templates with ``{% generation %}`` blocks (the tiny student's): ``apply_chat_template(...,
  return_assistant_tokens_mask=True)`` marks them, for every assistant turn;
* any other chat template (most hub models): tokenize the prompt with
  ``add_generation_prompt=True`` and train on what follows it in the full conversation (the last
  assistant turn and its end-of-turn token, without the whitespace after it), after checking that
  the prompt tokens are a prefix of the full tokens and that the answer and an end-of-turn token
  are what follows.
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Union

import torch

from meteor.prompts import student_answer_messages

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # labels ignored by the loss

Message = dict[str, str]
ChatExample = Union[list[Message], tuple[list[Message], str]]

_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


# ------------------------------------------------------------------------------- examples
def question_answer_example(row: dict, answer: str) -> list[Message]:
    """A chat example: the student's prompt for the question (system: expert of its field, user:
    title + body; the same messages refine and evaluate ask with), assistant = ``answer``."""
    return [*student_answer_messages(row), {"role": "assistant", "content": answer}]


ROW_SKIP_REASONS = ("not_ok", "no_answer", "no_question")


def answer_examples(rows: Sequence[dict], answer_key: str = "answer"
                    ) -> tuple[list[list[Message]], Counter]:
    """Chat examples from question records carrying an answer (e.g. ``data/distilled.jsonl``).

    Rows marked ``"ok": false`` (a failed teacher call) or without a usable answer or question
    text are skipped; returns the examples and the skip counts by reason (``ROW_SKIP_REASONS``).
    """
    examples: list[list[Message]] = []
    skipped: Counter = Counter()
    for row in rows:
        answer = row.get(answer_key)
        if row.get("ok") is False:
            skipped["not_ok"] += 1
        elif not isinstance(answer, str) or not answer.strip():
            skipped["no_answer"] += 1
        elif not all(isinstance(row.get(k), str) and row[k].strip() for k in ("title", "question")):
            skipped["no_question"] += 1
        else:
            examples.append(question_answer_example(row, answer))
    if skipped:
        log.warning("skipped %d of %d rows: %s", sum(skipped.values()), len(rows), dict(skipped))
    return examples, skipped


# ------------------------------------------------------------------------------- encoding
@dataclass
class EncodedExample:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where the loss does not apply

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class EncodedData:
    """Encoded examples plus what happened to the others (never a silent hole)."""

    examples: list[EncodedExample] = field(default_factory=list)
    n_input: int = 0
    n_truncated: int = 0  # answer partly cut by max_seq_len, kept
    n_skipped: int = 0  # answer cut off entirely by max_seq_len, dropped
    # Examples whose trained tokens still include the end-of-turn (eos) token: only these teach
    # the model to stop, so a max_seq_len that cuts most answers gives a student that never ends.
    n_with_eos: int = 0

    @property
    def lengths(self) -> list[int]:
        return [len(e) for e in self.examples]

    def stats(self) -> dict[str, int]:
        return {
            "examples_in": self.n_input,
            "examples_used": len(self.examples),
            "examples_truncated": self.n_truncated,
            "examples_skipped_too_long": self.n_skipped,
            "examples_with_eos": self.n_with_eos,
            "examples_with_eos_share": (round(self.n_with_eos / len(self.examples), 4)
                                        if self.examples else None),
        }


def has_generation_tags(tokenizer) -> bool:
    """Whether the chat template marks assistant text with ``{% generation %}``."""
    template = tokenizer.chat_template
    if isinstance(template, dict):  # named templates; "default" is the one used
        template = template.get("default", "")
    return bool(template) and bool(_GENERATION_TAG.search(template))


def _as_messages(example: ChatExample, index: int) -> list[Message]:
    if isinstance(example, tuple):
        if len(example) != 2 or not isinstance(example[1], str):
            raise ValueError(f"example {index}: a pair must be (prompt_messages, answer: str)")
        prompt, answer = example
        messages = [*prompt, {"role": "assistant", "content": answer}]
    else:
        messages = list(example)
    if not messages or messages[-1].get("role") != "assistant":
        raise ValueError(f"example {index}: the last message must be the assistant's answer")
    if not isinstance(messages[-1].get("content"), str) or not messages[-1]["content"].strip():
        raise ValueError(f"example {index}: the assistant's answer is empty")
    return messages


def _token_ids(tokenizer, messages: list[Message], **kwargs) -> dict[str, list[int]]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)
    return {k: list(v) for k, v in out.items()}


def _encode_full(tokenizer, messages: list[Message], use_mask: bool, index: int) -> EncodedExample:
    if use_mask:
        out = _token_ids(tokenizer, messages, return_assistant_tokens_mask=True)
        ids, mask = out["input_ids"], out["assistant_masks"]
    else:
        ids, mask = _prefix_fallback_mask(tokenizer, messages, index)
    labels = [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]
    return EncodedExample(input_ids=ids, labels=labels)


def _prefix_fallback_mask(tokenizer, messages: list[Message], index: int
                          ) -> tuple[list[int], list[int]]:
    """Token ids and assistant mask of a conversation whose template has no generation tags.

    The loss covers what follows the generation prompt: the answer and the template's end-of-turn
    token (e.g. ChatML's ``<|im_end|>``), not the whitespace the template writes after it (ChatML's
    newline before the next turn), which the model never generates (decoding stops at the
    end-of-turn token). What the template can get wrong is checked and raised, never trained on.
    """
    ids = _token_ids(tokenizer, messages)["input_ids"]
    prompt = _token_ids(tokenizer, messages[:-1], add_generation_prompt=True)["input_ids"]
    if ids[: len(prompt)] != prompt:
        # The template renders the history differently once an answer follows (e.g. it
        # strips reasoning); training on such a split would put prompt tokens in the loss.
        raise ValueError(
            f"example {index}: the chat template's generation prompt is not a prefix of the "
            "full conversation, so the answer tokens cannot be located; use a template with "
            "{% generation %} tags")
    end = len(ids)
    while end > len(prompt) and not _decode(tokenizer, ids[end - 1:end]).strip():
        end -= 1
    labelled = _decode(tokenizer, ids[len(prompt):end])
    answer = messages[-1]["content"].strip()
    at = labelled.find(answer)
    if at < 0:
        raise ValueError(
            f"example {index}: the chat template does not render the assistant's answer verbatim "
            "after the generation prompt (it rewrites or drops part of it), so the loss would not "
            "be on the answer")
    if not labelled[at + len(answer):].strip():
        raise ValueError(
            f"example {index}: the chat template writes no end-of-turn token after the answer, so "
            "a model trained on it would never learn to stop")
    return ids, [0] * len(prompt) + [1] * (end - len(prompt)) + [0] * (len(ids) - end)


def _decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def encode_example(tokenizer, example: ChatExample, max_seq_len: int, *,
                   use_mask: bool | None = None, index: int = 0
                   ) -> tuple[EncodedExample | None, bool]:
    """One example, truncated to ``max_seq_len``: ``(encoded, truncated)``, or ``(None, True)``
    when the answer is cut off entirely. ``use_mask`` defaults to :func:`has_generation_tags`."""
    if use_mask is None:
        use_mask = has_generation_tags(tokenizer)
    enc = _encode_full(tokenizer, _as_messages(example, index), use_mask, index)
    if not any(t != IGNORE_INDEX for t in enc.labels):
        raise ValueError(f"example {index}: no assistant tokens found by the chat template")
    if len(enc) <= max_seq_len:
        return enc, False
    enc = EncodedExample(enc.input_ids[:max_seq_len], enc.labels[:max_seq_len])
    if all(t == IGNORE_INDEX for t in enc.labels):
        return None, True
    return enc, True


def encode_examples(tokenizer, examples: Sequence[ChatExample], max_seq_len: int) -> EncodedData:
    """Encode chat examples, truncating each to ``max_seq_len`` tokens (keeping the start).

    An example whose answer starts beyond ``max_seq_len`` has nothing left to learn from: it is
    skipped and counted. An answer cut part-way is kept and counted as truncated. Examples that
    still train on the tokenizer's eos (end-of-turn) token are counted (``n_with_eos``).
    """
    use_mask = has_generation_tags(tokenizer)
    eos = tokenizer.eos_token_id
    data = EncodedData(n_input=len(examples))
    for i, example in enumerate(examples):
        enc, truncated = encode_example(tokenizer, example, max_seq_len, use_mask=use_mask, index=i)
        if enc is None:
            data.n_skipped += 1
            continue
        data.n_truncated += truncated
        data.n_with_eos += eos is not None and eos in enc.labels
        data.examples.append(enc)
    if data.n_skipped or data.n_truncated:
        log.warning("max_seq_len=%d: %d of %d examples truncated, %d skipped (answer cut off)",
                    max_seq_len, data.n_truncated, data.n_input, data.n_skipped)
    return data


# ------------------------------------------------------------------------------- batching
class PadCollator:
    """Right-pad a list of encoded examples into a batch of tensors."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, batch: Sequence[EncodedExample]) -> dict[str, torch.Tensor]:
        width = max(len(e) for e in batch)
        input_ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, e in enumerate(batch):
            n = len(e)
            input_ids[row, :n] = torch.tensor(e.input_ids)
            labels[row, :n] = torch.tensor(e.labels)
            attention_mask[row, :n] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


class RandomBatchSampler:
    """Shuffled batches of indices, reshuffled per epoch from ``seed + epoch``.

    Each batch is padded to its longest example, so mixed lengths waste compute on padding.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self.drop_last = False  # read by accelerate when it shards batches across processes

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _permutation(self) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(len(self.lengths), generator=generator).tolist()

    def _chunks(self, indices: list[int]) -> list[list[int]]:
        return [indices[i:i + self.batch_size] for i in range(0, len(indices), self.batch_size)]

    def __iter__(self) -> Iterator[list[int]]:
        yield from self._chunks(self._permutation())

    def __len__(self) -> int:
        return math.ceil(len(self.lengths) / self.batch_size)


class LengthGroupedBatchSampler(RandomBatchSampler):
    """Batches of similar lengths, still in a seeded random order.

    Shuffle, cut into mega-batches of ``batch_size * mega_batch_mult`` examples, sort each
    mega-batch by length so its batches hold neighbours in length (little padding), then shuffle
    the order of all batches so consecutive steps do not walk from long to short.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int = 0,
                 mega_batch_mult: int = 50):
        super().__init__(lengths, batch_size, seed)
        self.mega_batch_size = batch_size * mega_batch_mult

    def __iter__(self) -> Iterator[list[int]]:
        indices = self._permutation()
        batches: list[list[int]] = []
        for start in range(0, len(indices), self.mega_batch_size):
            mega = sorted(indices[start:start + self.mega_batch_size],
                          key=lambda i: self.lengths[i], reverse=True)
            batches.extend(self._chunks(mega))
        generator = torch.Generator().manual_seed(self.seed + self.epoch + 1_000_003)
        order = torch.randperm(len(batches), generator=generator).tolist()
        yield from (batches[i] for i in order)


def make_batch_sampler(lengths: Sequence[int], batch_size: int, *, group_by_length: bool,
                       seed: int) -> RandomBatchSampler:
    cls = LengthGroupedBatchSampler if group_by_length else RandomBatchSampler
    return cls(lengths, batch_size, seed=seed)
