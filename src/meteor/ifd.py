"""IFD and r-IFD scores of question-answer rows by the student, batched.

Conventions (read from the anchors' code, chat-templated through the student's own template):

* **conditioned answer loss** ``L(A|Q)``: mean token cross-entropy of the answer tokens after the
  student's prompt for the question (:func:`meteor.prompts.student_answer_messages` rendered with
  the assistant header, i.e. exactly how the student is trained and asked);
* **direct answer loss** ``L(A)``: the same answer tokens after the *minimal prefix* only: what the
  template puts before any message (e.g. a BOS token) plus its assistant header;
* ``ifd_loss = L(A|Q) / L(A)`` (Cherry LLM's ratio of mean losses) and
  ``ifd_ppl = exp(L(A|Q)) / exp(L(A))`` (Superfiltering's ratio of perplexities); they rank rows
  differently, so both are computed;
* ``r_ifd = PPL(Q | reverse prompt containing A) / PPL(Q)`` (Selective Reflection-Tuning): the
  question text (:func:`meteor.prompts.format_question`) scored as the reply to
  :func:`reverse_question_messages`, against the question after the minimal prefix.

The conditioned and direct passes of a score always score the *same* target token ids: the
prompt and the target are tokenised separately and concatenated (the answer is never searched
for in a rendered string). Targets are the text's tokens alone, without the end-of-turn token.

Truncation to ``max_seq_len`` tokens (the scorer's context), the same for both passes:

* IFD: the answer keeps its first ``max_seq_len - len(question prompt)`` tokens; those tokens are
  scored in both passes (the direct pass is shorter, so it always fits);
* r-IFD: the reverse prompt shows the answer as scored above, shortened further (a token prefix,
  decoded) until the whole question fits after it; only if the question does not fit even after
  an empty answer is the question cut, and then both r-IFD passes score the same cut question.

A target with no tokens left (an empty answer, or a prompt longer than the context) has no mean
loss: its scores are NaN, for the selection to drop and count.

Scoring is batched: all sequences of all rows are de-duplicated (the distilled and refined versions
of a question share their question-alone pass, and everything when the answers are the same),
sorted by length and padded, and the loss is computed in float32 on the target tokens only. Right
padding (the default) needs no attention mask: under causal attention no real token sees the
padding after it, so the model keeps its fast unmasked attention kernel. Left padding is masked and
given explicit position ids (so it does not shift positions). Only the positions that predict a
target token are projected to the vocabulary (the largest matmul per token of a small model).
Scores do not depend on the batch size, the padding side or the order of the rows, up to float
rounding.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from meteor.prompts import field_of, format_question, student_answer_messages

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
PASSES = ("answer_conditioned", "answer_direct", "question_conditioned", "question_direct")


# ------------------------------------------------------------------------------ reverse prompt
def reverse_question_messages(question: dict, answer: str) -> list[dict]:
    """Selective Reflection-Tuning's reverse prompt: given only the answer, guess the question.

    r-IFD scores the question text (:func:`meteor.prompts.format_question`) as the reply to these
    messages: the answer is shown, the question is not. Adapted from the published prompt ("Below
    is the response to an instruction, please guess the corresponding instruction for the given
    response. ... Generate the instruction for the above response.") to our title + body format.
    It lives here, with the only stage that asks it, so editing it re-runs only ifd_select.
    """
    instruction = (
        f"Below is the answer to a {field_of(question)} question. "
        "Guess the question it answers.\n\n"
        f"Answer:\n{answer}\n\n"
        "Write the question (its title and body) that the answer above responds to."
    )
    return [
        {"role": "system", "content": f"You are an expert in {field_of(question)}."},
        {"role": "user", "content": instruction},
    ]


# ------------------------------------------------------------------------------------ encoding
def chat_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of ``messages`` rendered by the chat template, ending with the assistant header."""
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                        return_dict=True)
    return list(out["input_ids"])


