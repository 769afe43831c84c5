"""Pairwise preference training (self_train): DPO, SimPO and METEOR's margin loss.

A *pair* is one prompt with a chosen and a rejected answer. Both are encoded like sft examples
(labels on the answer tokens only, :func:`meteor.training.data.encode_example`) and trained in
one forward pass: a micro-batch of ``B`` pairs is ``2B`` right-padded rows, chosen first. The
log-probability of an answer is taken over its answer tokens only (prompt and padding masked), in
fp32, summed (DPO) or averaged over the answer's tokens (SimPO, margin: length-normalised).

Losses, per pair, with ``s`` = summed and ``m`` = mean answer log-probability:

* ``dpo`` (sigmoid, Rafailov et al.): ``-log σ(β[(s_w - s_w^ref) - (s_l - s_l^ref)])``, the
  reference being the model the turn started from (:class:`ReferenceAdapter`);
* ``simpo`` (Meng et al.; reference-free): ``-log σ(β m_w - β m_l - γ)``;
* ``margin`` (METEOR's self-training loss, padding masked): ``relu(NLL_w - NLL_l + margin)`` with
  ``NLL = -m`` (METEOR's published code averages over padding too and has no margin term);
* plus, optionally, ``sft_weight * NLL_w`` against the likelihood of the chosen answer collapsing
  (DPO and the margin loss can both lower it while widening the gap).

*Rewards* (logged and reported): ``β(s - s^ref)`` for dpo, ``β m`` for simpo, ``m`` for margin;
reward accuracy = share of pairs whose chosen reward is higher; margin = chosen - rejected reward.

NaN guards: a pair whose chosen or rejected answer has no answer token left is not *valid*: its
loss and rewards are zero and it is not counted (the loop divides by valid pairs, at least 1).
Such pairs should be filtered before (self_train does); the guard keeps a stray one from turning
the loss into NaN (a mean over zero tokens).

The training itself is the shared loop (:func:`meteor.training.loop.run_training`): accelerate,
AdamW, scheduler, clipping, DVCLive, with the loss summed over pairs and divided by the pairs of
the whole accumulation window, so ``accelerate launch`` configs work unchanged.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from meteor.training.config import TrainParams
from meteor.training.data import (IGNORE_INDEX, ChatExample, EncodedExample, PadCollator,
                                  encode_example, has_generation_tags)
from meteor.training.loop import TrainResult, run_training

log = logging.getLogger(__name__)

PAIR_LOSSES = ("dpo", "simpo", "margin")
REFERENCE_ADAPTER = "reference"


# ------------------------------------------------------------------------------- encoding
@dataclass
class EncodedPair:
    chosen: EncodedExample
    rejected: EncodedExample

    def __len__(self) -> int:  # what the length-grouped sampler sorts by
        return max(len(self.chosen), len(self.rejected))


def encode_pair(tokenizer, prompt: list[dict], chosen: str, rejected: str, max_seq_len: int, *,
                use_mask: bool | None = None) -> tuple[EncodedPair | None, str | None]:
    """Encode a pair; ``(None, reason)`` when it cannot be trained on.

    Reasons: ``truncated`` (an answer is cut off entirely by ``max_seq_len``) and
    ``identical_after_truncation`` (what is left of both answers is the same tokens: DPO's
    logit would be 0 whatever the weights, a zero gradient).
    """
    if use_mask is None:
        use_mask = has_generation_tags(tokenizer)
    encoded = []
    for answer in (chosen, rejected):
        example: ChatExample = (prompt, answer)
        enc, _ = encode_example(tokenizer, example, max_seq_len, use_mask=use_mask)
        if enc is None:
            return None, "truncated"
        encoded.append(enc)
    if encoded[0].labels == encoded[1].labels:
        return None, "identical_after_truncation"
    return EncodedPair(*encoded), None


class PairCollator:
    """A batch of ``B`` pairs -> ``2B`` right-padded rows: the chosen answers, then the rejected."""

    def __init__(self, pad_token_id: int):
        self.pad = PadCollator(pad_token_id)

    def __call__(self, batch: Sequence[EncodedPair]) -> dict[str, torch.Tensor]:
        return self.pad([p.chosen for p in batch] + [p.rejected for p in batch])


# ------------------------------------------------------------------------------ log-probs
@dataclass
class PairLogps:
    """Per pair: summed answer log-probability and answer-token count, chosen and rejected."""

    chosen_sum: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_sum: torch.Tensor
    rejected_tokens: torch.Tensor

    def mean(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Length-normalised log-probabilities (a pair with no token gets 0, not NaN)."""
        return (self.chosen_sum / self.chosen_tokens.clamp(min=1),
                self.rejected_sum / self.rejected_tokens.clamp(min=1))

    @property
    def valid(self) -> torch.Tensor:
        return (self.chosen_tokens > 0) & (self.rejected_tokens > 0)


