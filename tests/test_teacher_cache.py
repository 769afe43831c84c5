"""The teacher response cache: key, persistence, thread safety; and structured-reply parsing."""

from __future__ import annotations

import json
import sqlite3
import threading

import pytest

from meteor.teacher import prompts
from meteor.teacher.base import Scores, Verdict
from meteor.teacher.config import TeacherParams
from meteor.paths import ENV_VAR
from meteor.teacher.cache import ResponseCache, cache_key, teacher_cache_dir
from meteor.teacher.chat import (ChatBackend, ChatTeacher, Completion, check_criteria, extract_json,
                                 parse_structured)

MESSAGES = [{"role": "system", "content": "You are an expert."},
            {"role": "user", "content": "What is overfitting?"}]
BASE = dict(backend="openai", model="gpt-4o-mini", messages=MESSAGES, temperature=0.0,
            max_tokens=256, response_format=None, sample_index=0)


def test_key_is_stable_and_ignores_dict_order():
    reordered = [{"content": m["content"], "role": m["role"]} for m in MESSAGES]
    assert cache_key(**BASE) == cache_key(**BASE)
    assert cache_key(**BASE) == cache_key(**{**BASE, "messages": reordered})
    assert len(cache_key(**BASE)) == 64


@pytest.mark.parametrize("change", [
    {"backend": "local"},
    {"model": "gpt-4o"},
    {"messages": [MESSAGES[0], {"role": "user", "content": "What is underfitting?"}]},
    {"temperature": 0.7},
    {"max_tokens": 512},
    {"response_format": "json_object"},
    {"sample_index": 1},
    {"prompt_version": "v0"},
    {"endpoint": "http://127.0.0.1:9/v1"},
])
def test_key_changes_with_everything_that_determines_the_reply(change):
    assert cache_key(**{**BASE, **change}) != cache_key(**BASE)


def test_key_follows_the_current_prompt_version(monkeypatch):
    before = cache_key(**BASE)
    monkeypatch.setattr(prompts, "PROMPT_VERSION", "v-next")
    assert cache_key(**BASE) != before


def test_entries_persist_across_connections_in_wal_mode(tmp_path):
    with ResponseCache(tmp_path) as cache:
        cache.put("k1", "an answer", {"prompt_tokens": 3, "completion_tokens": 2},
                  backend="openai", model="m")
    with ResponseCache(tmp_path) as cache:
        hit = cache.get("k1")
        assert hit is not None and hit.text == "an answer"
        assert hit.usage == {"prompt_tokens": 3, "completion_tokens": 2}
        assert cache.get("k2") is None
    mode = sqlite3.connect(tmp_path / "responses.sqlite").execute("PRAGMA journal_mode").fetchone()
    assert mode[0].lower() == "wal"


def test_concurrent_writers_lose_nothing(tmp_path):
    cache = ResponseCache(tmp_path)

    def write(worker: int) -> None:
        for i in range(50):
            cache.put(f"{worker}-{i}", f"text {worker} {i}", {}, backend="openai", model="m")

    threads = [threading.Thread(target=write, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(cache) == 400
    assert cache.get("7-49").text == "text 7 49"
    cache.close()


def test_racing_writers_keep_the_first_reply(tmp_path):
    with ResponseCache(tmp_path) as one, ResponseCache(tmp_path) as two:  # two processes
        assert one.put("k", "first", {"completion_tokens": 1}, backend="openai", model="m").text == "first"
        stored = two.put("k", "second", {"completion_tokens": 2}, backend="openai", model="m")
        assert (stored.text, stored.usage) == ("first", {"completion_tokens": 1})
        assert one.get("k").text == two.get("k").text == "first" and len(one) == 1


class RacingBackend(ChatBackend):
    """Replies "mine", but another process stores "theirs" for the same key just before."""

    kind = "openai"
    model = "m"

    def __init__(self, params, other: ResponseCache):
        self.params, self.other = params, other

    def complete(self, conversations, *, json_mode, may_send, on_done):
        for i, conv in enumerate(conversations):
            key = cache_key(backend=self.kind, model=self.params.model, messages=conv,
                            temperature=self.params.temperature,
                            max_tokens=self.params.max_tokens, endpoint=self.identity)
            self.other.put(key, f"theirs {i}", {"completion_tokens": 5}, backend=self.kind,
                           model=self.model)
            on_done(i, Completion(f"mine {i}", {"completion_tokens": 1}))


def test_a_reply_another_process_stored_first_is_the_one_used(tmp_path):
    params = TeacherParams(backend="openai", model="m", cache_dir=str(tmp_path))
    with ResponseCache(tmp_path) as other:
        teacher = ChatTeacher(params, RacingBackend(params, other), progress=False)
        questions = [{"id": 1, "category": "ML", "title": "t", "question": "q"}] * 2
        results = teacher.answer(questions[:1], [None])
        assert results[0].text == "theirs 0"  # the stored reply wins, also in this run
        again = ChatTeacher(params, RacingBackend(params, other), progress=False)
        assert again.answer(questions[:1], [None])[0].text == "theirs 0"
        assert teacher.stats.calls == 1 and again.stats.calls == 0


def test_default_location_is_outside_the_repo(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "root"))
    assert teacher_cache_dir(None) == tmp_path / "root" / "teacher"
    assert teacher_cache_dir(str(tmp_path / "mine")) == tmp_path / "mine"  # a param wins
    monkeypatch.delenv(ENV_VAR)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert teacher_cache_dir(None) == tmp_path / "xdg" / "meteor" / "teacher"
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "root"))
    params = TeacherParams(backend="openai", model="m")  # cache_dir: null, the default
    teacher = ChatTeacher(params, RacingBackend(params, ResponseCache(tmp_path / "x")),
                          progress=False)
    assert teacher.cache.path == tmp_path / "root" / "teacher" / "responses.sqlite"
    teacher.close()


