"""The distill stage: offline end to end, against a faulty OpenAI-compatible server, and budgets."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest
import yaml
from fake_openai_server import FakeOpenAIServer, Faults, default_responder

from meteor.criteria import CRITERIA
from meteor.distill import distill_inputs, distill_rows, guideline_ablation
from meteor.teacher.config import TeacherParams
from meteor.teacher import make_teacher

ROOT = Path(__file__).resolve().parents[1]

QUESTIONS = [
    {"id": 11, "category": "DL", "title": "Why is my PyTorch loss NaN after a few epochs?",
     "question": "Training runs fine, then the loss becomes NaN at epoch 3.",
     "answer": "The usual cause is exploding gradients.\n\nLower the learning rate and clip the "
               "gradient norm with `torch.nn.utils.clip_grad_norm_`.\n\nCheck the inputs for "
               "NaN values with `torch.isnan`."},
    {"id": 12, "category": "ML", "title": "What does cross-validation estimate?",
     "question": "Is the `cross_val_score` mean the test error of my final model?",
     "answer": "It estimates the generalisation error of the training procedure, not of one "
               "fitted model.\n\nPitfall: tuning hyperparameters on the same folds makes the "
               "estimate optimistic; use nested cross-validation."},
    {"id": 13, "category": "CV", "title": "Why are my OpenCV images blue?",
     "question": "`cv2.imread` then `plt.imshow` shows blue faces.",
     "answer": "OpenCV loads images in BGR order; matplotlib expects RGB. Convert with "
               "`cv2.cvtColor(img, cv2.COLOR_BGR2RGB)`."},
    {"id": 14, "category": "NLP", "title": "Why does BPE split rare words?",
     "question": "The tokenizer splits 'unhappiness' into three pieces.",
     "answer": "Byte-pair encoding keeps frequent subword units; rare words are split into "
               "known pieces so there is no unknown token."},
]
GUIDELINES = {
    11: ("1. Scope: why the loss becomes NaN\n2. Definitions: exploding gradients\n"
         "3. Steps: learning rate and gradient clipping\n4. Pitfalls: NaN inputs", None),
    12: ("the the the the the the the the", "repetitive"),
    13: ("1. Scope: colour order\n2. Steps: convert BGR to RGB", None),
    14: ("", "empty"),
}


def guideline_rows(questions=QUESTIONS) -> list[dict]:
    return [{"id": q["id"], "category": q["category"], "title": q["title"],
             "question": q["question"], "guideline": GUIDELINES[q["id"]][0],
             "degenerate": GUIDELINES[q["id"]][1]} for q in questions]


def write_workdir(path: Path, params: dict) -> None:
    (path / "data" / "scraped").mkdir(parents=True, exist_ok=True)
    for name, rows in (("data/scraped/train.jsonl", QUESTIONS),
                       ("data/guidelines.jsonl", guideline_rows())):
        (path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "params.yaml").write_text(yaml.safe_dump(params))


def run_stage(path: Path, monkeypatch) -> tuple[int, list[dict], dict]:
    monkeypatch.chdir(path)
    rc = runpy.run_path(str(ROOT / "stages" / "distill.py"))["main"]()
    rows = [json.loads(line) for line in (path / "data/distilled.jsonl").read_text().splitlines()]
    return rc, rows, json.loads((path / "metrics/distill.json").read_text())


@pytest.fixture(autouse=True)
def _no_env_endpoint(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)


def test_inputs_join_by_id_and_drop_degenerate_guidelines():
    inputs = distill_inputs(guideline_rows(), list(reversed(QUESTIONS)), limit=3)
    assert [i.question["id"] for i in inputs] == [11, 12, 13]  # guideline order, limit applied
    assert inputs[0].question["answer"] == QUESTIONS[0]["answer"]  # joined to the train record
    assert [i.guideline is None for i in inputs] == [False, True, False]
    assert inputs[1].degenerate == "repetitive"
    # An empty guideline that was not flagged is treated as degenerate too.
    row = {**guideline_rows()[0], "guideline": "  "}
    assert distill_inputs([row], QUESTIONS)[0].degenerate == "empty"

    stranger = {**guideline_rows()[0], "id": 999}
    with pytest.raises(ValueError, match=r"\[999\].*re-run the guideline stage"):
        distill_inputs([stranger], QUESTIONS)
    with pytest.raises(ValueError, match="duplicate question id 11"):
        distill_inputs(guideline_rows(), QUESTIONS + QUESTIONS[:1])


def test_offline_stage_end_to_end(tmp_path, monkeypatch):
    write_workdir(tmp_path, {"distill": {"ablation_size": 3}})
    rc, rows, metrics = run_stage(tmp_path, monkeypatch)
    assert rc == 0
    assert [r["id"] for r in rows] == [11, 12, 13, 14]
    assert all(r["ok"] and r["error"] is None for r in rows)
    assert {"id", "category", "title", "question", "guideline", "answer", "ok", "error", "teacher",
            "usage"} <= set(rows[0])
    assert rows[0]["teacher"] == "offline:offline-reference"
    assert rows[0]["answer"].startswith("**Approach.**")  # shaped by its guideline
    assert rows[1]["guideline"] is None and rows[1]["guideline_degenerate"] == "repetitive"
    assert rows[1]["answer"] == QUESTIONS[1]["answer"]  # no usable guideline: the reference as is
    assert rows[0]["usage"]["completion_tokens"] == len(rows[0]["answer"].split())

    assert metrics["rows"] == 4 and metrics["failed"] == 0 and not metrics["budget_stopped"]
    quality = metrics["quality"]
    # Only ids 11 and 13 have a usable guideline: 12 and 14 are passed over, not compared.
    assert quality["n"] == quality["sample"] == 2 and quality["skipped_degenerate"] == 2
    for key in ("with_guideline", "without_guideline"):
        assert 1 <= quality[key] <= 10
        assert set(quality["per_criterion"][key]) == set(CRITERIA)
    assert quality["gain"] == pytest.approx(quality["with_guideline"] - quality["without_guideline"])
    # 4 answers + 2 fresh answers without guideline; the judge scored 2 pairs.
    assert metrics["teacher"]["calls"] == 6 and metrics["judge"]["calls"] == 4
    assert {"cache_hits", "failures", "tokens", "cost_usd"} <= set(metrics["teacher"])


def openai_params(server: FakeOpenAIServer, tmp_path: Path, **overrides) -> TeacherParams:
    fields = dict(backend="openai", model="fake-model", base_url=server.base_url,
                  cache_dir=str(tmp_path / "cache"), max_concurrency=4, max_retries=0)
    return TeacherParams(**{**fields, **overrides})


def empty_reply_for_blue_images(body: dict) -> str:
    """The default replies, except an empty answer to question 13 (a call that cannot succeed)."""
    reply = default_responder(body)
    return "" if reply == f"Answer to: {QUESTIONS[2]['title']}" else reply


def test_faulty_server_every_row_present_or_failed_with_usage(tmp_path):
    inputs = distill_inputs(guideline_rows(), QUESTIONS)
    faults = Faults(rate_429=0.3, retry_after="0", seed=1)  # retried: these calls still succeed
    with FakeOpenAIServer(faults, responder=empty_reply_for_blue_images) as server:
        teacher = make_teacher(openai_params(server, tmp_path, max_retries=8))
        judge = make_teacher(openai_params(server, tmp_path, max_retries=8), section="judge")
        rows = distill_rows(teacher, inputs)
        ablation = guideline_ablation(teacher, judge, inputs, rows, size=4)
        teacher.close()
        judge.close()
        bodies = server.log.bodies

    assert server.log.outcomes["429"] > 0  # the retries were exercised
    assert [r["id"] for r in rows] == [11, 12, 13, 14]
    assert [r["ok"] for r in rows] == [True, True, False, True]
    for r in rows[:2] + rows[3:]:
        assert r["answer"] == f"Answer to: {r['title']}"  # each reply landed on its own row
        assert r["usage"]["prompt_tokens"] > 0 and r["usage"]["completion_tokens"] > 0
        assert r["teacher"] == "openai:fake-model" and r["error"] is None
    assert rows[2]["answer"] is None and rows[2]["error"].startswith("empty reply")
    # The reference answer is never sent to the teacher or the judge.
    assert not any(q["answer"] in json.dumps(b) for q in QUESTIONS for b in bodies)
    # Ids 11 and 13 have a usable guideline; 13 gets no answer, so only 11 is a pair (scored 7
    # by the fake judge).
    quality = ablation.quality
    assert quality["sample"] == 2 and quality["skipped_degenerate"] == 2
    assert quality["n"] == 1 and quality["with_guideline"] == quality["without_guideline"] == 7.0
    assert ablation.failures == {"teacher: empty reply (finish_reason=stop)": 1}
    assert teacher.stats.failures == 2 and judge.stats.failures == 0


def test_budget_stop_exits_non_zero_then_resumes_from_the_cache(tmp_path, monkeypatch):
    with FakeOpenAIServer() as server:
        expensive = {"fake-model": {"input": 1e6, "output": 1e6}}  # every call costs > 1 USD
        teacher = {"backend": "openai", "model": "fake-model", "base_url": server.base_url,
                   "cache_dir": str(tmp_path / "cache"), "max_concurrency": 1,
                   "prices": expensive, "budget_usd": 1.0}
        offline_judge = {"backend": "offline", "model": "offline-reference"}  # else it inherits
        write_workdir(tmp_path, {"teacher": teacher, "judge": offline_judge,
                                 "distill": {"ablation_size": 2}})
        rc, rows, metrics = run_stage(tmp_path, monkeypatch)
        assert rc == 3  # DVC must not take a budget-stopped run as complete
        assert [r["id"] for r in rows] == [11, 12, 13, 14]
        assert [r["ok"] for r in rows] == [True, False, False, False]  # one call, then the stop
        assert {r["error"] for r in rows[1:]} == {"budget"}
        assert metrics["budget_stopped"] and metrics["failed_by_reason"] == {"budget": 3}
        assert metrics["teacher"]["calls"] == 1 and server.calls == 1

        teacher["budget_usd"] = None
        write_workdir(tmp_path, {"teacher": teacher, "judge": offline_judge,
                                 "distill": {"ablation_size": 2}})
        rc, rows, metrics = run_stage(tmp_path, monkeypatch)
        assert rc == 0 and all(r["ok"] for r in rows)
        assert metrics["teacher"]["cache_hits"] >= 1  # the call paid for before is not repeated
        # 3 missing answers + 2 answers without guideline (ids 11 and 13: 12 had none to drop).
        assert server.calls == 1 + 3 + 2


def _inputs(order: list[int]) -> list:
    by_id = {q["id"]: q for q in QUESTIONS}
    return distill_inputs(guideline_rows([by_id[i] for i in order]), QUESTIONS)


def test_ablation_compares_only_questions_whose_guideline_was_used():
    teacher = make_teacher(TeacherParams())
    inputs = _inputs([12, 14, 11, 13])  # the two degenerate guidelines come first
    rows = distill_rows(teacher, inputs)
    ablation = guideline_ablation(teacher, make_teacher(TeacherParams()), inputs, rows, size=1)
    quality = ablation.quality
    # The sample passes over 12 and 14 and takes 11: its two answers really differ.
    assert quality["sample"] == quality["n"] == 1 and quality["skipped_degenerate"] == 2
    assert rows[2]["answer"] != teacher.answer([QUESTIONS[0]], [None])[0].text
    assert quality["with_guideline"] != quality["without_guideline"]  # the offline judge tells apart
    assert quality["gain"] == pytest.approx(quality["with_guideline"] - quality["without_guideline"])


def test_ablation_without_any_usable_guideline_reports_nothing_not_a_tie():
    teacher, judge = make_teacher(TeacherParams()), make_teacher(TeacherParams())
    inputs = _inputs([12, 14])  # both degenerate
    rows = distill_rows(teacher, inputs)
    calls = teacher.stats.calls
    quality = guideline_ablation(teacher, judge, inputs, rows, size=20).quality
    assert quality["n"] == quality["sample"] == 0 and quality["skipped_degenerate"] == 2
    assert quality["with_guideline"] is quality["without_guideline"] is quality["gain"] is None
    assert set(quality["per_criterion"]["with_guideline"].values()) == {None}
    assert teacher.stats.calls == calls and judge.stats.calls == 0  # nothing asked


def test_budget_is_cumulative_across_reruns_until_the_stage_completes(tmp_path, monkeypatch):
    from meteor.teacher.cache import ResponseCache

    with FakeOpenAIServer() as server:
        expensive = {"fake-model": {"input": 1e6, "output": 1e6}}  # every call costs > 1 USD
        teacher = {"backend": "openai", "model": "fake-model", "base_url": server.base_url,
                   "cache_dir": str(tmp_path / "cache"), "max_concurrency": 1,
                   "prices": expensive, "budget_usd": 1.0}
        write_workdir(tmp_path, {"teacher": teacher, "distill": {"ablation_size": 0}})
        rc, _, first = run_stage(tmp_path, monkeypatch)
        assert rc == 3 and server.calls == 1
        # The same budget again: it is spent already, so no call is made (a per-run budget
        # would pay for one more).
        rc, rows, metrics = run_stage(tmp_path, monkeypatch)
        assert rc == 3 and server.calls == 1
        assert [r["ok"] for r in rows] == [True, False, False, False]
        spend = metrics["teacher"]
        assert spend["budget_counts"].startswith("cumulative") and spend["cost_usd"] == 0
        assert spend["spent_before_run_usd"] == first["teacher"]["cost_usd"] > 1.0
        assert spend["spent_total_usd"] == spend["spent_before_run_usd"]
        # Raising it resumes; completing clears the ledger, so the next run has the full budget.
        teacher["budget_usd"] = 1e9
        write_workdir(tmp_path, {"teacher": teacher, "distill": {"ablation_size": 0}})
        rc, rows, metrics = run_stage(tmp_path, monkeypatch)
        assert rc == 0 and all(r["ok"] for r in rows) and server.calls == 4
        assert metrics["complete"] and metrics["teacher"]["spent_total_usd"] > first["teacher"]["cost_usd"]
        with ResponseCache(tmp_path / "cache") as cache:
            assert cache.spent("distill/teacher") == 0.0


def test_too_many_failed_calls_fail_the_stage_and_a_rerun_takes_the_rest_from_the_cache(
        tmp_path, monkeypatch):
    with FakeOpenAIServer(Faults(rate_500=0.5, seed=3)) as server:
        teacher = {"backend": "openai", "model": "fake-model", "base_url": server.base_url,
                   "cache_dir": str(tmp_path / "cache"), "max_concurrency": 2, "max_retries": 0}
        write_workdir(tmp_path, {"teacher": teacher, "distill": {"ablation_size": 0}})
        rc, rows, metrics = run_stage(tmp_path, monkeypatch)
        failed = [r["id"] for r in rows if not r["ok"]]
        assert 0 < len(failed) < len(rows), "the seed must fail some calls, not all"
        assert rc == 3 and not metrics["complete"]  # outputs and metrics written, then non-zero
        assert metrics["failed_fraction"] == len(failed) / 4 > metrics["max_failed_fraction"]
        assert server.log.outcomes["500"] == len(failed)
        finished = server.log.ok_bodies.copy()

        server.faults = Faults()  # the endpoint recovers
        calls_before = server.calls
        rc, rows, metrics = run_stage(tmp_path, monkeypatch)
        assert rc == 0 and metrics["complete"] and all(r["ok"] for r in rows)
        assert server.calls - calls_before == len(failed)  # only the failed items are asked again
        assert all(server.log.ok_bodies[b] == 1 for b in finished)
        assert metrics["teacher"]["cache_hits"] == 4 - len(failed)


def test_max_failed_fraction_tolerates_what_it_says(tmp_path, monkeypatch):
    with FakeOpenAIServer(responder=empty_reply_for_blue_images) as server:  # 1 of 4 rows fails
        teacher = {"backend": "openai", "model": "fake-model", "base_url": server.base_url,
                   "cache_dir": str(tmp_path / "cache"), "max_retries": 0}
        for allowed, want_rc in ((0.25, 0), (0.2, 3)):
            write_workdir(tmp_path, {"teacher": teacher, "distill": {
                "ablation_size": 0, "max_failed_fraction": allowed}})
            rc, _, metrics = run_stage(tmp_path, monkeypatch)
            assert (rc, metrics["failed_fraction"]) == (want_rc, 0.25)
