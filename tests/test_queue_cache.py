"""Queued experiments (`dvc exp run --queue` + `dvc queue start`) share the teacher cache.

A queued experiment runs in a temporary copy of the repo, so a cache inside the repo starts
empty there and every experiment pays again for every call. The default cache lives outside the
repo (meteor.paths.cache_root()/teacher). In a small git + DVC repo with the real distill stage
(its dvc.yaml entry, script, params.yaml with the teacher/judge merge key), two queued experiments
that make identical teacher and judge requests against a loopback OpenAI-compatible server are
run one after the other, counting the server's calls; and once more with a repo-relative
cache_dir, which shows what the default avoids.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from fake_openai_server import FakeOpenAIServer
from test_distill import QUESTIONS, guideline_rows

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def repo(tmp_path):
    path = tmp_path / "repo"
    tracked = subprocess.run(["git", "ls-files", "-z", "src", "stages/distill.py", "params.yaml",
                              ".dvc"], cwd=ROOT, check=True, capture_output=True,
                             text=True).stdout.split("\0")
    for rel in filter(None, tracked):
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, path / rel)
    distill = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["distill"]
    (path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"distill": distill}}))
    (path / "data" / "scraped").mkdir(parents=True)
    for name, rows in (("data/scraped/train.jsonl", QUESTIONS),
                       ("data/guidelines.jsonl", guideline_rows())):
        (path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / ".gitignore").write_text("__pycache__/\n.cache/\n")

    env = os.environ.copy()
    env.update(
        DVC_NO_ANALYTICS="1",
        DVC_SITE_CACHE_DIR=str(tmp_path / "dvc_site_cache"),
        METEOR_CACHE_DIR=str(tmp_path / "user_cache"),  # the per-user cache root
        PYTHONPATH="src",  # each experiment imports its own copy of the code
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}",
        GIT_AUTHOR_NAME="test", GIT_AUTHOR_EMAIL="test@example.com",
        GIT_COMMITTER_NAME="test", GIT_COMMITTER_EMAIL="test@example.com",
    )
    env.pop("OPENAI_API_KEY", None)
    env.pop("OPENAI_BASE_URL", None)

    def run(*cmd: str, check: bool = True) -> str:
        proc = subprocess.run(cmd, cwd=path, env=env, capture_output=True, text=True)
        out = proc.stdout + proc.stderr
        assert not check or proc.returncode == 0, f"{' '.join(cmd)} failed:\n{out[-6000:]}"
        return out

    run("git", "init", "-q", "-b", "main")
    run("git", "add", "-A")
    run("git", "commit", "-qm", "distill only")
    run.path = path
    yield run
    run("dvc", "queue", "stop", "--kill", check=False)


def queue(repo, name: str, *overrides: str) -> None:
    repo("dvc", "exp", "run", "--queue", "-n", name, *[a for o in overrides for a in ("-S", o)])


def run_queue(repo, names: list[str], timeout_s: float = 600) -> None:
    """`dvc queue start` one worker (experiments run one at a time, in queue order) and wait until
    every named experiment has succeeded."""
    repo("dvc", "queue", "start", "-j", "1")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = repo("dvc", "queue", "status")
        lines = {n: next((ln for ln in status.splitlines() if f" {n} " in f" {ln} "), "")
                 for n in names}
        for n, line in lines.items():
            assert "Failed" not in line, repo("dvc", "queue", "logs", n, check=False)[-4000:]
        if all("Success" in line for line in lines.values()):
            return
        time.sleep(2)
    raise AssertionError(f"the queue did not finish in {timeout_s} s:\n{status}")


def experiments(repo) -> dict[str, dict]:
    """name -> {"params": params.yaml, "metrics": metrics/distill.json} from `dvc exp show`."""
    out = {}
    for commit in json.loads(repo("dvc", "exp", "show", "--json")):
        for exp in commit.get("experiments") or []:
            for rev in exp.get("revs", []):
                data = rev["data"]
                out[rev["name"]] = {"params": data["params"]["params.yaml"]["data"],
                                    "metrics": data["metrics"]["metrics/distill.json"]["data"]}
    return out


def test_second_queued_experiment_makes_no_repeated_call(repo, capsys):
    with FakeOpenAIServer() as server:
        # One change to the teacher block also switches the judge (it inherits the teacher).
        endpoint = ["teacher.backend=openai", "teacher.model=fake-model",
                    f"teacher.base_url={server.base_url}", "teacher.max_retries=0"]
        # Default cache location (cache_dir: null): outside the repo, shared by experiments.
        queue(repo, "first", *endpoint)
        queue(repo, "second", *endpoint, "teacher.max_concurrency=2")  # the same requests
        # Control: a cache inside the repo; each experiment's temporary copy starts without it.
        inside = [*endpoint, "teacher.cache_dir=.cache/teacher"]
        queue(repo, "inside-1", *inside)
        queue(repo, "inside-2", *inside, "teacher.max_concurrency=2")
        names = ["first", "second", "inside-1", "inside-2"]
        run_queue(repo, names)
        total = server.calls

    exps = experiments(repo)
    calls = {n: exps[n]["metrics"]["teacher"]["calls"] + exps[n]["metrics"]["judge"]["calls"]
             for n in names}
    with capsys.disabled():
        print(f"\nserver calls per queued experiment: {calls} (server saw {total})")
    assert sum(calls.values()) == total  # the stages' own counts agree with the server's
    assert calls["first"] > 0
    assert calls["second"] == 0
    for section in ("teacher", "judge"):  # every request of the second was a cache hit
        first, second = (exps[n]["metrics"][section] for n in ("first", "second"))
        assert second["cache_hits"] == first["calls"] + first["cache_hits"] > 0
    assert calls["inside-1"] == calls["inside-2"] == calls["first"]  # what the default avoids
    # DVC tracks the judge's values: the experiment's params hold the judge as written (inheriting)
    # and its teacher with the -S overrides.
    second = exps["second"]["params"]
    assert second["judge"] == {} and second["teacher"]["backend"] == "openai"
    assert second["teacher"]["max_concurrency"] == 2
    assert exps["second"]["metrics"]["judge"]["name"] == "openai:fake-model"
