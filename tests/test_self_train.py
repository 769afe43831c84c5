"""self_train: the pairwise losses by hand, masking, the frozen reference adapter, pair filtering,
turns, NaN guards and the stage script on a tiny student."""

from __future__ import annotations

import json
import math
import runpy
import shutil
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_TEXTS
from ddp_harness import run_single_and_ddp
from peft import PeftModel
from transformers import AutoModelForCausalLM

import meteor.self_train as self_train_mod
from meteor.criteria import CRITERIA
from meteor.prompts import student_answer_messages
from meteor.self_train import (NoUsablePairs, SelfTrainer, SelfTrainParams, difference,
                               self_train)
from meteor.student.generate import Generation, GenerationParams, generate
from meteor.student.load import prepare_tokenizer_for_generation
from meteor.student.tiny import build_tiny_model, tiny_llama_config, train_tokenizer
from meteor.teacher.base import (Comparison, CriterionPreference, Teacher, TeacherResult,
                                 TeacherStats)
from meteor.teacher.config import TeacherParams
from meteor.teacher.offline import OfflineTeacher
from meteor.training.config import LoraParams
from meteor.training.data import IGNORE_INDEX
from meteor.training.lora import check_adapter_matches, make_trainable, save_trained
from meteor.training.preference import (EncodedPair, PairCollator, PairLogps, PairwiseLoss,
                                        PairwiseObjective, ReferenceAdapter, answer_logps,
                                        encode_pair, evaluate_pairs, split_pairs, train_pairs)

REPO = Path(__file__).resolve().parents[1]
LORA = {"r": 4, "alpha": 8, "dropout": 0.0}
GENERATION = GenerationParams(batch_size=8)


def st_params(**overrides) -> SelfTrainParams:
    base = dict(turns=1, limit=None, num_beams=3, max_new_tokens=12, min_difference=0.1,
                train=dict(epochs=3, batch_size=4, lr=1e-2, max_seq_len=256, lora=LORA))
    return SelfTrainParams.model_validate({**base, **overrides})


def make_question(i: int) -> dict:
    return {"id": 100 + i, "category": ("ML", "DL", "NLP", "CV")[i % 4],
            "title": f"Question {i} about gradient descent",
            "question": f"Why does the loss of model {i} go down?",
            "answer": "The gradient points uphill, so step against it to lower the loss."}


QUESTIONS = [make_question(i) for i in range(8)]


@pytest.fixture(scope="module")
def tokenizer():
    return prepare_tokenizer_for_generation(train_tokenizer(TINY_TEXTS, vocab_size=400))


def tiny_student(tokenizer, seed: int = 0):
    """A LoRA tiny student with a wide weight init: greedy and beam replies are varied text (an
    untrained default-init model writes blanks) and differ for most prompts."""
    config = tiny_llama_config(tokenizer, hidden_size=64, num_layers=2, intermediate_size=128)
    config.initializer_range = 0.3
    return make_trainable(build_tiny_model(config, seed=seed), LoraParams(**LORA), seed=seed)


