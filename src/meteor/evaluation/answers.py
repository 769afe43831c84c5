"""One model of the journey answers the test questions; its objective metrics.

- Answers: the student prompt (:func:`meteor.prompts.student_answer_messages`, the one refine
  trains on), chat-templated, greedy, batched, with the same ``max_new_tokens`` for every model.
  Each reply records how many tokens it took and whether the model ended it itself (``stopped``)
  or was cut off by the limit.
- Reference-answer perplexity: the accepted Stack Overflow answer's tokens only, conditioned on the
  chat-templated question, encoded exactly as training encodes an example
  (:func:`meteor.training.data.encode_examples`: same template, same answer-only labels, same
  truncation), so "the model got better at the answers it was trained towards" and "perplexity
  fell" measure the same tokens. The corpus perplexity is ``exp(total NLL / total answer tokens)``
  (token-weighted, so long answers weigh by their length, as in language-model evaluation).
- ROUGE-L F of the answer against the accepted answer (:func:`meteor.textmetrics.rouge_l`).

Summaries (overall and per category): :func:`meteor.evaluation.aggregate.objective_metrics`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from meteor.evaluation.config import EvaluateParams
from meteor.prompts import student_answer_messages
from meteor.student.generate import Generation, generate
from meteor.textmetrics import rouge_l
from meteor.training.data import IGNORE_INDEX, PadCollator, encode_examples, question_answer_example

log = logging.getLogger(__name__)

def for_inference(model, device: str | torch.device):
    """``model`` on ``device`` in eval mode, a LoRA adapter merged into its base weights: the same
    function with half the matrix products per layer (the adapter's A and B fold into W)."""
    if hasattr(model, "merge_and_unload"):  # a peft model
        model = model.merge_and_unload()
    return model.to(device).eval()


def answer_questions(model, tokenizer, rows: Sequence[dict], params: EvaluateParams, *,
                     progress: bool | str = True) -> list[Generation]:
    """Greedy answers to ``rows`` (test questions), in order, with token counts and stop flags."""
    conversations = [student_answer_messages(row) for row in rows]
    return generate(model, tokenizer, conversations, max_new_tokens=params.max_new_tokens,
                    batch_size=params.batch_size, do_sample=False,
                    repetition_penalty=params.repetition_penalty,
                    no_repeat_ngram_size=params.no_repeat_ngram_size, progress=progress,
                    return_stats=True)


@dataclass(frozen=True)
class ReferenceNLL:
    """Negative log-likelihood (nats, summed) of one accepted answer given its question."""

    nll: float
    tokens: int  # answer tokens scored (0: the answer lies beyond max_seq_len)
    truncated: bool  # part of the answer was cut by max_seq_len

    @property
    def ppl(self) -> float | None:
        return math.exp(self.nll / self.tokens) if self.tokens else None


def reference_nll(model, tokenizer, rows: Sequence[dict], *, max_seq_len: int, batch_size: int,
                  progress: bool = True) -> list[ReferenceNLL]:
    """Per row, the NLL of ``row["answer"]``'s tokens given the chat-templated question."""
    encoded, truncated = [], []
    data_log = logging.getLogger(encode_examples.__module__)
    level = data_log.level
    data_log.setLevel(logging.ERROR)  # one summary below instead of a warning per row
    try:
        for row in rows:  # one at a time, so each row's truncation is known
            data = encode_examples(tokenizer, [question_answer_example(row, row["answer"])],
                                   max_seq_len)
            encoded.append(data.examples[0] if data.examples else None)  # None: answer cut off
            truncated.append(bool(data.n_truncated or data.n_skipped))
    finally:
        data_log.setLevel(level)
    if any(truncated):
        log.info("max_seq_len=%d: %d of %d reference answers truncated (%d entirely beyond it)",
                 max_seq_len, sum(truncated), len(rows), sum(e is None for e in encoded))
    results: list[ReferenceNLL | None] = [
        ReferenceNLL(0.0, 0, True) if e is None else None for e in encoded]
    todo = sorted((i for i, e in enumerate(encoded) if e is not None), key=lambda i: -len(encoded[i]))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    collate = PadCollator(pad_id)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in tqdm(range(0, len(todo), batch_size), desc="reference perplexity",
                              disable=not progress, leave=False):
                batch = todo[start:start + batch_size]
                tensors = collate([encoded[i] for i in batch])
                logits = model(input_ids=tensors["input_ids"].to(device),
                               attention_mask=tensors["attention_mask"].to(device)).logits
                # Token t is predicted from the positions before it; the loss in fp32 whatever
                # the model's dtype, so bf16 models are not penalised by rounding.
                labels = tensors["labels"][:, 1:].to(device)
                nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels,
                                      ignore_index=IGNORE_INDEX, reduction="none")
                counts = (labels != IGNORE_INDEX).sum(dim=1)
                for row, i in enumerate(batch):
                    results[i] = ReferenceNLL(float(nll[row].sum()), int(counts[row]), truncated[i])
    finally:
        model.train(was_training)
    return results  # type: ignore[return-value]


def answer_rows(rows: Sequence[dict], generations: Sequence[Generation],
                nlls: Sequence[ReferenceNLL]) -> list[dict]:
    """``eval/answers/<model>.jsonl`` rows: the answer plus its per-question objective measures."""
    out = []
    for row, gen, ref in zip(rows, generations, nlls, strict=True):
        out.append({
            "id": row["id"],
            "category": row.get("category"),
            "answer": gen.text,
            "tokens": gen.tokens,
            "stopped": gen.stopped,
            "rouge_l": round(rouge_l(gen.text, row["answer"]).f1, 6),
            "ref_nll": round(ref.nll, 6),
            "ref_tokens": ref.tokens,
            "ref_truncated": ref.truncated,
        })
    return out
