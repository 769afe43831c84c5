"""Dev objectives a merge is scored by.

* :class:`AnswerNLL` (the default): mean next-token cross-entropy of the dev split's reference
  answers, teacher-forced, over answer tokens only (the chat encoding and masking of training),
  token-weighted over the whole split. Deterministic, no generation: lower is better.
* :class:`JudgeScore`: greedy answers to the dev questions, scored 1-10 per criterion by the
  judge; the objective is the mean over criteria and questions. Higher is better.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from meteor.criteria import CRITERIA
from meteor.prompts import student_answer_messages
from meteor.student.generate import generate
from meteor.teacher.base import Teacher
from meteor.training.data import IGNORE_INDEX, PadCollator, answer_examples, encode_examples

log = logging.getLogger(__name__)


class AnswerNLL:
    """Reference-answer NLL on dev rows; batches are built once and reused for every trial."""

    direction = "minimize"
    name = "nll"

    def __init__(self, tokenizer, rows: Sequence[dict], *, max_seq_len: int, batch_size: int):
        examples, self.skipped = answer_examples(rows)
        if not examples:
            raise ValueError(f"no usable dev rows for the NLL objective (skipped: "
                             f"{dict(self.skipped)})")
        data = encode_examples(tokenizer, examples, max_seq_len)
        self.data_stats = data.stats()
        # Length-sorted batches: little padding, and the same batches on every call.
        ordered = sorted(data.examples, key=len)
        collate = PadCollator(tokenizer.pad_token_id)
        self.batches = [collate(ordered[i:i + batch_size])
                        for i in range(0, len(ordered), batch_size)]
        self.tokens = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in self.batches)

    def __call__(self, model) -> float:
        device = next(model.parameters()).device
        total = torch.zeros((), dtype=torch.float64)
        was_training = model.training
        model.eval()
        try:
            with torch.inference_mode():
                for batch in self.batches:
                    logits = model(input_ids=batch["input_ids"].to(device),
                                   attention_mask=batch["attention_mask"].to(device)).logits
                    targets = batch["labels"][:, 1:].to(device)
                    loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)),
                                           targets.reshape(-1), ignore_index=IGNORE_INDEX,
                                           reduction="sum")
                    total += loss.double().cpu()
        finally:
            model.train(was_training)
        return float(total / self.tokens)


class JudgeScore:
    """Mean judge score (1-10, averaged over ``criteria``) of greedy answers to dev questions."""

    direction = "maximize"
    name = "judge"

    def __init__(self, judge: Teacher, tokenizer, rows: Sequence[dict], generation: dict,
                 criteria: tuple[str, ...] = CRITERIA):
        self.judge = judge
        self.tokenizer = tokenizer
        self.rows = [r for r in rows if isinstance(r.get("title"), str)
                     and isinstance(r.get("question"), str)]
        self.skipped = Counter({"no_question": len(rows) - len(self.rows)})
        if not self.rows:
            raise ValueError("no usable dev rows for the judge objective")
        self.conversations = [student_answer_messages(r) for r in self.rows]
        self.generation = {**generation, "do_sample": False}  # greedy: a deterministic answer set
        self.criteria = criteria
        self.failures = 0  # judge calls that returned no valid score, over all trials

    def __call__(self, model) -> float:
        answers = generate(model, self.tokenizer, self.conversations, progress=False,
                           **self.generation)
        results = self.judge.score(self.rows, answers, self.criteria)
        per_answer = []
        for result in results:
            if result.ok and result.parsed is not None:
                scores = [result.parsed.scores[c].score for c in self.criteria
                          if c in result.parsed.scores]
                if scores:
                    per_answer.append(sum(scores) / len(scores))
                    continue
            self.failures += 1
        if not per_answer:
            raise RuntimeError("the judge scored none of the dev answers; see the judge's errors")
        return sum(per_answer) / len(per_answer)
