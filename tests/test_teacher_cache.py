"""The teacher response cache: key, persistence, thread safety; and structured-reply parsing."""

from __future__ import annotations

import json
import sqlite3
import threading

import pytest

from meteor.teacher import prompts
from meteor.teacher.base import Scores, Verdict
from meteor.teacher.cache import ResponseCache, cache_key
from meteor.teacher.chat import check_criteria, extract_json, parse_structured

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
