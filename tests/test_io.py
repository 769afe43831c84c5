"""Atomic writes (meteor.io.atomic_path): all or nothing, usual permissions."""

from __future__ import annotations

import os
import stat

import pytest

from meteor.io import atomic_path, read_jsonl, write_jsonl


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_files_and_dirs_get_the_usual_permissions(tmp_path, umask_022):
    write_jsonl(tmp_path / "rows.jsonl", [{"a": 1}])
    with atomic_path(tmp_path / "model", is_dir=True) as tmp:
        (tmp / "weights.bin").write_bytes(b"x")
    assert mode(tmp_path / "rows.jsonl") == 0o644  # not mkstemp's 0600
    assert mode(tmp_path / "model") == 0o755  # not mkdtemp's 0700


def test_a_failed_write_leaves_the_old_output_and_no_temp(tmp_path):
    out = tmp_path / "rows.jsonl"
    write_jsonl(out, [{"a": 1}])
    with pytest.raises(RuntimeError), atomic_path(out) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash")
    model = tmp_path / "model"
    with atomic_path(model, is_dir=True) as tmp:
        (tmp / "old").write_text("old")
    with pytest.raises(RuntimeError), atomic_path(model, is_dir=True) as tmp:
        (tmp / "new").write_text("new")
        raise RuntimeError("crash")
    assert read_jsonl(out) == [{"a": 1}]
    assert sorted(p.name for p in model.iterdir()) == ["old"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "rows.jsonl"]


def test_a_dir_is_replaced_whole(tmp_path):
    model = tmp_path / "model"
    for name in ("first", "second"):
        with atomic_path(model, is_dir=True) as tmp:
            (tmp / name).write_text(name)
    assert [p.name for p in model.iterdir()] == ["second"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