def minimal_prefix_ids(tokenizer) -> list[int]:
    """What the template puts before any message (e.g. BOS) followed by its assistant header.

    The header is the text ``add_generation_prompt=True`` appends to a conversation; the leading
    tokens are those the rendered conversation starts with before its first message's text.
    """
    probe = [{"role": "user", "content": "x"}]
    with_header = tokenizer.apply_chat_template(probe, add_generation_prompt=True, tokenize=False)
    without = tokenizer.apply_chat_template(probe, add_generation_prompt=False, tokenize=False)
    if not with_header.startswith(without) or len(with_header) == len(without):
        raise ValueError("the chat template's generation prompt is not a suffix added to the "
                         "conversation, so its assistant header cannot be found")
    header = tokenizer(with_header[len(without):], add_special_tokens=False)["input_ids"]
    first = chat_prompt_ids(tokenizer, probe)[:1]
    bos = tokenizer.bos_token_id
    lead = first if bos is not None and first == [bos] else []
    prefix = [*lead, *header]
    if not prefix:
        raise ValueError("the chat template has neither a BOS token nor an assistant header: "
                         "there is no minimal prefix to score the direct pass after")
    return prefix


@dataclass(frozen=True)
class RowEncoding:
    """The four scored sequences of one row, as (prefix ids, target ids), and what was cut."""

    answer_prompt: tuple[int, ...]
    answer: tuple[int, ...]  # the scored answer tokens (both IFD passes)
    reverse_prompt: tuple[int, ...]
    question: tuple[int, ...]  # the scored question tokens (both r-IFD passes)
    minimal_prefix: tuple[int, ...]
    answer_tokens_total: int
    question_tokens_total: int
    reverse_answer_tokens: int  # answer tokens shown in the reverse prompt

    def sequences(self) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
        """In :data:`PASSES` order."""
        return [(self.answer_prompt, self.answer), (self.minimal_prefix, self.answer),
                (self.reverse_prompt, self.question), (self.minimal_prefix, self.question)]


def encode_row(tokenizer, question: dict, answer: str, max_seq_len: int,
               minimal_prefix: Sequence[int] | None = None) -> RowEncoding:
    """Token ids of the four passes of one row, truncated as the module docstring says."""
    prefix = list(minimal_prefix) if minimal_prefix is not None else minimal_prefix_ids(tokenizer)
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] if answer else []
    question_ids = tokenizer(format_question(question), add_special_tokens=False)["input_ids"]
    prompt = chat_prompt_ids(tokenizer, student_answer_messages(question))
    if len(prefix) >= len(prompt):
        raise ValueError("the minimal prefix is not shorter than the question prompt")
    scored_answer = answer_ids[:max(0, max_seq_len - len(prompt))]

    def reverse(k: int) -> list[int]:
        shown = tokenizer.decode(scored_answer[:k]) if k else ""
        return chat_prompt_ids(tokenizer, reverse_question_messages(question, shown))

    k = len(scored_answer)
    reverse_prompt = reverse(k)
    while k > 0 and len(reverse_prompt) + len(question_ids) > max_seq_len:
        k = max(0, k - (len(reverse_prompt) + len(question_ids) - max_seq_len))
        reverse_prompt = reverse(k)
    scored_question = question_ids[:max(0, max_seq_len - len(reverse_prompt))]
    return RowEncoding(
        answer_prompt=tuple(prompt), answer=tuple(scored_answer),
        reverse_prompt=tuple(reverse_prompt), question=tuple(scored_question),
        minimal_prefix=tuple(prefix), answer_tokens_total=len(answer_ids),
        question_tokens_total=len(question_ids), reverse_answer_tokens=k,
    )


