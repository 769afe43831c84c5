"""Evaluation: aggregation of judgments, bootstrap intervals, reference perplexity, ROUGE-L, the
report's tables, the judge against a loopback OpenAI-compatible server, and the stage scripts."""

from __future__ import annotations

import importlib.util
import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from fake_openai_server import FakeOpenAIServer, make_questions
from rouge_score import rouge_scorer

from meteor.criteria import CRITERIA
from meteor.evaluation.aggregate import (bootstrap_interval, mean_scores, objective_metrics,
                                         score_differences, win_shares)
from meteor.evaluation.answers import answer_rows, reference_nll
from meteor.evaluation.judge import judge_model
from meteor.evaluation.questions import answers_for, usable_questions
from meteor.evaluation.report import (eval_metrics, journey_table, meteor_table, plot_journey,
                                      render_report, summarize)
from meteor.evaluation.config import BootstrapParams, EvaluateParams
from meteor.teacher.config import TeacherParams
from meteor.prompts import student_answer_messages
from meteor.student.generate import Generation, _generated_length, generate
from meteor.student.load import load_student
from meteor.teacher.base import (Comparison, CriterionPreference, CriterionScore, Scores, Teacher,
                                 TeacherResult, TeacherStats)
from meteor.teacher.chat import ChatTeacher
from meteor.teacher.openai_backend import OpenAIBackend
from meteor.textmetrics import rouge_l

ROOT = Path(__file__).resolve().parents[1]
BOOT = BootstrapParams(samples=500, seed=0)


# ------------------------------------------------------------------------- hand-made judgments
def pair(i: int, **winners: str) -> dict:
    """A resolved pair row; winners given per criterion, both orders agreeing."""
    return {"kind": "pair", "model": "m", "against": "base", "id": i, "category": "ML", "ok": True,
            "error": None, "winners": winners, "consistent": {c: True for c in winners},
            "calls": []}


def failed_pair(i: int) -> dict:
    return {"kind": "pair", "model": "m", "against": "base", "id": i, "category": "ML",
            "ok": False, "error": "invalid JSON after 3 replies", "winners": None,
            "consistent": None, "calls": []}


def score(i: int, value: int | None, model: str = "m", criteria=("accuracy",)) -> dict:
    return {"kind": "score", "model": model, "id": i, "category": "ML", "ok": value is not None,
            "error": None if value is not None else "invalid JSON",
            "scores": {c: value for c in criteria} if value is not None else None,
            "call": {"cached": False}}


def test_ties_split_and_failed_pairs_are_excluded_and_counted():
    rows = [pair(0, accuracy="model"), pair(1, accuracy="model"), pair(2, accuracy="tie"),
            pair(3, accuracy="tie"), pair(4, accuracy="baseline"), failed_pair(5)]
    shares = win_shares(rows, ["accuracy"], BOOT)
    acc = shares["criteria"]["accuracy"]
    assert (acc["wins"], acc["ties"], acc["losses"]) == (2, 2, 1)
    assert shares["compared"] == 5 and shares["failed"] == 1
    assert acc["share"]["value"] == pytest.approx((2 + 2 / 2) / 5)  # 0.6, not 3/6 or 2/6
    assert shares["overall"]["share"]["value"] == pytest.approx(0.6)


def test_every_comparison_failed_gives_no_share_not_zero():
    shares = win_shares([failed_pair(0), failed_pair(1)], ["accuracy"], BOOT)
    assert shares["compared"] == 0 and shares["failed"] == 2
    assert shares["overall"]["share"] == {"value": None, "low": None, "high": None}


def test_failed_scores_are_excluded_never_zero():
    rows = [score(0, 8), score(1, 6), score(2, None)]
    s = mean_scores(rows, ["accuracy"])
    assert s["overall"] == pytest.approx(7.0) and s["scored"] == 2 and s["failed"] == 1