# ------------------------------------------------------------------------- structured replies
def test_extract_json_from_fences_and_prose():
    assert extract_json('```json\n{"a": 1}\n```') == '{"a": 1}'
    assert extract_json('Here you go:\n```\n{"a": 2}\n```\nthanks') == '{"a": 2}'
    assert extract_json('Sure! {"a": {"b": 3}} Hope it helps.') == '{"a": {"b": 3}}'


CODE_FEEDBACK = ("Use no_grad:\n```python\nwith torch.no_grad():\n    y = model(x)\n```\n"
                 "and call model.eval() first.")
VERDICT_WITH_CODE = json.dumps({"correct": False, "feedback": CODE_FEEDBACK,
                                "hints": ["```py\nmodel.eval()\n```"]})


@pytest.mark.parametrize("reply", [
    VERDICT_WITH_CODE,                                         # bare JSON
    f"```json\n{VERDICT_WITH_CODE}\n```",                      # fenced JSON
    f"Here is my verdict:\n```\n{VERDICT_WITH_CODE}\n```\nDone.",  # prose around a fence
    f"Verdict: {VERDICT_WITH_CODE}",                            # prose before bare JSON
])
def test_json_with_code_fences_inside_strings_is_kept_whole(reply):
    verdict = parse_structured(reply, Verdict)
    assert verdict.feedback == CODE_FEEDBACK and verdict.hints == ["```py\nmodel.eval()\n```"]


def test_a_fenced_json_block_after_a_code_block_is_found():
    reply = ("The fix:\n```python\nmodel.eval()\n```\nMy verdict:\n```json\n"
             '{"correct": true, "feedback": "ok", "hints": []}\n```')
    assert parse_structured(reply, Verdict).correct is True


def test_parse_verdict_and_readable_errors():
    v = parse_structured('```json\n{"correct": false, "feedback": "no", "hints": ["x"]}\n```', Verdict)
    assert v == Verdict(correct=False, feedback="no", hints=["x"])
    with pytest.raises(ValueError, match="feedback"):
        parse_structured('{"correct": true}', Verdict)
    with pytest.raises(ValueError, match="Invalid JSON"):
        parse_structured("I think it is correct.", Verdict)


def test_scores_must_cover_every_criterion():
    raw = {"scores": {"Accuracy": {"score": 8, "justification": "ok"},
                      "relevance": {"score": 6, "justification": "ok"},
                      "style": {"score": 1, "justification": "not asked"}}}
    scores = check_criteria(Scores.model_validate(raw), ("accuracy", "relevance"))
    assert list(scores.scores) == ["accuracy", "relevance"]  # names normalised, extras dropped
    with pytest.raises(ValueError, match="completeness"):
        check_criteria(Scores.model_validate(raw), ("accuracy", "completeness"))
    with pytest.raises(ValueError, match="scores.accuracy.score"):
        parse_structured('{"scores": {"accuracy": {"score": 11, "justification": "x"}}}', Scores)