def answer_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probability of each row's answer tokens (labels != -100), and their count, fp32.

    The logits are upcast before the softmax (half-precision log-probs of long answers lose
    whole nats); ``cross_entropy`` with ``reduction="none"`` gives 0 at ignored positions, so
    the prompt and the padding add nothing.
    """
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    token_nll = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)),
                                targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none")
    token_nll = token_nll.view(targets.shape)
    return -token_nll.sum(-1), (targets != IGNORE_INDEX).sum(-1)


def split_pairs(sums: torch.Tensor, counts: torch.Tensor) -> PairLogps:
    """Rows ``[chosen..., rejected...]`` (as :class:`PairCollator` lays them out) -> pairs."""
    n = sums.shape[0] // 2
    return PairLogps(sums[:n], counts[:n], sums[n:], counts[n:])


# ----------------------------------------------------------------------------------- losses
@dataclass
class PairLoss:
    losses: torch.Tensor  # per pair; 0 where not valid
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    valid: torch.Tensor  # bool per pair


def dpo_loss(policy: PairLogps, reference: PairLogps, beta: float
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sigmoid DPO on summed log-probs: ``(losses, chosen_rewards, rejected_rewards)``."""
    chosen_rewards = beta * (policy.chosen_sum - reference.chosen_sum)
    rejected_rewards = beta * (policy.rejected_sum - reference.rejected_sum)
    return -F.logsigmoid(chosen_rewards - rejected_rewards), chosen_rewards, rejected_rewards


