"""The openai backend + ChatTeacher against a fault-injecting OpenAI-compatible server on loopback.

Waits between retries are recorded by an injected ``sleep`` instead of slept, so the tests are
fast and can check exactly what the backoff asked for.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from fake_openai_server import FakeOpenAIServer, Faults, default_responder, make_questions

from meteor.all_params import load_params
from meteor.params import ParamsError
from meteor.teacher.config import TeacherParams
from meteor.teacher import make_teacher, prompts
from meteor.teacher.base import Scores, Verdict
from meteor.teacher.cache import ResponseCache
from meteor.teacher.chat import BUDGET, ChatTeacher
from meteor.teacher.openai_backend import OpenAIBackend, retry_after_s


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)


@pytest.fixture
def serve():
    """Start fake servers; all are stopped at the end of the test."""
    servers = []

    def start(faults: Faults | None = None, responder=default_responder) -> FakeOpenAIServer:
        server = FakeOpenAIServer(faults, responder).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def build(server, tmp_path, *, sleeps: list | None = None, **overrides) -> ChatTeacher:
    fields = dict(backend="openai", model="fake-model", base_url=server.base_url,
                  cache_dir=str(tmp_path / "cache"), max_concurrency=8)
    params = TeacherParams(**{**fields, **overrides})
    backend = OpenAIBackend(params, sleep=(sleeps if sleeps is not None else []).append)
    return ChatTeacher(params, backend, progress=False)


def expected_answers(questions):
    return [f"Answer to: {q['title']}" for q in questions]


# ------------------------------------------------------------------------------ basics + cache
def test_answers_in_input_order_with_usage_then_warm_cache_makes_no_calls(serve, tmp_path):
    server = serve(Faults(rate_500=0.3, seed=1))  # retried items finish out of order
    questions = make_questions(24)
    teacher = build(server, tmp_path, max_retries=10)
    results = teacher.answer(questions, ["1. define it\n2. give an example"] * 24)

    assert [r.text for r in results] == expected_answers(questions)
    assert all(r.ok and not r.cached and r.usage["completion_tokens"] > 0 for r in results)
    assert server.log.outcomes["500"] > 0
    assert teacher.stats.calls == server.calls and teacher.stats.failures == 0
    assert teacher.stats.prompt_tokens == sum(r.usage["prompt_tokens"] for r in results)
    # The reference answer never reaches the teacher; the guideline does.
    sent = json.dumps(server.log.bodies)
    assert "SECRET REFERENCE" not in sent and "give an example" in sent
    teacher.close()

    calls_before = server.calls
    warm = build(server, tmp_path)
    again = warm.answer(questions, ["1. define it\n2. give an example"] * 24)
    assert server.calls == calls_before
    assert [r.text for r in again] == expected_answers(questions)
    assert all(r.cached for r in again)
    assert warm.stats.calls == 0 and warm.stats.cache_hits == 24


def test_make_teacher_builds_the_openai_backend_and_reads_base_url_from_env(serve, tmp_path,
                                                                             monkeypatch):
    server = serve()
    monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
    teacher = make_teacher(TeacherParams(backend="openai", model="fake-model",
                                         cache_dir=str(tmp_path)), section="judge")
    assert teacher.name == "openai:fake-model"
    [result] = teacher.verdict(make_questions(1), ["an answer"])
    assert result.ok and result.parsed == Verdict(correct=True, feedback="Looks right.", hints=[])
    assert server.calls == 1
    # json_mode on by default: structured calls ask for a JSON object.
    assert server.log.bodies[0]["response_format"] == {"type": "json_object"}


# ----------------------------------------------------------------------------------- retries
def test_retry_after_is_honoured(serve, tmp_path):
    server = serve(Faults(rate_429=0.5, retry_after="0.25", seed=3))
    sleeps: list[float] = []
    teacher = build(server, tmp_path, sleeps=sleeps, max_retries=20)
    results = teacher.answer(make_questions(16), [None] * 16)
    assert all(r.ok for r in results)
    assert server.log.outcomes["429"] > 0
    assert sleeps == [0.25] * server.log.outcomes["429"]
    assert teacher.stats.calls == server.calls == 16 + server.log.outcomes["429"]


def test_retry_after_header_forms():
    assert retry_after_s({"retry-after-ms": "1500"}) == 1.5
    assert retry_after_s({"retry-after": "2"}) == 2.0
    date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    assert 25 < retry_after_s({"retry-after": date}) <= 31
    assert retry_after_s({"retry-after": "soon"}) is None
    assert retry_after_s({}) is None


def test_exponential_backoff_with_jitter_then_explicit_failure_not_cached(serve, tmp_path):
    server = serve(Faults(rate_500=1.0))
    sleeps: list[float] = []
    teacher = build(server, tmp_path, sleeps=sleeps, max_retries=4, max_concurrency=1)
    [result] = teacher.answer(make_questions(1), [None])

    assert not result.ok and result.error == "HTTP 500 after 5 attempts"
    assert server.calls == teacher.stats.calls == 5 and teacher.stats.failures == 1
    assert len(sleeps) == 4
    for k, wait in enumerate(sleeps):  # base 0.5 s, doubling, jittered into [cap/2, cap]
        cap = 0.5 * 2 ** k
        assert cap / 2 <= wait <= cap
    # A failure is not cached: the next run tries again.
    build(server, tmp_path, max_retries=0).answer(make_questions(1), [None])
    assert server.calls == 6


def test_timeouts_are_retried_then_reported(serve, tmp_path):
    server = serve(Faults(rate_slow=1.0, slow_s=1.0))
    teacher = build(server, tmp_path, timeout_s=0.2, max_retries=1)
    results = teacher.answer(make_questions(2), [None, None])
    assert [r.error for r in results] == ["timeout after 0.2s after 2 attempts"] * 2
    assert server.calls == 4


def test_non_retryable_status_fails_at_once(serve, tmp_path):
    server = serve()
    params = TeacherParams(backend="openai", model="fake-model", cache_dir=str(tmp_path),
                           base_url=server.base_url.replace("/v1", "/v2"), max_retries=5)
    teacher = ChatTeacher(params, OpenAIBackend(params), progress=False)
    [result] = teacher.answer(make_questions(1), [None])
    assert not result.ok and result.error.startswith("HTTP 404")
    assert server.calls == teacher.stats.calls == 1 and server.log.outcomes["404"] == 1


def test_fault_mix_every_item_present_or_explicitly_failed_no_duplicates(serve, tmp_path):
    # 30 % transport errors, 20 % broken content, a few malformed bodies: deterministic by seed.
    server = serve(Faults(rate_429=0.15, rate_500=0.15, rate_bad_content=0.2,
                          rate_malformed_body=0.05, seed=7))
    questions = make_questions(40)
    teacher = build(server, tmp_path, max_retries=3, json_retries=1)
    answers = teacher.answer(questions, [None] * 40)
    verdicts = teacher.verdict(questions, ["x"] * 40)
    scores = teacher.score(questions, ["x"] * 40, criteria=("accuracy", "coherence"))

    for results, schema in ((answers, None), (verdicts, Verdict), (scores, Scores)):
        assert len(results) == 40
        for r in results:
            assert r.ok != bool(r.error)  # ok, or failed with a reason
            if r.ok and schema is not None:
                assert isinstance(r.parsed, schema)
    for r, text in zip(answers, expected_answers(questions)):
        assert not r.ok or r.text == text
    assert all(list(r.parsed.scores) == ["accuracy", "coherence"] for r in scores if r.ok)
    everything = answers + verdicts + scores
    n_failed = sum(not r.ok for r in everything)
    assert 0 < n_failed < len(everything) // 4  # faults do bite, and most items survive them
    assert teacher.stats.failures == n_failed
    assert teacher.stats.calls == server.calls
    assert max(server.log.ok_bodies.values()) == 1  # no request is repeated once answered


# ---------------------------------------------------------------------------------- JSON re-ask
def _reask_responder(body: dict) -> str:
    last = body["messages"][-1]["content"]
    if "could not be used" in last:
        return '```json\n{"correct": false, "feedback": "Missing the bias term.", "hints": ["b"]}\n```'
    return "I think the answer is correct."


def test_invalid_json_is_reasked_with_the_error_then_recovers(serve, tmp_path):
    server = serve(responder=_reask_responder)
    teacher = build(server, tmp_path, json_retries=1)
    results = teacher.verdict(make_questions(3), ["w = x"] * 3)
    assert all(r.ok and r.parsed.correct is False and r.parsed.hints == ["b"] for r in results)
    assert server.calls == 6
    reask = [b for b in server.log.bodies if len(b["messages"]) == 4][0]["messages"]
    assert reask[2] == {"role": "assistant", "content": "I think the answer is correct."}
    assert "Invalid JSON" in reask[3]["content"]

    # The whole exchange is cached: replaying it makes no calls.
    assert all(r.ok and r.cached for r in build(server, tmp_path, json_retries=1).verdict(
        make_questions(3), ["w = x"] * 3))
    assert server.calls == 6


def test_invalid_json_without_reasks_left_is_an_explicit_failure(serve, tmp_path):
    server = serve(responder=_reask_responder)
    teacher = build(server, tmp_path, json_retries=0)
    [result] = teacher.verdict(make_questions(1), ["w = x"])
    assert not result.ok and result.error.startswith("invalid JSON after 1 replies")
    assert result.text == "I think the answer is correct."
    assert teacher.stats.failures == 1 and server.calls == 1


# -------------------------------------------------------------------------------------- budget
def test_budget_stops_cleanly_and_a_larger_budget_resumes_from_the_cache(serve, tmp_path):
    server = serve(responder=lambda body: "one two three four five")  # 5 completion tokens
    prices = {"fake-model": {"input": 0.0, "output": 2000.0}}  # 5 tokens -> 0.01 USD per call
    questions = make_questions(20)
    teacher = build(server, tmp_path, prices=prices, budget_usd=0.045, max_concurrency=1)
    results = teacher.answer(questions, [None] * 20)
    assert [r.ok for r in results] == [True] * 5 + [False] * 15
    assert {r.error for r in results[5:]} == {BUDGET}
    assert server.calls == 5 and teacher.stats.cost_usd == pytest.approx(0.05)

    resumed = build(server, tmp_path, prices=prices, budget_usd=1.0, max_concurrency=1)
    results = resumed.answer(questions, [None] * 20)
    assert all(r.ok for r in results)
    assert resumed.stats.cache_hits == 5 and resumed.stats.calls == 15 and server.calls == 20


# ----------------------------------------------------------------------------------- bad params
def test_missing_base_url_is_named_before_any_call():
    for section in ("teacher", "judge"):
        with pytest.raises(ParamsError, match=rf"{section}\.base_url"):
            make_teacher(TeacherParams(backend="openai", model="m"), section=section)


def test_bad_settings_are_named_before_any_call(serve, monkeypatch):
    server = serve()
    with pytest.raises(ParamsError, match=r"teacher\.base_url: 'ftp://x' is not an http"):
        make_teacher(TeacherParams(backend="openai", model="m", base_url="ftp://x"))
    with pytest.raises(ParamsError, match=r"judge\.model"):
        make_teacher(TeacherParams(backend="openai", base_url=server.base_url), section="judge")
    with pytest.raises(ParamsError, match="OPENAI_API_KEY"):
        make_teacher(TeacherParams(backend="openai", model="gpt-4o-mini",
                                   base_url="https://api.openai.com/v1"))
    with pytest.raises(ParamsError, match=r"teacher\.model: local model directory not found"):
        make_teacher(TeacherParams(backend="local", model="./no/such/model"))
    assert server.calls == 0


def test_load_params_names_bad_teacher_and_judge_values(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"teacher": {"max_concurrency": 0, "backend": "vllm"},
                                    "judge": {"timeout_s": -1}}))
    with pytest.raises(ParamsError) as err:
        load_params(path)
    for key in ("teacher.max_concurrency", "teacher.backend", "judge.timeout_s"):
        assert key in str(err.value)


def test_api_key_is_sent_but_never_stored_or_logged(serve, tmp_path, monkeypatch, caplog):
    secret = "sk-test-secret-0123456789"
    monkeypatch.setenv("OPENAI_API_KEY", secret)
    server = serve()
    caplog.set_level("DEBUG")
    build(server, tmp_path).answer(make_questions(3), [None] * 3)
    assert server.log.authorizations == {f"Bearer {secret}"}
    stored = b"".join(p.read_bytes() for p in (tmp_path / "cache").iterdir())
    assert b"Answer to: Q0 title" in stored  # the replies are there; the key is not
    assert secret.encode() not in stored
    assert secret not in caplog.text


def test_cache_key_follows_model_prompt_and_sampling_params(serve, tmp_path, monkeypatch):
    server = serve()
    questions = make_questions(3)

    def run(guideline=None, **overrides) -> int:
        before = server.calls
        build(server, tmp_path, **overrides).answer(questions, [guideline] * 3)
        return server.calls - before

    assert run() == 3
    assert run() == 0
    assert run(temperature=0.5) == 3
    assert run(max_tokens=99) == 3
    assert run(model="other-model") == 3
    assert run(guideline="1. say why") == 3  # a different prompt
    monkeypatch.setattr(prompts, "PROMPT_VERSION", "v-next")
    assert run() == 3
    assert run(temperature=0.5) == 3


# ------------------------------------------------------------------------------ kill and resume
WORKER = """
import sys
from fake_openai_server import make_questions
from meteor.teacher.config import TeacherParams
from meteor.teacher import make_teacher