def test_score_difference_is_paired_over_questions_both_scored():
    model = [score(0, 8), score(1, 6), score(2, None), score(3, 9)]
    base = [score(0, 5, "base"), score(1, 6, "base"), score(2, 1, "base"), score(3, None, "base")]
    d = score_differences(model, base, ["accuracy"], BOOT)
    assert d["paired"] == 2  # questions 0 and 1 only
    assert d["overall"]["value"] == pytest.approx(((8 - 5) + (6 - 6)) / 2)
    assert d["overall"]["low"] <= d["overall"]["value"] <= d["overall"]["high"]


def test_bootstrap_interval_contains_the_estimate_shrinks_with_n_and_is_seeded():
    pattern = [1.0, 0.0, 0.5, 1.0, 1.0, 0.0, 0.5, 1.0, 0.0, 1.0]
    small, large = pattern * 2, pattern * 20
    lo_s, hi_s = bootstrap_interval(small, BOOT)
    lo_l, hi_l = bootstrap_interval(large, BOOT)
    mean = sum(pattern) / len(pattern)
    assert lo_s <= mean <= hi_s and lo_l <= mean <= hi_l
    assert hi_l - lo_l < (hi_s - lo_s) / 2  # ~1/sqrt(10) as wide with 10x the questions
    assert bootstrap_interval(small, BOOT) == (lo_s, hi_s)  # seeded: the same every time
    assert bootstrap_interval(small, BootstrapParams(samples=500, seed=1)) != (lo_s, hi_s)
    assert bootstrap_interval([], BOOT) is None
    assert bootstrap_interval([0.5] * 7, BOOT) == (0.5, 0.5)


class ScriptedJudge(Teacher):
    """A judge with a position bias on accuracy (always prefers the first answer), a consistent
    preference for the model on completeness and for the baseline on coherence, ties on
    relevance, and no verdict for question 2's score."""

    name = "scripted:judge"

    def __init__(self):
        self.stats = TeacherStats()

    def answer(self, questions, guidelines):
        raise NotImplementedError

    def verdict(self, questions, answers):
        raise NotImplementedError

    def score(self, questions, answers, criteria=CRITERIA):
        out = []
        for q, a in zip(questions, answers):
            if q["id"] == 2:
                out.append(TeacherResult(ok=False, text="{oops", error="invalid JSON after 3 "
                                                                        "replies: ..."))
                continue
            value = 8 if a.startswith("model") else 5
            parsed = Scores(scores={c: CriterionScore(score=value, justification="j")
                                    for c in criteria})
            out.append(TeacherResult(ok=True, text=parsed.model_dump_json(), parsed=parsed))
        return out

    def compare(self, questions, answers_a, answers_b, criteria=CRITERIA):
        out = []
        for a, b in zip(answers_a, answers_b):
            model_first = a.startswith("model")
            prefs = {"accuracy": "A", "completeness": "A" if model_first else "B",
                     "relevance": "tie", "coherence": "B" if model_first else "A",
                     "reliability": "A" if model_first else "B"}
            parsed = Comparison(preferences={c: CriterionPreference(winner=prefs[c],
                                                                    justification="j")
                                             for c in criteria})
            out.append(TeacherResult(ok=True, text=parsed.model_dump_json(), parsed=parsed,
                                     cached=True))
        return out


QUESTIONS = [{"id": i, "category": ("ML", "DL", "NLP", "CV")[i % 4], "title": f"T{i}",
              "question": f"Q{i}?", "answer": f"reference answer {i}"} for i in range(8)]


