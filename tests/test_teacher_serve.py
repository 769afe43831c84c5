"""The openai backend against a real OpenAI-compatible server: ``transformers serve`` on loopback,
serving the tiny test model from a local directory, offline, on CPU.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from fake_openai_server import make_questions

from meteor.teacher.config import TeacherParams
from meteor.teacher import make_teacher

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, log_path: Path, limit_s: float = 180) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"transformers serve exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"transformers serve not healthy after {limit_s}s:\n{log_path.read_text()[-3000:]}")


@pytest.fixture
def served_model(tiny_model_dir, tmp_path):
    pytest.importorskip("uvicorn", reason="needs transformers[serving]")
    pytest.importorskip("fastapi", reason="needs transformers[serving]")
    cli = Path(sys.executable).with_name("transformers")
    if not cli.exists():
        cli = Path(shutil.which("transformers") or "transformers")

    # Greedy, the untrained model emits only newlines (an empty reply); make it sample instead.
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    gen_path = model_dir / "generation_config.json"
    gen_config = json.loads(gen_path.read_text())
    gen_config.update(do_sample=True, top_k=0)
    gen_path.write_text(json.dumps(gen_config))

    port = free_port()
    log_path = tmp_path / "serve.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    with open(log_path, "w") as log_file:
        # A model given on the command line is preloaded and pinned: requests must name it exactly.
        proc = subprocess.Popen(
            [str(cli), "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(port),
             "--device", "cpu", "--default-seed", "0"],
            env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_healthy(f"http://127.0.0.1:{port}/health", proc, log_path)
        yield str(model_dir), f"http://127.0.0.1:{port}/v1"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the whole group: uvicorn and any children
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_openai_backend_answers_through_transformers_serve(served_model, tmp_path):
    model, base_url = served_model
    teacher = make_teacher(TeacherParams(backend="openai", model=model, base_url=base_url,
                                         temperature=1.0, max_tokens=8, max_concurrency=2,
                                         cache_dir=str(tmp_path / "cache")))
    teacher.progress = False
    questions = make_questions(3)
    results = teacher.answer(questions, ["1. be precise", None, None])

    assert len(results) == 3
    assert all(r.ok and r.text.strip() for r in results), [r.error for r in results]
    assert all(r.usage["prompt_tokens"] > 20 and 1 <= r.usage["completion_tokens"] <= 8
               for r in results)
    assert teacher.stats.calls == 3 and teacher.stats.failures == 0
    assert teacher.stats.completion_tokens == sum(r.usage["completion_tokens"] for r in results)

    again = teacher.answer(questions, ["1. be precise", None, None])  # served from the cache
    assert [r.text for r in again] == [r.text for r in results] and teacher.stats.calls == 3