base_url, cache_dir, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
teacher = make_teacher(TeacherParams(backend="openai", model="fake-model", base_url=base_url,
                                     cache_dir=cache_dir, max_concurrency=4))
teacher.answer(make_questions(n), [None] * n)
"""


def test_sigkill_mid_stage_then_rerun_repeats_no_finished_call(serve, tmp_path):
    server = serve(Faults(latency_s=0.2))  # 40 items take ~2 s: time to kill mid-way
    n = 40
    cache_dir = tmp_path / "cache"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    worker = subprocess.Popen([sys.executable, "-c", WORKER, server.base_url, str(cache_dir), str(n)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120  # bounded wait, not a timing assertion
    while server.log.outcomes["ok"] < 12 and worker.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    worker.send_signal(signal.SIGKILL)
    _, stderr = worker.communicate()
    assert worker.returncode == -signal.SIGKILL, stderr.decode()[-2000:]

    with ResponseCache(cache_dir) as cache:
        finished = {text.removeprefix("Answer to: ") for text in cache.texts()}
    assert 0 < len(finished) < n  # killed mid-way, with committed work

    calls_before = len(server.log.requested_titles)
    teacher = build(server, tmp_path, max_concurrency=4)
    results = teacher.answer(make_questions(n), [None] * n)
    asked_again = {t.removeprefix("Title: ") for t in server.log.requested_titles[calls_before:]}
    assert not asked_again & finished
    assert len(asked_again) == n - len(finished) == teacher.stats.calls
    assert [r.text for r in results] == expected_answers(make_questions(n))


def test_the_same_model_on_another_endpoint_is_another_cache_entry(serve, tmp_path):
    questions = make_questions(3)
    first, second = serve(), serve()
    build(first, tmp_path).answer(questions, [None] * 3)
    build(first, tmp_path).answer(questions, [None] * 3)
    assert first.calls == 3  # the second run came from the cache
    results = build(second, tmp_path).answer(questions, [None] * 3)
    assert second.calls == 3 and not any(r.cached for r in results)