def simpo_loss(policy: PairLogps, beta: float, gamma: float
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SimPO: length-normalised, reference-free, with a target margin ``gamma``."""
    chosen_mean, rejected_mean = policy.mean()
    chosen_rewards, rejected_rewards = beta * chosen_mean, beta * rejected_mean
    return (-F.logsigmoid(chosen_rewards - rejected_rewards - gamma), chosen_rewards,
            rejected_rewards)


def margin_loss(policy: PairLogps, margin: float
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """METEOR: ``relu(NLL_chosen - NLL_rejected + margin)`` on mean answer-token NLL."""
    chosen_mean, rejected_mean = policy.mean()
    return F.relu(rejected_mean - chosen_mean + margin), chosen_mean, rejected_mean


@dataclass(frozen=True)
class PairwiseLoss:
    """Which pairwise loss, with its coefficients (only those of ``kind`` are used)."""

    kind: str = "dpo"
    beta: float = 0.1  # dpo
    simpo_beta: float = 2.0
    simpo_gamma: float = 0.5
    margin: float = 0.0
    sft_weight: float = 0.0

    def __post_init__(self):
        if self.kind not in PAIR_LOSSES:
            raise ValueError(f"unknown pairwise loss {self.kind!r}; expected one of {PAIR_LOSSES}")

    @property
    def needs_reference(self) -> bool:
        return self.kind == "dpo"

    def __call__(self, policy: PairLogps, reference: PairLogps | None = None) -> PairLoss:
        if self.kind == "dpo":
            if reference is None:
                raise ValueError("the dpo loss needs the reference model's log-probs")
            losses, chosen, rejected = dpo_loss(policy, reference, self.beta)
        elif self.kind == "simpo":
            losses, chosen, rejected = simpo_loss(policy, self.simpo_beta, self.simpo_gamma)
        else:
            losses, chosen, rejected = margin_loss(policy, self.margin)
        if self.sft_weight:
            losses = losses - self.sft_weight * policy.mean()[0]  # + w * NLL of the chosen answer
        valid = policy.valid
        zero = torch.zeros_like(losses)
        return PairLoss(torch.where(valid, losses, zero), torch.where(valid, chosen, zero),
                        torch.where(valid, rejected, zero), valid)


# -------------------------------------------------------------------------- the reference
class ReferenceAdapter:
    """DPO's frozen reference: a copy of the policy adapter, as a second adapter of the same
    :class:`peft.PeftModel`.

    Why a second adapter: the reference is the model the turn *started* from, i.e. base + the
    starting adapter. Keeping a frozen copy of that adapter costs one adapter's memory (for LoRA a
    few MB) instead of a second copy of the whole model. Disabling the adapter
    (``disable_adapter()``) would give the base model, which is the right reference only for a
    freshly initialised adapter; here the policy starts from a trained one (refine's, then the
    previous turn's). Its log-probs are computed on the fly under ``no_grad`` with the reference
    active and dropout off, so the loss stays a function of the batch alone.
    """

    def __init__(self, model, name: str = REFERENCE_ADAPTER):
        from peft import PeftModel

        if not isinstance(model, PeftModel):
            raise ValueError("the dpo reference needs a LoRA (peft) student; got "
                             f"{type(model).__name__}")
        self.model = model
        self.name = name
        self.policy = model.active_adapter
        if name == self.policy:
            raise ValueError(f"the reference adapter name {name!r} is the policy's")

    def snapshot(self) -> None:
        """Make the reference an exact, frozen copy of the policy adapter as it is now."""
        from peft import get_peft_model_state_dict, set_peft_model_state_dict

        states = self._requires_grad()
        if self.name not in self.model.peft_config:
            config = copy.deepcopy(self.model.peft_config[self.policy])
            config.inference_mode = True
            self.model.add_adapter(self.name, config)
        weights = get_peft_model_state_dict(self.model, adapter_name=self.policy)
        result = set_peft_model_state_dict(self.model, weights, adapter_name=self.name)
        missing = [k for k in result.missing_keys if f".{self.name}." in k]
        if missing:
            raise RuntimeError(f"copying the adapter left reference weights unset: {missing[:3]}")
        self._restore(states)  # adding an adapter may re-mark what is trainable
        for p in self.parameters():
            p.requires_grad_(False)

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for n, p in self.model.named_parameters() if f".{self.name}." in n]

    def _requires_grad(self) -> dict[str, bool]:
        return {n: p.requires_grad for n, p in self.model.named_parameters()}

    def _restore(self, states: dict[str, bool]) -> None:
        for n, p in self.model.named_parameters():
            if n in states:
                p.requires_grad_(states[n])

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """The reference adapter in place of the policy, in eval mode; everything restored after
        (``set_adapter`` re-marks which adapter is trainable, so the flags are put back)."""
        states, was_training = self._requires_grad(), self.model.training
        self.model.set_adapter(self.name, inference_mode=True)
        self.model.eval()
        try:
            yield
        finally:
            self.model.set_adapter(self.policy)
            self._restore(states)
            self.model.train(was_training)

    def logps(self, batch: dict) -> PairLogps:
        with self.active(), torch.no_grad():
            return split_pairs(*answer_logps(self.model, batch))

    def remove(self) -> None:
        """Delete the reference (before saving: only the policy adapter is written)."""
        if self.name in self.model.peft_config:
            states = self._requires_grad()
            self.model.delete_adapter(self.name)
            self.model.set_adapter(self.policy)
            self._restore(states)


# ---------------------------------------------------------------------------- the objective
class PairwiseObjective:
    """The loop's :class:`~meteor.training.loop.Objective` for pairs: the loss summed over valid
    pairs (the loop divides by the valid pairs of the window), with summed reward statistics."""

    def __init__(self, loss: PairwiseLoss, reference: ReferenceAdapter | None = None):
        if loss.needs_reference and reference is None:
            raise ValueError(f"the {loss.kind} loss needs a ReferenceAdapter")
        self.loss = loss
        self.reference = reference if loss.needs_reference else None

    def units(self, batch: dict) -> int:
        has_answer = (batch["labels"][:, 1:] != IGNORE_INDEX).any(-1)
        n = has_answer.shape[0] // 2
        return int((has_answer[:n] & has_answer[n:]).sum())

    def compute(self, model, batch: dict) -> PairLoss:
        # The reference first: switching adapters re-marks requires_grad, which must not happen
        # between the policy's forward and its backward.
        reference = self.reference.logps(batch) if self.reference is not None else None
        return self.loss(split_pairs(*answer_logps(model, batch)), reference)

    def loss_sum(self, model, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = self.compute(model, batch)
        return out.losses.sum(), _reward_sums(out)


def _reward_sums(out: PairLoss) -> dict[str, torch.Tensor]:
    chosen, rejected = out.chosen_rewards.detach(), out.rejected_rewards.detach()
    return {
        "rewards/chosen": chosen.sum(),
        "rewards/rejected": rejected.sum(),
        "rewards/accuracy": ((chosen > rejected) & out.valid).sum().float(),
        "rewards/margin": (chosen - rejected).sum(),
    }


# ----------------------------------------------------------------------------- entry points
def train_pairs(model, tokenizer, pairs: Sequence[EncodedPair], params: TrainParams,
                objective: PairwiseObjective, *, log_dir: str | Path | None = None, live=None,
                desc: str = "pairs") -> TrainResult:
    """Train ``model`` in place on encoded pairs with ``objective`` (the shared loop)."""
    if not pairs:
        raise ValueError("no preference pairs to train on")
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token first")
    return run_training(model, list(pairs), [len(p) for p in pairs],
                        PairCollator(tokenizer.pad_token_id), objective, params, log_dir=log_dir,
                        live=live, desc=desc, data_stats={"pairs": len(pairs)})


def evaluate_pairs(model, tokenizer, pairs: Sequence[EncodedPair], objective: PairwiseObjective,
                   batch_size: int = 8) -> dict[str, float | int | None]:
    """Mean loss, rewards, reward accuracy and margin over ``pairs`` (eval mode, no gradient)."""
    collate = PairCollator(tokenizer.pad_token_id)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    totals = {"loss": 0.0, "rewards/chosen": 0.0, "rewards/rejected": 0.0,
              "rewards/accuracy": 0.0, "rewards/margin": 0.0}
    valid = 0
    try:
        with torch.no_grad():
            for start in range(0, len(pairs), batch_size):
                batch = {k: v.to(device)
                         for k, v in collate(list(pairs[start:start + batch_size])).items()}
                out = objective.compute(model, batch)
                totals["loss"] += float(out.losses.sum())
                for name, value in _reward_sums(out).items():
                    totals[name] += float(value)
                valid += int(out.valid.sum())
    finally:
        model.train(was_training)

    def mean(name: str) -> float | None:
        return round(totals[name] / valid, 6) if valid else None

    result = {"pairs": valid, "loss": mean("loss"), "reward_chosen": mean("rewards/chosen"),
              "reward_rejected": mean("rewards/rejected"),
              "reward_accuracy": mean("rewards/accuracy"), "mean_margin": mean("rewards/margin")}
    if result["loss"] is not None and not math.isfinite(result["loss"]):
        raise FloatingPointError(f"non-finite pairwise loss {result['loss']} on evaluation")
    return result
