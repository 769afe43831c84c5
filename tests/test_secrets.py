"""The API key is used but never written: not to outputs, metrics, logs or the teacher cache.

stages/distill.py runs as a subprocess in a temporary working directory whose params.yaml points
teacher and judge at a loopback OpenAI-compatible server, with OPENAI_API_KEY set to a unique
value and debug logging on. Afterwards every file under that directory and the captured
stdout/stderr are searched for the key. The server must have received it (so it was really used),
and the search itself is checked on a planted copy (so a leak would be noticed).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import yaml
from fake_openai_server import FakeOpenAIServer

ROOT = Path(__file__).resolve().parents[1]

QUESTIONS = [
    {"id": i, "category": cat, "title": f"Question {i} about {topic}?",
     "question": f"How does {topic} work in practice?", "answer": f"{topic} is explained here."}
    for i, (cat, topic) in enumerate([("ML", "bagging"), ("DL", "dropout"), ("NLP", "BPE")], 1)
]


def files_containing(root: Path, secret: str) -> list[str]:
    """Every file under ``root`` whose bytes contain ``secret`` (binary files included)."""
    needle = secret.encode()
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if p.is_file() and needle in p.read_bytes())


def test_api_key_never_leaves_the_environment(tmp_path):
    key = f"sk-meteor-test-{uuid.uuid4().hex}"
    work = tmp_path / "work"
    (work / "data" / "scraped").mkdir(parents=True)
    (work / "data" / "scraped" / "train.jsonl").write_text(
        "".join(json.dumps(q) + "\n" for q in QUESTIONS))
    (work / "data" / "guidelines.jsonl").write_text("".join(
        json.dumps({"id": q["id"], "category": q["category"], "title": q["title"],
                    "question": q["question"], "guideline": "1. Scope\n2. Steps",
                    "degenerate": None}) + "\n" for q in QUESTIONS))

    with FakeOpenAIServer() as server:
        backend = {"backend": "openai", "model": "fake-model", "base_url": server.base_url,
                   "cache_dir": ".cache/teacher", "max_concurrency": 2}
        (work / "params.yaml").write_text(yaml.safe_dump(
            {"teacher": backend, "judge": backend, "distill": {"ablation_size": 2}}))
        env = {**os.environ, "OPENAI_API_KEY": key, "METEOR_LOG_LEVEL": "DEBUG"}
        env.pop("OPENAI_BASE_URL", None)
        proc = subprocess.run([sys.executable, str(ROOT / "stages" / "distill.py")], cwd=work,
                              env=env, capture_output=True, text=True, timeout=120)
        authorizations = set(server.log.authorizations)

    logs = proc.stdout + proc.stderr
    assert proc.returncode == 0, logs[-4000:]
    # The key was really used: every request carried it.
    assert authorizations == {f"Bearer {key}"}
    # What the scan covers: outputs, metrics and the persistent teacher cache all exist.
    rows = [json.loads(line) for line in (work / "data/distilled.jsonl").read_text().splitlines()]
    assert [r["ok"] for r in rows] == [True] * 3
    assert (work / "metrics/distill.json").is_file()
    cache_files = list((work / ".cache/teacher").iterdir())
    assert cache_files and any(f.stat().st_size > 0 for f in cache_files)
    assert "DEBUG" in logs  # the most verbose logging was on

    assert files_containing(work, key) == []
    assert key not in logs

    # The scan would notice a leak: plant the key and find it again.
    (work / ".cache/teacher/planted.bin").write_bytes(b"\x00junk" + key.encode() + b"\xff")
    assert files_containing(work, key) == [".cache/teacher/planted.bin"]
