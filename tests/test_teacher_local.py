"""The local backend: a tiny HF chat model as teacher, batched, through the same cache and re-ask."""

from __future__ import annotations

from fake_openai_server import make_questions

from meteor.teacher.config import TeacherParams
from meteor.teacher import make_teacher


def local_teacher(model_dir, tmp_path, **overrides):
    params = TeacherParams(**{"backend": "local", "model": str(model_dir), "max_tokens": 8,
                              "batch_size": 2, "cache_dir": str(tmp_path / "cache"), **overrides})
    teacher = make_teacher(params)
    teacher.progress = False
    return teacher


def test_local_teacher_answers_in_batches_and_caches(tiny_model_dir, tmp_path):
    # Greedy, an untrained model only emits newlines (an "empty reply"); seeded sampling gives text.
    questions = make_questions(3)
    teacher = local_teacher(tiny_model_dir, tmp_path, temperature=1.0)
    assert teacher.name == f"local:{tiny_model_dir}"
    results = teacher.answer(questions, ["1. be precise", None, None])
    assert all(r.ok for r in results) and teacher.stats.calls == 3
    assert all(r.usage["prompt_tokens"] > 20 and 0 < r.usage["completion_tokens"] for r in results)

    warm = local_teacher(tiny_model_dir, tmp_path, temperature=1.0)
    again = warm.answer(questions, ["1. be precise", None, None])
    assert [r.text for r in again] == [r.text for r in results]
    assert all(r.cached for r in again) and warm.stats.calls == 0


def test_local_teacher_reasks_then_fails_cleanly_on_invalid_json(tiny_model_dir, tmp_path):
    teacher = local_teacher(tiny_model_dir, tmp_path, json_retries=1)
    results = teacher.verdict(make_questions(2), ["an answer", "another"])
    # An untrained model cannot write a Verdict: asked twice each, then failed with the reason.
    assert [r.ok for r in results] == [False, False]
    assert all(r.error.startswith("invalid JSON after 2 replies") for r in results)
    assert teacher.stats.calls == 4 and teacher.stats.failures == 2


def test_a_changed_local_model_is_not_answered_from_the_cache(tiny_model_dir, tmp_path):
    import shutil

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    questions = make_questions(2)
    local_teacher(model_dir, tmp_path, temperature=1.0).answer(questions, [None, None])
    warm = local_teacher(model_dir, tmp_path, temperature=1.0)
    warm.answer(questions, [None, None])
    assert warm.stats.calls == 0
    (model_dir / "README.md").write_text("retrained\n")  # same path, new content hash
    changed = local_teacher(model_dir, tmp_path, temperature=1.0)
    changed.answer(questions, [None, None])
    assert changed.stats.calls == 2 and changed.stats.cache_hits == 0