def perturb_adapter(model, scale: float = 0.05, seed: int = 1) -> None:
    """A fresh LoRA has B = 0 (it is the base model); give it weights, like a trained adapter."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(scale * torch.randn(p.shape, generator=generator))


def toy_logps(chosen_sum, chosen_n, rejected_sum, rejected_n) -> PairLogps:
    t = torch.tensor
    return PairLogps(t(chosen_sum, dtype=torch.float32), t(chosen_n), t(rejected_sum,
                     dtype=torch.float32), t(rejected_n))


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# ---------------------------------------------------------------------------------- losses
POLICY = toy_logps([-10.0, -4.0, -30.0], [5, 2, 10], [-12.0, -3.0, -25.0], [4, 3, 5])
REFERENCE = toy_logps([-11.0, -5.0, -28.0], [5, 2, 10], [-11.5, -2.0, -27.0], [4, 3, 5])


def test_dpo_loss_is_the_hand_computation():
    out = PairwiseLoss(kind="dpo", beta=0.1)(POLICY, REFERENCE)
    for i in range(3):
        rc = 0.1 * (POLICY.chosen_sum[i].item() - REFERENCE.chosen_sum[i].item())
        rr = 0.1 * (POLICY.rejected_sum[i].item() - REFERENCE.rejected_sum[i].item())
        assert out.losses[i].item() == pytest.approx(-math.log(sigmoid(rc - rr)), rel=1e-6)
        assert out.chosen_rewards[i].item() == pytest.approx(rc, rel=1e-6)
        assert out.rejected_rewards[i].item() == pytest.approx(rr, rel=1e-6)
    # Policy == reference: every logit is 0 and the loss is ln 2 (DPO's starting point).
    same = PairwiseLoss(kind="dpo", beta=0.1)(POLICY, POLICY)
    torch.testing.assert_close(same.losses, torch.full((3,), math.log(2)))


def test_simpo_loss_is_the_hand_computation():
    out = PairwiseLoss(kind="simpo", simpo_beta=2.0, simpo_gamma=0.5)(POLICY)
    for i in range(3):
        mc = POLICY.chosen_sum[i].item() / POLICY.chosen_tokens[i].item()
        mr = POLICY.rejected_sum[i].item() / POLICY.rejected_tokens[i].item()
        expected = -math.log(sigmoid(2.0 * mc - 2.0 * mr - 0.5))
        assert out.losses[i].item() == pytest.approx(expected, rel=1e-6)
        assert out.chosen_rewards[i].item() == pytest.approx(2.0 * mc, rel=1e-6)


def test_margin_loss_is_the_hand_computation_with_and_without_sft_term():
    out = PairwiseLoss(kind="margin", margin=0.3)(POLICY)
    weighted = PairwiseLoss(kind="margin", margin=0.3, sft_weight=0.5)(POLICY)
    for i in range(3):
        nll_c = -POLICY.chosen_sum[i].item() / POLICY.chosen_tokens[i].item()
        nll_r = -POLICY.rejected_sum[i].item() / POLICY.rejected_tokens[i].item()
        assert out.losses[i].item() == pytest.approx(max(0.0, nll_c - nll_r + 0.3), abs=1e-6)
        assert weighted.losses[i].item() == pytest.approx(
            max(0.0, nll_c - nll_r + 0.3) + 0.5 * nll_c, abs=1e-6)
    # Pair 2 prefers its chosen answer by more than the margin (NLL 3 vs 5): no loss; pair 1
    # prefers the rejected one (NLL 2 vs 1): a loss.
    assert out.losses[2].item() == 0.0 and out.losses[1].item() > 0


def test_empty_answer_masks_give_a_zero_finite_loss_not_nan():
    logps = toy_logps([-10.0, 0.0], [5, 0], [-12.0, -3.0], [4, 3])
    for loss in (PairwiseLoss(kind="simpo"), PairwiseLoss(kind="margin", sft_weight=1.0)):
        out = loss(logps)
        assert out.valid.tolist() == [True, False]
        assert torch.isfinite(out.losses).all() and out.losses[1].item() == 0.0
        assert out.chosen_rewards[1].item() == 0.0
    out = PairwiseLoss(kind="dpo")(logps, logps)
    assert torch.isfinite(out.losses).all() and out.losses[1].item() == 0.0


def test_the_objective_counts_only_valid_pairs_and_sums_their_losses(tokenizer):
    model = tiny_student(tokenizer)
    pairs = [encode_pair(tokenizer, student_answer_messages(q), f"beam {i} answer",
                         f"greedy {i}", 256)[0] for i, q in enumerate(QUESTIONS[:3])]
    batch = PairCollator(tokenizer.pad_token_id)(pairs)
    batch["labels"][1] = IGNORE_INDEX  # pair 1's chosen answer has no token left
    objective = PairwiseObjective(PairwiseLoss(kind="simpo"))
    assert objective.units(batch) == 2
    loss_sum, stats = objective.loss_sum(model, batch)
    out = objective.compute(model, batch)
    assert torch.isfinite(loss_sum) and loss_sum.item() == pytest.approx(out.losses.sum().item())
    assert out.losses[1].item() == 0.0 and stats["rewards/accuracy"].item() <= 2


# --------------------------------------------------------------------------------- masking
def test_log_probs_cover_the_answer_tokens_only(tokenizer):
    """Summed log-probs of a padded pair batch == those of each sequence alone, summed over its
    answer positions only: the prompt and the padding add nothing."""
    model = tiny_student(tokenizer).eval()
    prompt = student_answer_messages(QUESTIONS[0])
    pair, reason = encode_pair(tokenizer, prompt, "A long chosen answer about the gradient.",
                               "Short.", 256)
    assert reason is None
    short_prompt = student_answer_messages(make_question(1) | {"question": "Why?"})
    other, _ = encode_pair(tokenizer, short_prompt, "x", "Another rejected answer, longer.", 256)
    batch = PairCollator(tokenizer.pad_token_id)([pair, other])
    assert batch["attention_mask"].min() == 0  # there is padding
    with torch.no_grad():
        sums, counts = answer_logps(model, batch)
        for row, enc in enumerate([pair.chosen, other.chosen, pair.rejected, other.rejected]):
            ids = torch.tensor([enc.input_ids])
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
            positions = [t for t in range(1, len(enc)) if enc.labels[t] != IGNORE_INDEX]
            expected = sum(logp[t - 1, enc.input_ids[t]].item() for t in positions)
            assert counts[row].item() == len(positions) > 0
            assert positions[0] > len(enc) // 2  # the prompt is most of the sequence, excluded
            assert sums[row].item() == pytest.approx(expected, rel=1e-4, abs=1e-4)
    logps = split_pairs(sums, counts)
    assert logps.chosen_tokens.tolist() == counts[:2].tolist()


def test_truncation_and_identical_remainders_are_skip_reasons(tokenizer):
    prompt = student_answer_messages(QUESTIONS[0])
    n_prompt = len(encode_pair(tokenizer, prompt, "a", "b", 512)[0].chosen)
    assert encode_pair(tokenizer, prompt, "one answer", "another", n_prompt - 3) == (
        None, "truncated")
    # Both answers start alike; max_seq_len keeps only their common start.
    same_start = encode_pair(tokenizer, prompt, "Gradient descent updates the weights. Yes",
                             "Gradient descent updates the weights. No", n_prompt + 2)
    assert same_start == (None, "identical_after_truncation")


def test_difference_is_word_level_and_normalised():
    assert difference("a b c d", "a b c d") == 0.0
    assert difference("a b c d", "e f g h") == 1.0
    assert 0 < difference("a b c d e f g h i j", "a b c d e f g h i k") < 0.15
    long = " ".join(f"w{i % 7}" for i in range(400))  # autojunk would call these similar
    assert difference(long, " ".join(reversed(long.split()))) > 0.3


# ------------------------------------------------------------------------------- reference
def test_reference_adapter_is_a_frozen_exact_copy_while_the_policy_trains(tokenizer):
    model = tiny_student(tokenizer)
    perturb_adapter(model)  # a trained-like start: the reference is not the base model
    pairs = [encode_pair(tokenizer, student_answer_messages(q), f"The beam answer {i} is long.",
                         f"greedy {i}", 256)[0] for i, q in enumerate(QUESTIONS)]
    batch = PairCollator(tokenizer.pad_token_id)(pairs)
    with torch.no_grad():
        start_logps = answer_logps(model.eval(), batch)[0]
        with model.disable_adapter():
            base_logps = answer_logps(model, batch)[0]
    assert not torch.allclose(start_logps, base_logps)

    reference = ReferenceAdapter(model)
    reference.snapshot()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if ".reference." in n}
    policy = {n: p.detach().clone() for n, p in model.named_parameters() if ".default." in n}
    assert frozen and all(not p.requires_grad for p in reference.parameters())
    assert {n.replace(".reference.", ".default.") for n in frozen} == set(policy)
    torch.testing.assert_close(reference.logps(batch).chosen_sum, start_logps[:len(pairs)],
                               rtol=0, atol=0)  # the turn's starting model, exactly

    params = st_params().train
    objective = PairwiseObjective(PairwiseLoss(kind="dpo", beta=0.5), reference)
    before = evaluate_pairs(model, tokenizer, pairs, objective)
    result = train_pairs(model, tokenizer, pairs, params, objective)
    after = evaluate_pairs(model, tokenizer, pairs, objective)
    assert result.steps == 3 * 2
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]) and not p.requires_grad, n  # bitwise frozen
        elif n in policy and "lora_" in n:
            assert p.requires_grad
    assert any(not torch.equal(dict(model.named_parameters())[n], p) for n, p in policy.items())
    assert before["mean_margin"] == 0.0 and before["loss"] == pytest.approx(math.log(2))
    assert after["mean_margin"] > 0 and after["reward_accuracy"] > 0.5
    assert set(result.history) == {"rewards/chosen", "rewards/rejected", "rewards/accuracy",
                                   "rewards/margin"}
    reference.remove()
    assert list(model.peft_config) == ["default"] and model.active_adapter == "default"
    assert not any(".reference." in n for n, _ in model.named_parameters())


@pytest.mark.parametrize("loss", ["dpo", "simpo", "margin"])
def test_a_few_steps_raise_the_chosen_minus_rejected_margin(tokenizer, loss):
    model = tiny_student(tokenizer)
    perturb_adapter(model)
    pairs = [encode_pair(tokenizer, student_answer_messages(q), f"Step against the gradient {i}.",
                         f"Bananas are yellow {i}.", 256)[0] for i, q in enumerate(QUESTIONS)]
    reference = ReferenceAdapter(model) if loss == "dpo" else None
    if reference:
        reference.snapshot()
    objective = PairwiseObjective(PairwiseLoss(kind=loss, beta=0.5, margin=1.0), reference)
    before = evaluate_pairs(model, tokenizer, pairs, objective)
    train_pairs(model, tokenizer, pairs, st_params().train, objective)
    after = evaluate_pairs(model, tokenizer, pairs, objective)
    assert after["mean_margin"] > before["mean_margin"] + 0.1
    assert after["loss"] < before["loss"]


def test_gradient_accumulation_over_pairs_matches_one_big_batch(tokenizer):
    """4 pairs in one batch == 2 micro-batches of 2: the loss is divided by the window's pairs."""
    histories = []
    pairs = None
    for batch_size, grad_accum in ((4, 1), (2, 2)):
        model = tiny_student(tokenizer)
        pairs = [encode_pair(tokenizer, student_answer_messages(q), f"chosen {i} " * (i + 1),
                             f"rejected {i}", 256)[0] for i, q in enumerate(QUESTIONS[:4])]
        params = st_params(train=dict(epochs=2, batch_size=batch_size, grad_accum=grad_accum,
                                      lr=1e-2, max_seq_len=256, group_by_length=False,
                                      lora=LORA)).train
        result = train_pairs(model, tokenizer, pairs, params,
                             PairwiseObjective(PairwiseLoss(kind="simpo")))
        histories.append(result.loss_history)
    assert len(histories[0]) == 2 and result.loss_tokens == 2 * len(pairs)
    torch.testing.assert_close(torch.tensor(histories[1]), torch.tensor(histories[0]),
                               rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------- generation stats
def test_generate_can_return_token_counts_and_seconds(tokenizer):
    model = tiny_student(tokenizer)
    conversations = [student_answer_messages(q) for q in QUESTIONS[:3]]
    texts = generate(model, tokenizer, conversations, max_new_tokens=10, progress=False)
    stats = generate(model, tokenizer, conversations, max_new_tokens=10, progress=False,
                     return_stats=True)
    assert [g.text for g in stats] == texts
    assert all(isinstance(g, Generation) and 1 <= g.tokens <= 10 and g.seconds > 0
               for g in stats)


# ----------------------------------------------------------------------------------- pairs
class CannedGenerate:
    """Stands in for generate(): greedy and beam answers per question id from two tables."""

    def __init__(self, greedy: dict[int, str], beam: dict[int, str]):
        self.greedy, self.beam = greedy, beam

    def __call__(self, model, tokenizer, conversations, *, num_beams=1, **kwargs):
        table = self.greedy if num_beams == 1 else self.beam
        ids = [int(c[1]["content"].split("Question ")[1].split(" ")[0]) + 100
               for c in conversations]
        return [Generation(table[i], len(table[i].split()), 0.01 * num_beams) for i in ids]


def test_identical_empty_and_near_identical_pairs_never_reach_the_loss(tokenizer, monkeypatch):
    greedy = {100: "Same answer here.", 101: "", 102: "w1 w2 w3 w4 w5 w6 w7 w8 w9 w10 w11 w12",
              103: "Greedy answer about the loss.", 104: "Another greedy reply."}
    beam = {100: "Same answer here.", 101: "A beam answer.",
            102: "w1 w2 w3 w4 w5 w6 w7 w8 w9 w10 w11 w13",
            103: "Beam answer: step against the gradient.", 104: "A different beam reply."}
    monkeypatch.setattr(self_train_mod, "generate", CannedGenerate(greedy, beam))
    trained = []
    real_train_pairs = self_train_mod.train_pairs

    def recording_train_pairs(model, tokenizer, pairs, *args, **kwargs):
        trained.extend(pairs)
        return real_train_pairs(model, tokenizer, pairs, *args, **kwargs)

    monkeypatch.setattr(self_train_mod, "train_pairs", recording_train_pairs)
    model = tiny_student(tokenizer)
    run = self_train(model, tokenizer, QUESTIONS[:5], st_params(), GENERATION,
                     OfflineTeacher(TeacherParams(), progress=False))
    reasons = {r["id"]: r["skip_reason"] for r in run.rows}
    assert reasons == {100: "identical", 101: "empty", 102: "near_identical", 103: None,
                       104: None}
    assert len(trained) == 2 and all(p.chosen.labels != p.rejected.labels for p in trained)
    [turn] = run.turns
    assert turn["kept"] == 2 and turn["skipped"]["identical"] == 1
    assert turn["skipped"]["empty"] == 1 and turn["skipped"]["near_identical"] == 1
    assert turn["judge"]["judged"] == 2  # only the kept pairs are judged
    kept = [r for r in run.rows if r["skip_reason"] is None]
    assert all(r["chosen"] == r["beam"]["text"] and r["rejected"] == r["greedy"]["text"]
               for r in kept)
    assert turn["compute"]["seconds_ratio"] == pytest.approx(3.0)
    assert turn["after"]["mean_margin"] > turn["before"]["mean_margin"] == 0.0


class PreferGreedyJudge(Teacher):
    """Prefers answer B on every criterion, except for question 104: a tie."""

    name = "scripted:judge"

    def __init__(self):
        self.stats = TeacherStats()

    def compare(self, questions, answers_a, answers_b, criteria=CRITERIA):
        results = []
        for q, a, b in zip(questions, answers_a, answers_b):
            self.stats.calls += 1
            greedy_is_b = b.startswith("Greedy")
            winner = "tie" if q["id"] == 104 else ("B" if greedy_is_b else "A")
            parsed = Comparison(preferences={c: CriterionPreference(winner=winner,
                                                                    justification="j")
                                             for c in criteria})
            results.append(TeacherResult(ok=True, text="{}", parsed=parsed))
        return results

    def answer(self, *a):
        raise NotImplementedError

    def verdict(self, *a):
        raise NotImplementedError

    def score(self, *a, **k):
        raise NotImplementedError


def test_judge_pairing_chooses_the_judges_winner_and_skips_ties(tokenizer, monkeypatch):
    greedy = {i: f"Greedy answer {i} about the loss." for i in range(100, 105)}
    beam = {i: f"Beam answer {i}: step against the gradient." for i in range(100, 105)}
    monkeypatch.setattr(self_train_mod, "generate", CannedGenerate(greedy, beam))
    run = self_train(tiny_student(tokenizer), tokenizer, QUESTIONS[:5],
                     st_params(pairing="judge", loss="simpo"), GENERATION, PreferGreedyJudge())
    rows = {r["id"]: r for r in run.rows}
    assert rows[104]["skip_reason"] == "judge_tie" and rows[104]["chosen"] is None
    for i in range(100, 104):
        assert rows[i]["chosen_from"] == "greedy" and rows[i]["chosen"] == greedy[i]
        assert rows[i]["judge"]["overall"] == "greedy"
    judge = run.turns[0]["judge"]
    assert judge["agreement"] == 0.0 and judge["overall"] == {"beam": 0, "greedy": 4, "tie": 1}


def test_each_turn_regenerates_and_references_its_starting_adapter(tokenizer, monkeypatch):
    model = tiny_student(tokenizer)
    perturb_adapter(model)
    snapshots, prompts_seen = [], []
    real_snapshot = ReferenceAdapter.snapshot

    def recording_snapshot(self):
        policy = {n: p.detach().clone() for n, p in self.model.named_parameters()
                  if ".default." in n}
        real_snapshot(self)
        reference = {n.replace(".reference.", ".default."): p.detach().clone()
                     for n, p in self.model.named_parameters() if ".reference." in n}
        snapshots.append((policy, reference))

    real_generate = self_train_mod.generate

    def recording_generate(*args, **kwargs):
        prompts_seen.append(kwargs["num_beams"])
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(ReferenceAdapter, "snapshot", recording_snapshot)
    monkeypatch.setattr(self_train_mod, "generate", recording_generate)
    run = self_train(model, tokenizer, QUESTIONS, st_params(turns=2, judge_pairs=False),
                     GENERATION)
    assert [t["turn"] for t in run.turns] == [1, 2] and all(t["kept"] for t in run.turns)
    assert prompts_seen == [1, 3, 1, 3]  # greedy + beam, each turn
    assert len(snapshots) == 2
    for policy, reference in snapshots:
        assert policy.keys() == reference.keys()
        assert all(torch.equal(policy[n], reference[n]) for n in policy)
    first, second = snapshots[0][1], snapshots[1][1]
    assert any(not torch.equal(first[n], second[n]) for n in first)  # turn 2: the trained one
    assert {r["turn"] for r in run.rows} == {1, 2} and len(run.rows) == 2 * len(QUESTIONS)
    assert not any(".reference." in n for n, _ in model.named_parameters())


def test_no_usable_pair_is_an_error_or_passes_the_model_through(tokenizer, monkeypatch):
    same = {i: f"Answer {i}." for i in range(100, 104)}
    monkeypatch.setattr(self_train_mod, "generate", CannedGenerate(same, same))
    model = tiny_student(tokenizer)
    with pytest.raises(NoUsablePairs, match="turn 1: no usable pair among 4 questions") as e:
        self_train(model, tokenizer, QUESTIONS[:4], st_params(judge_pairs=False), GENERATION)
    assert e.value.run.turns[0]["skipped"]["identical"] == 4

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    run = self_train(model, tokenizer, QUESTIONS[:4],
                     st_params(turns=3, judge_pairs=False, on_no_pairs="pass_through"),
                     GENERATION)
    assert run.stopped_early and [t["passed_through"] for t in run.turns] == [True]
    assert run.metrics()["final"] is None and run.metrics()["passed_through"] == [1]
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_lora_params_must_describe_the_continued_adapter(tokenizer):
    model = tiny_student(tokenizer)
    check_adapter_matches(model, LoraParams(**LORA), "self_train.train.lora")
    with pytest.raises(ValueError, match=r"self_train.train.lora.r=8 but .* has 4"):
        check_adapter_matches(model, LoraParams(**{**LORA, "r": 8}), "self_train.train.lora")


def test_params_reject_judge_pairing_without_the_judge():
    with pytest.raises(ValueError, match="pairing: judge needs self_train.judge_pairs"):
        st_params(pairing="judge", judge_pairs=False)


# ------------------------------------------------------------------------------- the stage
def write_stage_inputs(root: Path, tokenizer, extra_params: dict | None = None) -> None:
    """models/base, models/refine, the train split and params.yaml under ``root`` (the cwd)."""
    config = tiny_llama_config(tokenizer, hidden_size=64, num_layers=2, intermediate_size=128)
    config.initializer_range = 0.3
    base = build_tiny_model(config, seed=0)
    base.save_pretrained(root / "models" / "base")
    tokenizer.save_pretrained(root / "models" / "base")
    refine = make_trainable(AutoModelForCausalLM.from_pretrained(root / "models" / "base"),
                            LoraParams(**LORA))
    perturb_adapter(refine)
    refine.peft_config["default"].base_model_name_or_path = "models/base"
    save_trained(refine, tokenizer, root / "models" / "refine")
    rows = QUESTIONS + [{"id": 99, "category": "ML", "title": "", "question": "Q?"}]
    (root / "data" / "scraped").mkdir(parents=True)
    (root / "data" / "scraped" / "train.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in rows))
    params = {
        "generation": {"batch_size": 8},
        "self_train": {"turns": 2, "limit": 9, "num_beams": 3, "max_new_tokens": 10,
                       "train": {"epochs": 2, "batch_size": 4, "max_seq_len": 256,
                                 "lr": 1e-2, "lora": LORA}},
        "judge": {"cache_dir": str(root / "cache")},
    }
    for key, value in (extra_params or {}).items():
        params["self_train"][key] = value
    (root / "params.yaml").write_text(yaml.safe_dump(params))


def run_stage() -> int:
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(REPO / "stages" / "self_train.py"), run_name="__main__")
    return exit_info.value.code


def test_stage_writes_pairs_one_loadable_adapter_and_metrics(tokenizer, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the adapter names its base by the relative path models/base
    write_stage_inputs(tmp_path, tokenizer)
    assert run_stage() == 0

    rows = [json.loads(line) for line in (tmp_path / "data" / "self_pairs.jsonl").open()]
    assert [(r["turn"], r["id"]) for r in rows] == [(t, q["id"]) for t in (1, 2)
                                                     for q in QUESTIONS]
    kept = [r for r in rows if r["skip_reason"] is None]
    assert kept and all(r["chosen"] and r["rejected"] and r["judge"]["ok"] for r in kept)
    assert all(r["beam"]["tokens"] > 0 and r["greedy"]["tokens"] > 0 for r in rows)
    compute = json.loads((tmp_path / "metrics" / "self_train_compute.json").read_text())
    assert [(c["turn"], c["id"]) for c in compute] == [(r["turn"], r["id"]) for r in rows]
    assert all(c["beam_seconds"] > 0 and c["greedy_seconds"] > 0 for c in compute)
    assert [c["beam_tokens"] for c in compute] == [r["beam"]["tokens"] for r in rows]
    metrics = json.loads((tmp_path / "metrics" / "self_train.json").read_text())
    assert metrics["turns_run"] == 2 and set(metrics["turns"]) == {"turn_1", "turn_2"}
    assert metrics["rows_in"] == 9 and metrics["rows_skipped"] == {"no_question": 1}
    turn = metrics["turns"]["turn_1"]
    assert turn["kept"] + sum(turn["skipped"].values()) == len(QUESTIONS)
    assert turn["compute"]["seconds_ratio"] > 0 and turn["judge"]["agreement"] is not None
    assert turn["after"]["mean_margin"] > turn["before"]["mean_margin"]
    assert metrics["final"] == metrics["turns"]["turn_2"]["after"]
    assert metrics["judge"]["calls"] == 2 * sum(t["kept"] for t in metrics["turns"].values())
    curve = tmp_path / "dvclive" / "self_train" / "plots" / "metrics" / "train"
    assert (curve / "loss.tsv").exists() and (curve / "rewards" / "margin.tsv").exists()

    out = tmp_path / "models" / "self_train"
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["target_modules"] == sorted(config["target_modules"])
    assert not [p for p in out.iterdir() if p.is_dir()]  # no second adapter saved
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "models" / "base")
    loaded = PeftModel.from_pretrained(base, out)
    assert list(loaded.peft_config) == ["default"]
    refine_bytes = (tmp_path / "models" / "refine" / "adapter_model.safetensors").read_bytes()
    assert (out / "adapter_model.safetensors").read_bytes() != refine_bytes


def test_stage_without_usable_pairs_exits_non_zero_and_writes_no_model(tokenizer, tmp_path,
                                                                      monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_stage_inputs(tmp_path, tokenizer)
    same = {q["id"]: f"Answer {q['id']}." for q in QUESTIONS}
    monkeypatch.setattr(self_train_mod, "generate", CannedGenerate(same, same))
    assert run_stage() == 2
    assert not (tmp_path / "models" / "self_train").exists()
    metrics = json.loads((tmp_path / "metrics" / "self_train.json").read_text())
    turn = metrics["turns"]["turn_1"]
    assert turn["kept"] == 0 and turn["skipped"]["identical"] == len(QUESTIONS)
    assert (tmp_path / "data" / "self_pairs.jsonl").exists()

    shutil.rmtree(tmp_path / "dvclive")
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    params["self_train"]["on_no_pairs"] = "pass_through"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    assert run_stage() == 0
    metrics = json.loads((tmp_path / "metrics" / "self_train.json").read_text())
    assert metrics["passed_through"] == [1] and metrics["stopped_early"]
    out = tmp_path / "models" / "self_train" / "adapter_model.safetensors"
    from safetensors.torch import load_file

    saved, start = load_file(out), load_file(tmp_path / "models" / "refine" /
                                             "adapter_model.safetensors")
    assert saved.keys() == start.keys() and all(torch.equal(saved[k], start[k]) for k in saved)


def test_two_runs_write_identical_pairs_and_adapters(tokenizer):
    outputs = []
    for _ in range(2):
        model = tiny_student(tokenizer)
        perturb_adapter(model)
        run = self_train(model, tokenizer, QUESTIONS, st_params(judge_pairs=False), GENERATION)
        outputs.append((run.rows, {n: p.detach().clone() for n, p in model.named_parameters()
                                   if "lora_" in n}))
    assert outputs[0][0] == outputs[1][0] and any(r["skip_reason"] is None for r in outputs[0][0])
    assert all(torch.equal(p, outputs[1][1][n]) for n, p in outputs[0][1].items())


# ----------------------------------------------------------------------------------- DDP
DDP_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    from accelerate import PartialState
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from meteor.training.config import TrainParams
    from meteor.training.lora import make_trainable
    from meteor.training.preference import (PairwiseLoss, PairwiseObjective, ReferenceAdapter,
                                            encode_pair, train_pairs)

    model_dir, pairs_file, grad_accum, out = sys.argv[1:]
    state = PartialState(cpu=True)  # gloo on CPU when launched by torchrun
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    params = TrainParams(epochs=2, batch_size=2, grad_accum=int(grad_accum), lr=1e-2,
                         group_by_length=False, lora={"r": 4, "alpha": 8, "dropout": 0.0})
    model = make_trainable(AutoModelForCausalLM.from_pretrained(model_dir), params.lora)
    with torch.no_grad():  # a trained-like start, the same in every process
        generator = torch.Generator().manual_seed(1)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(0.05 * torch.randn(p.shape, generator=generator))
    pairs = [encode_pair(tokenizer, prompt, chosen, rejected, 256)[0]
             for prompt, chosen, rejected in json.load(open(pairs_file))]
    reference = ReferenceAdapter(model)
    reference.snapshot()
    frozen = [p.detach().clone() for p in reference.parameters()]
    result = train_pairs(model, tokenizer, pairs, params,
                         PairwiseObjective(PairwiseLoss(kind="dpo", beta=0.5), reference))
    assert all(torch.equal(a, b) for a, b in zip(frozen, reference.parameters()))
    if state.is_main_process:
        json.dump({"processes": state.num_processes, "loss": result.loss_history,
                   "margin": result.history["rewards/margin"]}, open(out, "w"))
""")


@pytest.mark.slow
def test_dpo_on_two_ddp_processes_equals_one_process_with_accumulation(tiny_model_dir, tmp_path):
    """The reference forward (adapter switched, no grad) inside a DDP step leaves DDP's gradient
    sync intact: 2 processes x 1 micro-batch == 1 process x 2 accumulated micro-batches."""
    script = tmp_path / "ddp_pairs.py"
    script.write_text(DDP_SCRIPT)
    pairs = tmp_path / "pairs.json"
    pairs.write_text(json.dumps([(student_answer_messages(q), f"Step against it {i}. " * (1 + i % 3),
                                  f"Bananas {i}.") for i, q in enumerate(QUESTIONS)]))
    results = run_single_and_ddp(script, [str(tiny_model_dir), str(pairs)], tmp_path)
    assert len(results["ddp"]["loss"]) == len(results["single"]["loss"]) == 4
    torch.testing.assert_close(torch.tensor(results["ddp"]["loss"]),
                               torch.tensor(results["single"]["loss"]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(results["ddp"]["margin"]),
                               torch.tensor(results["single"]["margin"]), rtol=1e-5, atol=1e-6)
    assert results["single"]["loss"][-1] < results["single"]["loss"][0]
