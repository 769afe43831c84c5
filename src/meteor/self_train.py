"""METEOR 3: self-training on high- vs low-compute answers as preference pairs.

Each *turn*, the current student answers every question twice with the same prompt
(:func:`meteor.prompts.student_answer_messages`) and decoding knobs (``generation.batch_size``,
``repetition_penalty``, ``no_repeat_ngram_size``; never sampled, whatever ``generation.do_sample``
says): greedy (low compute) and beam search with ``num_beams`` beams (high compute, the paper's
10).
With ``pairing: compute`` (the paper) the beam answer is chosen and the greedy one rejected; with
``pairing: judge`` the judge's position-swapped winner is chosen and ties are skipped. The student
is then trained on the kept pairs with the pairwise loss (:mod:`meteor.training.preference`:
DPO whose reference is the turn's starting adapter, SimPO, or METEOR's margin loss), and the next
turn regenerates the pairs with the updated student.

**Skipped pairs, by reason** (never silently): ``empty`` (either answer is empty), ``identical``,
``near_identical`` (the answers differ by less than ``min_difference``: 1 - difflib's
``SequenceMatcher`` ratio over words; such pairs give a (near-)zero gradient and, for DPO, a loss
stuck at ln 2), ``truncated`` (an answer is cut off entirely by ``train.max_seq_len``),
``identical_after_truncation`` (what ``max_seq_len`` leaves of both is the same tokens),
``judge_tie`` / ``judge_failed`` (``pairing: judge`` only).

**Is the premise true here?** With ``judge_pairs`` the judge (params ``judge``; cached) compares
every pair that survived the filters, in both orders (:func:`meteor.judging.compare_both_orders`);
the metrics say how often its overall verdict (:meth:`PairJudgment.overall`: the answer that wins
more criteria than it loses) and each criterion prefer the high-compute answer.

**Compute.** Each decoding's generated tokens and seconds are recorded per pair (a batch's wall
time divided by its size), so the beam-vs-greedy compute ratio is measured, not assumed. The
seconds are kept apart from the pairs (:attr:`SelfTrainRun.compute`), which must not depend on
the machine's speed.

**No usable pair** in a turn: an error (``on_no_pairs: error``) or, with ``pass_through``, the
turn's starting model is kept unchanged, recorded in the metrics, and no further turn runs
(greedy and beam search are deterministic: the same model would give the same pairs again).

Deterministic: greedy and beam decoding, seeded training (turn ``t`` uses ``train.seed + t - 1``),
judge calls from the persistent cache on a re-run.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from difflib import SequenceMatcher
from typing import Any, Literal

from pydantic import Field, model_validator

from meteor.judging import TIE, X, Y, PairJudgment, compare_both_orders
from meteor.params import Section
from meteor.prompts import student_answer_messages
from meteor.student.generate import Generation, GenerationParams, generate, generation_kwargs
from meteor.student.weights import weight_fingerprint
from meteor.criteria import CRITERIA
from meteor.teacher.base import Teacher
from meteor.training.config import TrainParams
from meteor.training.data import IGNORE_INDEX, has_generation_tags
from meteor.training.preference import (EncodedPair, PairwiseLoss, PairwiseObjective,
                                        ReferenceAdapter, encode_pair, evaluate_pairs,
                                        train_pairs)


class SelfTrainTrainParams(TrainParams):
    """Each turn's training on that turn's pairs. Its own class, so a partial ``self_train.train``
    keeps these defaults. ``batch_size`` counts pairs (two sequences each). ``lora`` must describe
    the adapter self_train continues (refine's): it is checked against it, not applied."""

    epochs: int = Field(1, ge=1)
    batch_size: int = Field(4, ge=1, description="Pairs per micro-batch (2 sequences each).")
    lr: float = Field(5e-4, gt=0)
    # No warmup: a turn is a few steps on an already-trained adapter (the first warmup step has
    # learning rate 0).
    warmup_ratio: float = Field(0.0, ge=0, le=1, description="Warmup steps / total steps.")


class SelfTrainParams(Section):
    """METEOR 3: greedy (low compute) vs beam search (high compute) answers as preference pairs."""

    turns: int = Field(2, ge=1, description="Rounds of (regenerate pairs with the current model, "
                                            "train on them); each turn's reference is its start.")
    limit: int | None = Field(
        48, ge=1, description="Only N train questions, taken in turn from each category, each "
                              "turn (null = all); bounds the time: beam search costs about "
                              "num_beams greedy decodings.")
    num_beams: int = Field(4, ge=2, description="Beams of the high-compute answer (the paper: 10).")
    max_new_tokens: int = Field(64, ge=1, description="Answer length cap of both decodings.")
    pairing: Literal["compute", "judge"] = Field(
        "compute", description="compute: chosen = beam, rejected = greedy (the paper); judge: the "
                               "judge's position-swapped winner is chosen, ties are skipped.")
    judge_pairs: bool = Field(
        True, description="Judge every kept pair in both orders (params judge) and report how "
                          "often the high-compute answer wins; required by pairing: judge.")
    min_difference: float = Field(
        0.1, ge=0, le=1, description="Skip pairs whose answers differ less: 1 - difflib "
                                     "SequenceMatcher ratio over words (0 identical, 1 disjoint).")
    loss: Literal["dpo", "simpo", "margin"] = Field(
        "dpo", description="dpo (reference: the turn's starting adapter), simpo or METEOR's "
                           "length-normalised NLL margin (both reference-free).")
    beta: float = Field(0.1, gt=0, description="DPO beta (loss: dpo).")
    simpo_beta: float = Field(2.0, gt=0, description="SimPO beta (loss: simpo).")
    simpo_gamma: float = Field(0.5, ge=0, description="SimPO target margin gamma (loss: simpo).")
    margin: float = Field(0.0, ge=0, description="relu(NLL_chosen - NLL_rejected + margin) "
                                                 "(loss: margin; 0 = METEOR's).")
    sft_weight: float = Field(0.0, ge=0, description="Weight of an added NLL term on the chosen "
                                                     "answer (against likelihood collapse).")
    on_no_pairs: Literal["error", "pass_through"] = Field(
        "error", description="A turn with no usable pair: fail (non-zero exit), or pass the "
                             "turn's starting model through unchanged, record it and stop.")
    max_failed_fraction: float = Field(
        0.05, ge=0, le=1, description="Above this share of judged pairs that got no verdict, the "
                                      "stage writes its outputs and metrics, then exits non-zero; "
                                      "a re-run takes finished calls from the cache.")
    train: SelfTrainTrainParams = Field(default_factory=SelfTrainTrainParams)

    @model_validator(mode="after")
    def _judge_pairing(self) -> SelfTrainParams:
        if self.pairing == "judge" and not self.judge_pairs:
            raise ValueError("self_train.pairing: judge needs self_train.judge_pairs: true")
        return self

log = logging.getLogger(__name__)

HIGH, LOW = "beam", "greedy"  # where an answer came from
EMPTY, IDENTICAL, NEAR_IDENTICAL, TRUNCATED, IDENTICAL_AFTER_TRUNCATION = (
    "empty", "identical", "near_identical", "truncated", "identical_after_truncation")
JUDGE_TIE, JUDGE_FAILED = "judge_tie", "judge_failed"
SKIP_REASONS = (EMPTY, IDENTICAL, NEAR_IDENTICAL, TRUNCATED, IDENTICAL_AFTER_TRUNCATION,
                JUDGE_TIE, JUDGE_FAILED)


class NoUsablePairs(RuntimeError):
    """A turn in which every pair was skipped (``on_no_pairs: error``); ``run`` holds what was
    done up to it (pairs and metrics, to write for inspection)."""

    def __init__(self, message: str, run: SelfTrainRun):
        super().__init__(message)
        self.run = run


def difference(a: str, b: str) -> float:
    """How different two answers are: 1 - difflib ``SequenceMatcher`` ratio over their words
    (0: identical word sequences, 1: no word in common). ``autojunk`` is off: it would treat
    frequent words of answers over 200 words as junk and call different answers similar."""
    return 1.0 - SequenceMatcher(None, a.split(), b.split(), autojunk=False).ratio()


# ---------------------------------------------------------------------------------- one pair
@dataclass
class _Pair:
    question: dict
    turn: int
    high: Generation
    low: Generation
    difference: float | None = None
    skip_reason: str | None = None
    judgment: PairJudgment | None = None
    chosen_from: str | None = None  # HIGH | LOW, None when skipped
    encoded: EncodedPair | None = None

    def answer(self, source: str | None) -> str | None:
        return None if source is None else (self.high if source == HIGH else self.low).text

    def compute_row(self) -> dict:
        return {"id": self.question["id"], "turn": self.turn,
                "beam_tokens": self.high.tokens, "beam_seconds": round(self.high.seconds, 4),
                "greedy_tokens": self.low.tokens, "greedy_seconds": round(self.low.seconds, 4)}

    def answer_cost(self, source: str) -> tuple[int, float]:
        g = self.high if source == HIGH else self.low
        return g.tokens, g.seconds

    def row(self) -> dict:
        rejected_from = None if self.chosen_from is None else (
            LOW if self.chosen_from == HIGH else HIGH)
        chosen, rejected = self.answer(self.chosen_from), self.answer(rejected_from)
        return {
            "id": self.question["id"], "turn": self.turn, "skip_reason": self.skip_reason,
            "chosen_from": self.chosen_from, "chosen": chosen, "rejected": rejected,
            "lengths": {"chosen_chars": None if chosen is None else len(chosen),
                        "rejected_chars": None if rejected is None else len(rejected),
                        "chosen_tokens": None if self.encoded is None else _answer_tokens(
                            self.encoded.chosen.labels),
                        "rejected_tokens": None if self.encoded is None else _answer_tokens(
                            self.encoded.rejected.labels)},
            HIGH: _decoding(self.high), LOW: _decoding(self.low),
            "difference": None if self.difference is None else round(self.difference, 4),
            "judge": _verdict(self.judgment),
        }


def _answer_tokens(labels: list[int]) -> int:
    """Answer tokens as trained: after max_seq_len, with the end-of-turn token."""
    return sum(t != IGNORE_INDEX for t in labels)


def _decoding(g: Generation) -> dict:
    # No seconds here: the pairs file is a DVC out that two runs must write identically; the
    # timings go to SelfTrainRun.compute (metrics/self_train_compute.json).
    return {"text": g.text, "tokens": g.tokens}


def _in_compute_terms(winner: str) -> str:
    return {X: HIGH, Y: LOW, TIE: TIE}[winner]


def _verdict(j: PairJudgment | None) -> dict | None:
    """The judgment in beam/greedy terms (the judge saw beam as x, greedy as y)."""
    if j is None:
        return None
    if not j.ok:
        return {"ok": False, "error": j.error}
    return {"ok": True, "overall": _in_compute_terms(j.overall()),
            "winners": {c: _in_compute_terms(w) for c, w in j.winners.items()},
            "consistent": j.consistent}


# ---------------------------------------------------------------------------------- the run
@dataclass
class SelfTrainRun:
    rows: list[dict] = field(default_factory=list)
    # Per pair: each decoding's tokens and seconds (a batch's wall time / its size).
    compute: list[dict] = field(default_factory=list)
    turns: list[dict] = field(default_factory=list)  # one metrics entry per turn run
    stopped_early: bool = False  # pass_through: a turn had no usable pair

    def metrics(self) -> dict[str, Any]:
        last = next((t for t in reversed(self.turns) if t.get("after")), None)
        return {
            "turns_run": len(self.turns),
            "stopped_early": self.stopped_early,
            "passed_through": [t["turn"] for t in self.turns if t["passed_through"]],
            "turns": {f"turn_{t['turn']}": t for t in self.turns},
            "final": last["after"] if last else None,
        }


class SelfTrainer:
    """Runs the turns with one student (a PeftModel, trained in place) and an optional judge."""

    def __init__(self, model, tokenizer, params: SelfTrainParams, generation: GenerationParams,
                 judge: Teacher | None = None, *, live=None):
        if params.judge_pairs and judge is None:
            raise ValueError("self_train.judge_pairs is true but no judge was given")
        self.model = model
        self.tokenizer = tokenizer
        self.params = params
        self.judge = judge if params.judge_pairs else None
        self.live = live
        self.gen_kwargs = generation_kwargs(generation, max_new_tokens=params.max_new_tokens,
                                            do_sample=False)  # greedy vs beam, never sampled
        self.use_mask = has_generation_tags(tokenizer)
        self.loss = PairwiseLoss(kind=params.loss, beta=params.beta, simpo_beta=params.simpo_beta,
                                 simpo_gamma=params.simpo_gamma, margin=params.margin,
                                 sft_weight=params.sft_weight)
        self.reference = ReferenceAdapter(model) if self.loss.needs_reference else None

    def run(self, questions: Sequence[dict]) -> SelfTrainRun:
        if not questions:
            raise ValueError("no questions to self-train on: the input data is empty")
        run = SelfTrainRun()
        try:
            for turn in range(1, self.params.turns + 1):
                pairs = self._make_pairs(questions, turn)
                kept = [p for p in pairs if p.skip_reason is None]
                metrics = self._pair_metrics(turn, pairs)
                run.rows.extend(p.row() for p in pairs)
                run.compute.extend(p.compute_row() for p in pairs)
                if not kept:
                    message = (f"self_train turn {turn}: no usable pair among {len(pairs)} "
                               f"questions (skipped: {metrics['skipped']})")
                    if self.params.on_no_pairs == "error":
                        run.turns.append(metrics)
                        raise NoUsablePairs(message + "; set self_train.on_no_pairs: "
                                            "pass_through to keep the starting model instead",
                                            run)
                    log.warning("%s: the turn's starting model passes through unchanged", message)
                    run.turns.append({**metrics, "passed_through": True})
                    run.stopped_early = turn < self.params.turns
                    break
                metrics.update(self._train(turn, kept))
                run.turns.append(metrics)
        finally:
            if self.reference is not None:
                self.reference.remove()  # only the policy adapter is saved
        return run

    # --- pairs
    def _make_pairs(self, questions: Sequence[dict], turn: int) -> list[_Pair]:
        conversations = [student_answer_messages(q) for q in questions]
        low = generate(self.model, self.tokenizer, conversations, num_beams=1, return_stats=True,
                       **{**self.gen_kwargs, "progress": f"turn {turn} greedy"})
        high = generate(self.model, self.tokenizer, conversations, return_stats=True,
                        num_beams=self.params.num_beams,
                        **{**self.gen_kwargs, "progress": f"turn {turn} beam x{self.params.num_beams}"})
        pairs = [_Pair(q, turn, h, g) for q, h, g in zip(questions, high, low)]
        for pair, conversation in zip(pairs, conversations):
            self._screen(pair, conversation)
        if self.judge is not None:
            self._judge([p for p in pairs if p.skip_reason is None])
        for pair in pairs:
            if pair.skip_reason is None:
                self._choose(pair)
        return pairs

    def _screen(self, pair: _Pair, conversation: list[dict]) -> None:
        """Skip reasons that do not need the judge; encodes the candidate (beam, greedy) pair."""
        high, low = pair.high.text, pair.low.text
        if not high.strip() or not low.strip():
            pair.skip_reason = EMPTY
            return
        pair.difference = difference(high, low)
        if high == low:
            pair.skip_reason = IDENTICAL
        elif pair.difference < self.params.min_difference:
            pair.skip_reason = NEAR_IDENTICAL
        else:
            pair.encoded, pair.skip_reason = encode_pair(
                self.tokenizer, conversation, high, low, self.params.train.max_seq_len,
                use_mask=self.use_mask)

    def _judge(self, pairs: list[_Pair]) -> None:
        if not pairs:
            return
        judgments = compare_both_orders(self.judge, [p.question for p in pairs],
                                        [p.high.text for p in pairs], [p.low.text for p in pairs],
                                        CRITERIA)
        for pair, judgment in zip(pairs, judgments):
            pair.judgment = judgment

    def _choose(self, pair: _Pair) -> None:
        if self.params.pairing == "compute":
            pair.chosen_from = HIGH
            return
        judgment = pair.judgment
        if judgment is None or not judgment.ok:
            pair.skip_reason, pair.encoded = JUDGE_FAILED, None
        elif judgment.overall() == TIE:
            pair.skip_reason, pair.encoded = JUDGE_TIE, None
        elif judgment.overall() == X:
            pair.chosen_from = HIGH
        else:  # the judge prefers greedy: swap the encoded pair
            pair.chosen_from = LOW
            pair.encoded = EncodedPair(pair.encoded.rejected, pair.encoded.chosen)

    # --- metrics of a turn's pairs
    def _pair_metrics(self, turn: int, pairs: list[_Pair]) -> dict[str, Any]:
        kept = [p for p in pairs if p.skip_reason is None]
        skipped = Counter(p.skip_reason for p in pairs if p.skip_reason is not None)
        seconds = {s: sum(p.answer_cost(s)[1] for p in pairs) for s in (HIGH, LOW)}
        tokens = {s: sum(p.answer_cost(s)[0] for p in pairs) for s in (HIGH, LOW)}
        return {
            "turn": turn,
            "questions": len(pairs),
            "kept": len(kept),
            "skipped": {reason: skipped[reason] for reason in SKIP_REASONS},
            "chosen_from": dict(sorted(Counter(p.chosen_from for p in kept).items())),
            "mean_chosen_tokens": _mean([_answer_tokens(p.encoded.chosen.labels) for p in kept]),
            "mean_rejected_tokens": _mean([_answer_tokens(p.encoded.rejected.labels)
                                           for p in kept]),
            "mean_chosen_chars": _mean([len(p.answer(p.chosen_from)) for p in kept]),
            "mean_rejected_chars": _mean([len(p.answer(LOW if p.chosen_from == HIGH else HIGH))
                                          for p in kept]),
            "compute": {
                "beam_seconds": round(seconds[HIGH], 3), "greedy_seconds": round(seconds[LOW], 3),
                "seconds_ratio": _ratio(seconds[HIGH], seconds[LOW]),
                "beam_tokens": tokens[HIGH], "greedy_tokens": tokens[LOW],
                "tokens_ratio": _ratio(tokens[HIGH], tokens[LOW]),
            },
            "judge": self._agreement(pairs) if self.judge is not None else None,
            "passed_through": False,
        }

    def _agreement(self, pairs: list[_Pair]) -> dict[str, Any]:
        """How often the judge prefers the high-compute answer, overall and per criterion, over
        the pairs it judged (those that passed the filters)."""
        judged = [p.judgment for p in pairs if p.judgment is not None]
        ok = [j for j in judged if j.ok]
        overall = Counter(_in_compute_terms(j.overall()) for j in ok)
        per_criterion = {}
        for c in CRITERIA:
            wins = Counter(_in_compute_terms(j.winners[c]) for j in ok if c in j.winners)
            per_criterion[c] = {"beam": wins[HIGH], "greedy": wins[LOW], "tie": wins[TIE],
                                "beam_win_rate": _ratio(wins[HIGH], len(ok))}
        return {
            "judged": len(judged), "failed": len(judged) - len(ok),
            "overall": {"beam": overall[HIGH], "greedy": overall[LOW], "tie": overall[TIE]},
            # The headline: share of judged pairs whose overall winner is the beam answer.
            "agreement": _ratio(overall[HIGH], len(ok)),
            "position_consistency": _ratio(sum(sum(j.consistent.values()) for j in ok),
                                           sum(len(j.consistent) for j in ok)),
            "per_criterion": per_criterion,
        }

    # --- training
    def _train(self, turn: int, kept: list[_Pair]) -> dict[str, Any]:
        pairs = [p.encoded for p in kept]
        train_params = self.params.train.model_copy(update={"seed": self.params.train.seed
                                                            + turn - 1})
        if self.reference is not None:
            self.reference.snapshot()  # this turn's reference: the adapter as the turn starts
        objective = PairwiseObjective(self.loss, self.reference)
        before = evaluate_pairs(self.model, self.tokenizer, pairs, objective,
                                batch_size=train_params.batch_size)
        fingerprint = weight_fingerprint(self.model)
        result = train_pairs(self.model, self.tokenizer, pairs, train_params, objective,
                             live=self.live, desc=f"self_train turn {turn}")
        if not all(math.isfinite(x) for x in result.loss_history):
            raise FloatingPointError(f"self_train turn {turn}: non-finite pairwise loss "
                                     f"{result.loss_history}; lower self_train.train.lr or use "
                                     "student.dtype float32/bfloat16")
        if result.steps < 1 or weight_fingerprint(self.model) == fingerprint:
            raise RuntimeError(f"self_train turn {turn}: {result.steps} optimiser steps left the "
                               "adapter unchanged")
        after = evaluate_pairs(self.model, self.tokenizer, pairs, objective,
                               batch_size=train_params.batch_size)
        log.info("turn %d: %d pairs, %d steps, loss %.4f -> %.4f, reward accuracy %s -> %s, "
                 "margin %s -> %s", turn, len(pairs), result.steps, result.loss_history[0],
                 result.loss_history[-1], before["reward_accuracy"], after["reward_accuracy"],
                 before["mean_margin"], after["mean_margin"])
        return {
            "train": {
                "steps": result.steps, "epochs": result.epochs,
                "first_loss": round(result.loss_history[0], 6),
                "final_loss": round(result.loss_history[-1], 6),
                "tokens_seen": result.tokens_seen, "train_seconds": round(result.seconds, 3),
            },
            "before": before,  # on this turn's pairs, eval mode, before its training
            "after": after,
        }


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 3) if values else None


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 4) if b else None


def self_train(model, tokenizer, questions: Sequence[dict], params: SelfTrainParams,
               generation: GenerationParams, judge: Teacher | None = None, *,
               live=None) -> SelfTrainRun:
    """Self-train ``model`` (a PeftModel, updated in place) on ``questions`` for ``params.turns``."""
    return SelfTrainer(model, tokenizer, params, generation, judge, live=live).run(questions)
