"""The pipeline under real DVC, in a temporary git + DVC copy of this repo with tiny params.

`dvc repro` runs every stage; a second `dvc repro` runs nothing; a param change re-runs exactly the
stages downstream of it; `dvc exp run -S` and `dvc metrics diff` work.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
API_KEY = f"sk-test-{uuid.uuid4().hex}"  # made at run time, so no source file contains it

# Small enough that a full `dvc repro` takes about a minute on 2 CPU cores.
TINY_PARAMS = {
    "base": {"vocab_size": 512, "hidden_size": 32, "num_layers": 1, "num_heads": 2,
             "intermediate_size": 64, "max_seq_len": 512, "block_size": 64, "steps": 4,
             "batch_size": 4, "warmup_steps": 1},
    "generation": {"batch_size": 8, "max_new_tokens": 12},
    "guideline": {"max_new_tokens": 12, "limit": 12},
    "distill": {"limit": 12, "ablation_size": 4},
    "sft": {"train": {"max_steps": 3, "batch_size": 4, "max_seq_len": 512, "lora": {"r": 4, "alpha": 8}}},
    "refine": {"limit": 8, "fine_tune_interval": 2, "max_iterations": 2, "max_new_tokens": 12,
               "train": {"max_steps": 2, "batch_size": 2, "max_seq_len": 512,
                         "lora": {"r": 4, "alpha": 8}}},
    # an almost untrained scorer: keep rows whatever their IFD, so that every chunk has data
    "ifd_select": {"max_ifd": 10.0, "min_answer_tokens": 2},
}


def deep_update(base: dict, new: dict) -> dict:
    for k, v in new.items():
        base[k] = deep_update(base.get(k, {}), v) if isinstance(v, dict) else v
    return base


def stages_in_dvc_yaml() -> list[str]:
    return list(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"])


def ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([\w-]+)'", output))


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    path = tmp_path_factory.mktemp("pipeline") / "repo"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                           check=True, capture_output=True, text=True).stdout.split("\0")
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file() and rel != "dvc.lock" and not rel.startswith(("models/", "metrics/")):
            (path / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, path / rel)
    params = yaml.safe_load((path / "params.yaml").read_text())
    (path / "params.yaml").write_text(yaml.safe_dump(deep_update(params, TINY_PARAMS), sort_keys=False))

    env = os.environ.copy()
    env.update(
        DVC_NO_ANALYTICS="1",
        DVC_SITE_CACHE_DIR=str(tmp_path_factory.mktemp("dvc_site_cache")),
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}",
        GIT_AUTHOR_NAME="test", GIT_AUTHOR_EMAIL="test@example.com",
        GIT_COMMITTER_NAME="test", GIT_COMMITTER_EMAIL="test@example.com",
        OPENAI_API_KEY=API_KEY,
    )

    def run(*cmd: str) -> str:
        proc = subprocess.run(cmd, cwd=path, env=env, capture_output=True, text=True)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{out[-6000:]}"
        return out

    run("git", "init", "-q", "-b", "main")
    run("git", "add", "-A")
    run("git", "commit", "-qm", "tiny pipeline")
    run.path = path
    return run


def test_repro_runs_all_then_nothing(repo):
    first = repo("dvc", "repro")
    assert ran(first) == set(stages_in_dvc_yaml())
    assert ran(repo("dvc", "repro")) == set()
    status = json.loads(repo("dvc", "status", "--json"))
    assert status == {}
    for stage in stages_in_dvc_yaml():
        assert (repo.path / "metrics" / f"{stage}.json").exists()
    # the API key in the environment never reaches any file the pipeline wrote
    written = [f for f in repo.path.rglob("*") if f.is_file() and ".git" not in f.parts]
    assert any(f.name == "dvc.lock" for f in written)
    for f in written:
        assert API_KEY.encode() not in f.read_bytes(), f


def out_hashes(repo_path: Path) -> dict[str, str]:
    """md5 of every DVC out but the metrics files (they hold wall-clock seconds)."""
    lock = yaml.safe_load((repo_path / "dvc.lock").read_text())["stages"]
    return {out["path"]: out["md5"] for stage in lock.values() for out in stage.get("outs", [])
            if not out["path"].startswith("metrics/")}


def test_two_clean_runs_give_identical_outputs(repo):
    repo("dvc", "repro")
    first = out_hashes(repo.path)
    out = repo("dvc", "repro", "--force", "--no-run-cache")
    assert ran(out) == set(stages_in_dvc_yaml())
    assert out_hashes(repo.path) == first


def downstream_of(stage: str) -> set[str]:
    order = stages_in_dvc_yaml()  # stages are declared in DAG order (a linear chain)
    return set(order[order.index(stage):])


@pytest.mark.parametrize("key, value, must_run", [
    ("scrape.workers", 1, set()),  # not a dependency: changes nothing
    ("base.steps", 5, {"base", "guideline", "sft", "refine"}),
    ("sft.train.lr", 1e-3, {"sft", "refine"}),
])
def test_param_change_reruns_exactly_downstream(repo, key, value, must_run):
    repo("dvc", "repro")
    params_file = repo.path / "params.yaml"
    params = yaml.safe_load(params_file.read_text())
    section, *rest = key.split(".")
    node = params[section]
    for k in rest[:-1]:
        node = node[k]
    node[rest[-1]] = value
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    out = repo("dvc", "repro", "--no-run-cache")
    # Upstream stages never re-run. A downstream stage re-runs when one of its inputs changed:
    # e.g. distill is skipped when the new base model happens to write the same guidelines.
    assert must_run <= ran(out) <= (downstream_of(section) if must_run else set()), out
    repo("git", "add", "-A")
    repo("git", "commit", "-qm", f"set {key}")


def test_experiment_and_metrics_diff(repo):
    repo("dvc", "repro")
    repo("git", "add", "-A")
    repo("git", "commit", "-qm", "results", "--allow-empty")
    last = stages_in_dvc_yaml()[-1]
    out = repo("dvc", "exp", "run", "-S", "sft.train.max_steps=4")
    assert "sft" in ran(out) and last in ran(out)
    shown = json.loads(repo("dvc", "exp", "show", "--json"))
    assert shown, "dvc exp show lists the experiment"
    diff = json.loads(repo("dvc", "metrics", "diff", "HEAD", "--json"))
    assert any(name.startswith("metrics/sft.json") for name in diff), diff