# ------------------------------------------------------------------------------ batched losses
def _batch_tensors(batch: list[tuple[Sequence[int], Sequence[int]]], pad_token_id: int,
                   padding_side: str) -> dict[str, torch.Tensor]:
    width = max(len(p) + len(t) for p, t in batch)
    input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, (prefix, target) in enumerate(batch):
        ids = torch.tensor([*prefix, *target], dtype=torch.long)
        start = width - len(ids) if padding_side == "left" else 0
        input_ids[row, start:start + len(ids)] = ids
        labels[row, start + len(prefix):start + len(ids)] = ids[len(prefix):]
        attention_mask[row, start:start + len(ids)] = 1
    if padding_side == "right":
        # Causal attention alone keeps every real token from the padding after it; without a
        # mask the model keeps its unmasked (faster) attention kernel and positions 0, 1, ...
        return {"input_ids": input_ids, "labels": labels}
    # Positions count real tokens only: with left padding the first real token is position 0.
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask,
            "position_ids": position_ids}


@contextmanager
def projecting_only(model, positions: torch.Tensor) -> Iterator[None]:
    """Within the block, the model's output projection sees only the hidden states where the
    boolean ``positions`` (batch, length) is true, and ``logits`` comes back as (1, n, vocab).

    The loss needs the logits of the positions that predict a target token only, and the
    projection to the vocabulary is the largest matmul per token of a small model. A forward
    pre-hook on the output embeddings does this for any padding side, and keeps whatever the
    model does after the projection (e.g. logit soft-capping).
    """
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError("the scorer has no output embeddings to project with")

    def gather(_module, args):
        hidden = args[0]
        if hidden.shape[:2] != positions.shape:
            raise RuntimeError(f"the output projection got hidden states of shape "
                               f"{tuple(hidden.shape)}, not (batch, length) = "
                               f"{tuple(positions.shape)}: this model slices before projecting")
        return (hidden[positions].unsqueeze(0), *args[1:])

    handle = head.register_forward_pre_hook(gather)
    try:
        yield
    finally:
        handle.remove()


@torch.inference_mode()
def target_losses(model, sequences: Sequence[tuple[Sequence[int], Sequence[int]]], *,
                  batch_size: int, pad_token_id: int, padding_side: str = "right",
                  progress: Callable[[int], None] | None = None,
                  stats: dict | None = None) -> list[tuple[float, int]]:
    """``(mean token cross-entropy of the target, target token count)`` of each
    ``(prefix ids, target ids)`` sequence; ``(nan, 0)`` for an empty target.

    Identical sequences are scored once; the rest are sorted by length (longest first) into
    batches of ``batch_size``. ``progress(n)`` is called with the number of input sequences done
    (duplicates and empty targets included, so the calls add up to ``len(sequences)``).
    ``stats``, when given, receives what was run: sequences requested and unique, tokens and
    padded tokens fed to the model.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    keys = [(tuple(p), tuple(t)) for p, t in sequences]
    for i, (prefix, _) in enumerate(keys):
        if not prefix:
            raise ValueError(f"sequence {i} has no prefix: its first target token has no context")
    multiplicity = Counter(keys)
    unique = sorted((k for k in multiplicity if k[1]), key=lambda k: (-(len(k[0]) + len(k[1])), k))
    if progress is not None:
        progress(sum(n for k, n in multiplicity.items() if not k[1]))
    device = next(model.parameters()).device
    results: dict[tuple, tuple[float, int]] = {}
    tokens = padded = 0
    for start in range(0, len(unique), batch_size):
        batch = unique[start:start + batch_size]
        tensors = _batch_tensors(batch, pad_token_id, padding_side)
        labels = tensors.pop("labels")
        # Position k predicts token k + 1: keep the positions whose next token is a target.
        predicts = torch.zeros_like(labels, dtype=torch.bool)
        predicts[:, :-1] = labels[:, 1:] != IGNORE_INDEX
        targets = labels[:, 1:][predicts[:, :-1]].to(device)
        with projecting_only(model, predicts.to(device)):
            logits = model(**{k: v.to(device) for k, v in tensors.items()}, use_cache=False).logits
        token_loss = F.cross_entropy(logits[0].float(), targets, reduction="none").double()
        row_of = predicts.nonzero(as_tuple=True)[0].to(device)  # same row-major order
        sums = torch.zeros(len(batch), dtype=torch.float64, device=device)
        sums = sums.index_add(0, row_of, token_loss).tolist()
        counts = predicts.sum(-1).tolist()
        for key, total, n in zip(batch, sums, counts):
            results[key] = (total / n, n)
        if progress is not None:
            progress(sum(multiplicity[k] for k in batch))
        tokens += sum(len(p) + len(t) for p, t in batch)
        padded += labels.numel()
    log.info("scored %d unique of %d sequences: %d tokens (%d with padding)", len(unique),
             len(keys), tokens, padded)
    if stats is not None:
        stats.update(sequences=len(keys), unique_sequences=len(unique), tokens=tokens,
                     padded_tokens=padded)
    return [results[k] if k[1] else (math.nan, 0) for k in keys]


# ------------------------------------------------------------------------------------- scores
@dataclass
class RowScores:
    """A row's scores and the raw mean losses and token counts they were computed from."""

    ifd_loss: float
    ifd_ppl: float
    r_ifd: float
    loss_answer_conditioned: float
    loss_answer_direct: float
    loss_question_conditioned: float
    loss_question_direct: float
    answer_tokens: int  # answer tokens scored (both IFD passes)
    answer_tokens_total: int  # before truncation
    question_tokens: int  # question tokens scored (both r-IFD passes)
    question_tokens_total: int
    reverse_answer_tokens: int  # answer tokens shown in the reverse prompt

    def as_dict(self) -> dict:
        return asdict(self)