def test_order_disagreement_is_a_tie_and_consistency_counts_it():
    judge = ScriptedJudge()
    rows = judge_model(judge, "sft", QUESTIONS, [f"model {i}" for i in range(8)], CRITERIA,
                       baseline="base", baseline_answers=[f"base {i}" for i in range(8)])
    pairs = [r for r in rows if r["kind"] == "pair"]
    assert len(pairs) == 8 and all(len(r["calls"]) == 2 for r in pairs)
    assert [c["order"] for c in pairs[0]["calls"]] == ["model_first", "baseline_first"]
    assert all(c["raw"] and c["parsed"] and c["cached"] for r in pairs for c in r["calls"])
    shares = win_shares(rows, CRITERIA, BOOT)["criteria"]
    assert shares["accuracy"]["ties"] == 8 and shares["accuracy"]["consistency"] == 0.0
    assert shares["accuracy"]["share"]["value"] == 0.5  # position bias cancels out
    assert shares["completeness"]["share"]["value"] == 1.0
    assert shares["coherence"]["share"]["value"] == 0.0
    assert shares["relevance"]["share"]["value"] == 0.5
    assert shares["relevance"]["consistency"] == 1.0  # a tie in both orders is agreement
    scores = [r for r in rows if r["kind"] == "score"]
    assert [r["ok"] for r in scores].count(False) == 1 and scores[2]["scores"] is None
    assert scores[2]["call"]["raw"] == "{oops"  # the failed reply is kept


def test_baseline_is_only_scored():
    rows = judge_model(ScriptedJudge(), "base", QUESTIONS, [f"base {i}" for i in range(8)],
                       CRITERIA, baseline="base", baseline_answers=[f"base {i}" for i in range(8)])
    assert {r["kind"] for r in rows} == {"score"}


# ------------------------------------------------------------------------------ text metrics
def test_rouge_l_matches_rouge_score_and_a_hand_computation():
    reference, answer = "The cat sat on the mat.", "the cat lay on the mat"
    # LCS "the cat on the mat" = 5 of 6 tokens on both sides -> P = R = F = 5/6
    assert rouge_l(answer, reference).f1 == pytest.approx(5 / 6)
    expected = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True).score(reference, answer)
    assert rouge_l(answer, reference).f1 == pytest.approx(expected["rougeL"].fmeasure)
    assert rouge_l("models overfit", "model overfits").f1 == pytest.approx(1.0)  # stemmer
    assert rouge_l("", reference).f1 == 0.0


# -------------------------------------------------------------------------------- perplexity
@pytest.fixture(scope="module")
def student(tiny_model_dir):
    return load_student(tiny_model_dir)