def _ratio(numerator: float, denominator: float) -> float:
    if not (math.isfinite(numerator) and math.isfinite(denominator)) or denominator == 0:
        return math.nan
    return numerator / denominator


def _ppl_ratio(loss_conditioned: float, loss_direct: float) -> float:
    # exp(a) / exp(b) = exp(a - b): the same number, without overflowing for long, bad answers.
    if not (math.isfinite(loss_conditioned) and math.isfinite(loss_direct)):
        return math.nan
    return math.exp(loss_conditioned - loss_direct)


def scores_from_losses(encoding: RowEncoding, losses: Sequence[tuple[float, int]]) -> RowScores:
    """Scores of one row from its four ``(mean loss, count)`` pairs, in :data:`PASSES` order."""
    (l_ac, _), (l_ad, _), (l_qc, _), (l_qd, _) = losses
    return RowScores(
        ifd_loss=_ratio(l_ac, l_ad), ifd_ppl=_ppl_ratio(l_ac, l_ad), r_ifd=_ppl_ratio(l_qc, l_qd),
        loss_answer_conditioned=l_ac, loss_answer_direct=l_ad,
        loss_question_conditioned=l_qc, loss_question_direct=l_qd,
        answer_tokens=len(encoding.answer), answer_tokens_total=encoding.answer_tokens_total,
        question_tokens=len(encoding.question),
        question_tokens_total=encoding.question_tokens_total,
        reverse_answer_tokens=encoding.reverse_answer_tokens,
    )


def score_rows(model, tokenizer, rows: Sequence[dict], *, max_seq_len: int, batch_size: int,
               padding_side: str = "right", answer_key: str = "answer",
               progress: Callable[[int], None] | None = None,
               stats: dict | None = None) -> list[RowScores]:
    """IFD, r-IFD and their raw losses for each row (a question record carrying ``answer_key``);
    ``progress`` and ``stats`` as in :func:`target_losses`."""
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token")
    prefix = minimal_prefix_ids(tokenizer)
    encodings = [encode_row(tokenizer, row, row[answer_key], max_seq_len, prefix) for row in rows]
    sequences = [s for e in encodings for s in e.sequences()]
    losses = target_losses(model, sequences, batch_size=batch_size,
                           pad_token_id=tokenizer.pad_token_id, padding_side=padding_side,
                           progress=progress, stats=stats)
    n = len(PASSES)
    return [scores_from_losses(e, losses[i * n:(i + 1) * n]) for i, e in enumerate(encodings)]