def manual_answer_nll(model, tokenizer, row: dict) -> tuple[float, int]:
    """Sum of -log p(token) over the accepted answer (and its end token) after the prompt,
    one position at a time."""
    prompt = tokenizer.apply_chat_template(student_answer_messages(row), tokenize=False,
                                           add_generation_prompt=True)
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    answer_ids = tokenizer.encode(row["answer"], add_special_tokens=False) + [tokenizer.eos_token_id]
    ids = torch.tensor([prompt_ids + answer_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    total = 0.0
    for t in range(len(prompt_ids), ids.shape[1]):
        total -= torch.log_softmax(logits[t - 1], dim=-1)[ids[0, t]].item()
    return total, len(answer_ids)


def test_reference_perplexity_equals_a_manual_per_token_computation(student):
    model, tokenizer = student
    rows = [{**q, "answer": text} for q, text in zip(QUESTIONS[:3], [
        "Use dropout and weight decay.", "Gradient descent lowers the loss step by step.",
        "Tokenization splits text into subword units before the embedding lookup."])]
    got = reference_nll(model, tokenizer, rows, max_seq_len=512, batch_size=2, progress=False)
    one_by_one = reference_nll(model, tokenizer, rows, max_seq_len=512, batch_size=1,
                               progress=False)
    for row, g, single in zip(rows, got, one_by_one):
        nll, n = manual_answer_nll(model, tokenizer, row)
        assert g.tokens == n and not g.truncated
        assert g.nll == pytest.approx(nll, rel=1e-4)
        assert g.ppl == pytest.approx(math.exp(nll / n), rel=1e-4)
        assert single.nll == pytest.approx(g.nll, rel=1e-5)  # padding changes nothing


def test_truncated_and_unscored_reference_answers_are_counted(student):
    model, tokenizer = student
    row = {**QUESTIONS[0], "answer": "word " * 200}
    prompt = tokenizer.apply_chat_template(student_answer_messages(row), tokenize=False,
                                           add_generation_prompt=True)
    prompt_len = len(tokenizer.encode(prompt, add_special_tokens=False))
    [cut] = reference_nll(model, tokenizer, [row], max_seq_len=prompt_len + 5, batch_size=2,
                          progress=False)
    assert cut.truncated and 0 < cut.tokens <= 5
    [gone] = reference_nll(model, tokenizer, [row], max_seq_len=prompt_len - 1, batch_size=2,
                           progress=False)
    assert gone.tokens == 0 and gone.ppl is None and gone.truncated
    rows = answer_rows([row, row], [Generation("a b", 2, 0.1, True), Generation("c", 1, 0.1)],
                       [cut, gone])
    summary = objective_metrics(rows)["overall"]
    assert summary["ref_truncated"] == 2 and summary["ref_unscored"] == 1
    assert summary["ppl"] == pytest.approx(cut.ppl)  # the unscored row does not enter it
    assert summary["stop_rate"] == 0.5 and summary["length"] == 1.5


def test_generation_details_count_tokens_and_stops(student):
    model, tokenizer = student
    convs = [student_answer_messages(q) for q in QUESTIONS[:4]]
    plain = generate(model, tokenizer, convs, max_new_tokens=6, batch_size=2, progress=False)
    detailed = generate(model, tokenizer, convs, max_new_tokens=6, batch_size=2, progress=False,
                        return_stats=True)
    assert [g.text for g in detailed] == plain
    assert all(1 <= g.tokens <= 6 and (g.stopped or g.tokens == 6) for g in detailed)
    eos = 2
    assert [_generated_length(r, {eos}) for r in ([5, 6, eos, 0, 0], [5, 6, 7, 8, 9], [eos, 0])] \
        == [3, 5, 1]


# ------------------------------------------------------------------------------------ report
def fixture_results(models=("base", "sft", "refine")):
    judge = ScriptedJudge()
    answers, judgments = {}, {}
    for k, m in enumerate(models):
        texts = [f"{'base' if m == 'base' else 'model'} {i}" for i in range(8)]
        answers[m] = [{"id": q["id"], "category": q["category"], "answer": t, "tokens": 10 + k,
                       "stopped": i % 2 == 0, "rouge_l": 0.1 * k, "ref_nll": 20.0 - k,
                       "ref_tokens": 10, "ref_truncated": False}
                      for i, (q, t) in enumerate(zip(QUESTIONS, texts))]
        judgments[m] = judge_model(judge, m, QUESTIONS, texts, CRITERIA, baseline="base",
                                   baseline_answers=[f"base {i}" for i in range(8)])
    return summarize(list(models), "base", answers, judgments, CRITERIA, BOOT)


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def test_report_tables_on_a_fixture(tmp_path):
    results = fixture_results()
    table = meteor_table(results, "base", CRITERIA)
    assert list(table["model"]) == ["sft w/o journey (base)", "sft",
                                    "refine w/o journey (base)", "refine"]
    for k in (0, 2):  # each row pair sums to 100 % per criterion
        for c in CRITERIA:
            w_o, w = (float(re.match(r"([\d.]+) %", table.iloc[k + j][c]).group(1))
                      for j in (0, 1))
            assert w_o + w == pytest.approx(100.0)
    assert table.iloc[1]["completeness"].startswith("100.0 %")
    assert table.iloc[1]["judge score"] == "8.00" and table.iloc[0]["judge score"] == "5.00"

    journey = journey_table(results, "base")
    assert list(journey["model"]) == ["base", "sft", "refine"]
    assert journey.iloc[0]["win share vs base [95 % CI]"] == "—"
    assert journey.iloc[1]["judge failures"] == "1"  # the failed score of question 2
    assert journey.iloc[1]["ref. PPL ↓"] == f"{math.exp(19 / 10):.2f}"

    flat = flatten(eval_metrics(results, CRITERIA))
    for key in ("sft.win_share.accuracy", "sft.win_share.overall", "refine.rouge_l", "base.ppl",
                "sft.win_share_low", "sft.score_diff", "sft.consistency", "sft.by_category.ML.ppl"):
        assert key in flat, key
    assert not any(k.startswith("base.win_share") for k in flat)
    assert all(isinstance(v, (int, float)) for v in flat.values())
    assert flat["sft.judge_score"] == 8.0  # the failed score is excluded, not a zero

    text = render_report(results, baseline="base", criteria=CRITERIA, judge_name="offline:x",
                         bootstrap=BOOT, max_new_tokens=64)
    assert "| sft w/o journey (base)" in text and "not whether a differently worded" in text
    assert "1 scores failed" in text and "excluded" in text
    plot_journey(results, tmp_path / "j.png", baseline="base")
    assert (tmp_path / "j.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_summarize_refuses_answers_to_other_questions():
    judge = ScriptedJudge()
    answers = {"base": [{"id": 0, "category": "ML", "answer": "x", "tokens": 1, "stopped": True,
                         "rouge_l": 0.0, "ref_nll": 1.0, "ref_tokens": 1, "ref_truncated": False}]}
    answers["sft"] = [{**answers["base"][0], "id": 99}]
    judgments = {m: judge_model(judge, m, QUESTIONS[:1], ["x"], CRITERIA) for m in answers}
    with pytest.raises(ValueError, match="re-run evaluate@sft"):
        summarize(["base", "sft"], "base", answers, judgments, CRITERIA, BOOT)


# --------------------------------------------------------------------------------- questions
def test_unusable_test_rows_are_skipped_by_reason_and_answers_join_by_id():
    rows = [QUESTIONS[0], {**QUESTIONS[1], "answer": ""}, {"title": "t", "question": "q"},
            QUESTIONS[0], {**QUESTIONS[2], "question": None}, QUESTIONS[3]]
    kept, skipped = usable_questions(rows)
    assert [q["id"] for q in kept] == [0, 3]
    assert skipped == {"no_reference": 1, "no_id": 1, "duplicate_id": 1, "no_question": 1}
    assert answers_for(kept, [{"id": 3, "answer": "b"}, {"id": 0, "answer": "a"}], "m") == ["a", "b"]
    with pytest.raises(ValueError, match="re-run evaluate@m"):
        answers_for(kept, [{"id": 0, "answer": "a"}], "m")



def test_a_limit_takes_usable_questions_in_turn_from_each_category():
    rows = [{"id": i, "category": c, "title": "t", "question": "q", "answer": "a"}
            for i, c in enumerate(["ML"] * 4 + ["DL"] * 4 + ["CV"] * 4)]
    rows[0]["answer"] = ""  # unusable: never counts towards the limit
    kept, skipped = usable_questions(rows, limit=6)
    assert [q["id"] for q in kept] == [1, 2, 4, 5, 8, 9]
    assert skipped == {"no_reference": 1}
    assert usable_questions(rows, limit=None)[0] == rows[1:]


# -------------------------------------------------------------------------------------- params
def test_evaluate_params_are_validated():
    assert tuple(EvaluateParams().criteria) == CRITERIA  # the judge's criteria by default
    assert EvaluateParams().models == ["base", "sft", "refine", "self_train", "merged"]
    with pytest.raises(ValueError, match="baseline"):
        EvaluateParams(models=["sft"], baseline="base")
    with pytest.raises(ValueError, match="duplicate"):
        EvaluateParams(models=["base", "base"])
    with pytest.raises(ValueError, match="directory names"):
        EvaluateParams(models=["base", "../x"])
    with pytest.raises(ValueError, match="criteria"):
        EvaluateParams(criteria=["Accuracy"])


# ------------------------------------------------------------- judge on a loopback server
def _between(text: str, start: str, end: str) -> str:
    return text.split(start, 1)[1].split(end, 1)[0]


def loopback_responder(body: dict) -> str:
    """Valid scores / comparisons (the answer saying GOOD wins), except for question Q1, whose
    every reply, re-asks included, is broken JSON."""
    prompt = "\n".join(str(m["content"]) for m in body["messages"] if m["role"] == "user")
    if "Title: Q1 title" in prompt:
        return '{"scores": {"accuracy": {"score": 11'
    names = [c.strip() for c in re.search(r"^Criteria: (.+)$", prompt, re.M).group(1).split(",")]
    if "Answer A:" in prompt:
        a = _between(prompt, "Answer A:\n", "\n\nAnswer B:")
        winner = "A" if "GOOD" in a else "B"
        return json.dumps({"preferences": {c: {"winner": winner, "justification": "j"}
                                           for c in names}})
    return json.dumps({"scores": {c: {"score": 7, "justification": "j"} for c in names}})


def test_judge_on_a_loopback_server_reasks_malformed_json_and_counts_the_failure(tmp_path,
                                                                                 monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    questions = make_questions(6)
    model_answers = [f"GOOD answer {i}" for i in range(6)]
    base_answers = [f"weak answer {i}" for i in range(6)]
    with FakeOpenAIServer(responder=loopback_responder) as server:
        params = TeacherParams(backend="openai", model="fake-judge", base_url=server.base_url,
                               cache_dir=str(tmp_path / "cache"), json_retries=2)

        def run():
            judge = ChatTeacher(params, OpenAIBackend(params, section="judge"), progress=False)
            rows = judge_model(judge, "sft", questions, model_answers, CRITERIA,
                               baseline="base", baseline_answers=base_answers)
            judge.close()
            return rows, judge

        rows, judge = run()
        q1 = [b for b in server.log.bodies if "Title: Q1 title" in json.dumps(b)]
        assert len(q1) == 3 * 3  # score + two orders, each asked once and re-asked twice
        assert any("could not be used" in json.dumps(b) for b in q1)  # the re-ask says why
        shares = win_shares(rows, CRITERIA, BOOT)
        scores = mean_scores(rows, CRITERIA)
        assert shares["failed"] == 1 and shares["compared"] == 5
        assert shares["overall"]["share"]["value"] == 1.0  # GOOD wins in both orders
        assert scores["failed"] == 1 and scores["overall"] == 7.0
        failed = [r for r in rows if not r["ok"]]
        assert {r["kind"] for r in failed} == {"score", "pair"}
        assert all("invalid JSON" in (r["error"] or "") for r in failed)
        assert judge.stats.failures == 3  # the score call and both orders of the pair

        calls_before = server.calls
        again, _ = run()  # through the response cache: no new request
        assert server.calls == calls_before
        assert all(c["cached"] for r in again for c in ([r["call"]] if r["kind"] == "score"
                                                        else r["calls"]))
        assert [r["ok"] for r in again] == [r["ok"] for r in rows]


# ------------------------------------------------------------------ stage scripts, tiny params
def load_stage(name: str):
    spec = importlib.util.spec_from_file_location(f"stage_{name}", ROOT / "stages" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_stage_scripts_on_tiny_params(tiny_model_dir, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from meteor.training.config import LoraParams
    from meteor.training.lora import make_trainable, save_trained

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("METEOR_CACHE_DIR", str(tmp_path / "cache"))
    shutil.copytree(tiny_model_dir, "models/base")
    sft, tokenizer = load_student("models/base")
    sft = make_trainable(AutoModelForCausalLM.from_pretrained("models/base"),
                         LoraParams(r=2, alpha=4, dropout=0.0), seed=0)
    with torch.no_grad():  # a non-zero adapter, so sft really differs from base
        for name, p in sft.named_parameters():
            if "lora_B" in name:
                p.fill_(0.05)
    save_trained(sft, tokenizer, "models/sft")
    Path("data/scraped").mkdir(parents=True)
    rows = [{**q, "answer": f"Use dropout and weight decay to stop overfitting {i}."}
            for i, q in enumerate(QUESTIONS[:5])]
    Path("data/scraped/test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    params = {"evaluate": {"models": ["base", "sft"], "max_new_tokens": 6, "batch_size": 2,
                           "bootstrap": {"samples": 200}},
              "judge": {"cache_dir": str(tmp_path / "cache")}}
    Path("params.yaml").write_text(yaml.safe_dump(params))

    evaluate, judge, report = load_stage("evaluate"), load_stage("judge"), load_stage("report")
    for m in ("base", "sft"):
        assert evaluate.main([m]) == 0
    first = Path("eval/answers/sft.jsonl").read_bytes()
    assert evaluate.main(["sft"]) == 0
    assert Path("eval/answers/sft.jsonl").read_bytes() == first  # deterministic
    for m in ("base", "sft"):
        assert judge.main([m]) == 0
    assert report.main() == 0

    answers = [json.loads(line) for line in Path("eval/answers/sft.jsonl").read_text().splitlines()]
    assert [a["id"] for a in answers] == [r["id"] for r in rows]
    assert all(set(a) >= {"id", "category", "answer", "tokens", "stopped"} for a in answers)
    assert all(1 <= a["tokens"] <= 6 for a in answers)
    judgments = Path("eval/judgments.jsonl").read_text().splitlines()
    assert len(judgments) == 5 + 5 + 5  # base scores, sft scores, sft pairs
    metrics = flatten(json.loads(Path("metrics/eval.json").read_text()))
    assert {"base.ppl", "sft.ppl", "sft.win_share.accuracy", "sft.rouge_l"} <= set(metrics)
    assert metrics["base.ppl"] != metrics["sft.ppl"]
    text = Path("eval/report.md").read_text()
    assert "METEOR-format table" in text and "| sft w/o journey (base)" in text
    assert Path("eval/journey.png").read_bytes()[:4] == b"\x89PNG"
    points = json.loads(Path("eval/journey.json").read_text())
    assert [p["model"] for p in points] == ["base", "sft"]
    assert len({tuple(sorted(p)) for p in points}) == 1  # same keys everywhere (dvc plots)
    shares = json.loads(Path("eval/win_share.json").read_text())
    assert [p["model"] for p in shares] == ["sft"] and 0 <= shares[0]["win_share"] <= 1
    stage_metrics = json.loads(Path("metrics/evaluate/sft.json").read_text())
    assert stage_metrics["questions"] == 5 and stage_metrics["device"] in ("cpu", "cuda")

    with pytest.raises(SystemExit):  # not in evaluate.models: refused, naming the key
        evaluate.main(["refine"])


def test_for_inference_merges_a_lora_adapter_into_the_same_function(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from meteor.evaluation.answers import for_inference
    from meteor.training.config import LoraParams
    from meteor.training.lora import make_trainable

    model = make_trainable(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraParams(r=2, alpha=4, dropout=0.0), seed=0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.fill_(0.05)
    ids = torch.tensor([[1, 7, 9, 12, 30, 2]])
    with torch.no_grad():
        expected = model.eval()(input_ids=ids).logits
        merged = for_inference(model, "cpu")
        got = merged(input_ids=ids).logits
        plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir)(input_ids=ids).logits
    assert not hasattr(merged, "merge_and_unload") and not merged.training
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(plain, expected, atol=1e-3)  # the adapter does change the model
