"""The pipeline under real DVC, in a temporary git + DVC copy of this repo with tiny params.

`dvc repro` runs every stage; a second `dvc repro` runs nothing; a param change re-runs exactly the
stages downstream of it; `dvc exp run -S` and `dvc metrics diff` work. Stage names and the DAG
come from DVC itself (`dvc stage list`, `dvc dag --dot`), so `foreach` stages (`evaluate@sft`)
and branches of the DAG are handled.
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

from cpu_load import busy_cores

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def journey_present() -> list[str]:
    """The models of the default ``evaluate.models`` that a stage of dvc.yaml writes (a model whose
    stage is not in this checkout yet is left out)."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    outs = {o if isinstance(o, str) else next(iter(o))
            for stage in stages.values() for o in stage.get("outs", [])}
    models = yaml.safe_load((ROOT / "params.yaml").read_text())["evaluate"]["models"]
    return [m for m in models if f"models/{m}" in outs]


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
    "self_train": {"turns": 2, "limit": 6, "num_beams": 2, "max_new_tokens": 8,
                   "train": {"max_steps": 2, "batch_size": 2, "max_seq_len": 512}},
    # an almost untrained scorer: keep rows whatever their IFD, so that every chunk has data
    "ifd_select": {"max_ifd": 10.0, "min_answer_tokens": 2},
    "merge": {"trials": 2, "dev_limit": 4, "eval_batch_size": 4,
              "train": {"max_steps": 1, "batch_size": 4, "max_seq_len": 512,
                        "lora": {"r": 4, "alpha": 8}}},
    "evaluate": {"models": journey_present(), "max_new_tokens": 12, "batch_size": 8,
                 "bootstrap": {"samples": 200}},
}


def deep_update(base: dict, new: dict) -> dict:
    for k, v in new.items():
        base[k] = deep_update(base.get(k, {}), v) if isinstance(v, dict) else v
    return base


def stages(repo) -> list[str]:
    """Every stage, ``foreach`` ones expanded (``evaluate@sft``), as DVC lists them."""
    return repo("dvc", "stage", "list", "--name-only").split()


def dag_edges(repo) -> list[tuple[str, str]]:
    return re.findall(r'"([^"]+)" -> "([^"]+)"', repo("dvc", "dag", "--dot"))


def downstream_of(repo, *starts: str) -> set[str]:
    """``starts`` and every stage that depends on them, directly or not (the real DAG)."""
    edges = dag_edges(repo)
    seen, todo = set(starts), list(starts)
    while todo:
        node = todo.pop()
        for a, b in edges:
            if a == node and b not in seen:
                seen.add(b)
                todo.append(b)
    return seen


def ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([\w@-]+)'", output))


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
        METEOR_CACHE_DIR=str(tmp_path_factory.mktemp("meteor_cache")),  # merge's studies
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
    assert ran(first) == set(stages(repo))
    assert {f"evaluate@{m}" for m in TINY_PARAMS["evaluate"]["models"]} <= ran(first)
    assert ran(repo("dvc", "repro")) == set()
    status = json.loads(repo("dvc", "status", "--json"))
    assert status == {}
    lock = yaml.safe_load((repo.path / "dvc.lock").read_text())["stages"]
    assert set(lock) == set(stages(repo))
    for stage, entry in lock.items():  # every stage writes its metrics, and every out exists
        assert any(o["path"].startswith("metrics/") for o in entry["outs"]), stage
        assert all((repo.path / o["path"]).exists() for o in entry["outs"]), stage
    out = repo("dvc", "plots", "show", "--json")
    plots, _ = json.JSONDecoder().raw_decode(out[out.index("{"):])  # stdout first, then stderr
    journey = {name: points for name, points in plots["data"].items() if name.startswith("journey")}
    assert journey and all(journey.values()), plots
    assert not [e for e in plots.get("errors") or [] if e["name"].startswith("journey")], plots
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
    """Also under load: the second run shares the cores with a CPU burner (no thread count or
    kernel choice may depend on how busy the machine is; one burner keeps the test's time down)."""
    repo("dvc", "repro")
    first = out_hashes(repo.path)
    with busy_cores(1):
        out = repo("dvc", "repro", "--force", "--no-run-cache")
    assert ran(out) == set(stages(repo))
    assert out_hashes(repo.path) == first


def set_param(repo, key: str, value) -> None:
    params_file = repo.path / "params.yaml"
    params = yaml.safe_load(params_file.read_text())
    *path, last = key.split(".")
    node = params
    for k in path:
        node = node[k]
    node[last] = value
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))


EVALUATED = TINY_PARAMS["evaluate"]["models"]


@pytest.mark.parametrize("key, value, must_run", [
    ("scrape.workers", 1, set()),  # not a dependency: changes nothing
    ("base.steps", 5, {"base", "guideline", "sft", "refine", "evaluate@base"}),
    ("sft.train.lr", 1e-3, {"sft", "refine", "evaluate@sft"}),
    ("self_train.beta", 0.2, {"self_train"}),
    ("merge.trials", 3, {"merge"}),
    ("evaluate.bootstrap.seed", 1, {"report"}),  # aggregation only: no answer, no judge call
])
def test_param_change_reruns_exactly_downstream(repo, key, value, must_run):
    repo("dvc", "repro")
    set_param(repo, key, value)
    out = repo("dvc", "repro", "--no-run-cache")
    # Upstream stages never re-run. A downstream stage re-runs when one of its inputs changed:
    # e.g. distill is skipped when the new base model happens to write the same guidelines.
    assert must_run <= ran(out) <= (downstream_of(repo, *must_run) if must_run else set()), out
    repo("git", "add", "-A")
    repo("git", "commit", "-qm", f"set {key}")


def test_evaluate_param_reruns_only_evaluation_and_metrics_diff_shows_eval_keys(repo):
    repo("dvc", "repro")
    repo("git", "add", "-A")
    repo("git", "commit", "-qm", "before evaluate change", "--allow-empty")
    set_param(repo, "evaluate.max_new_tokens", 8)
    out = repo("dvc", "repro", "--no-run-cache")
    evaluation = {s for s in stages(repo) if s.startswith(("evaluate@", "judge@"))} | {"report"}
    answers = {f"evaluate@{m}" for m in EVALUATED}
    assert answers <= ran(out) <= evaluation, out
    diff = json.loads(repo("dvc", "metrics", "diff", "HEAD", "--json"))
    last = EVALUATED[-1]
    assert f"{last}.length" in diff.get("metrics/eval.json", {}), diff  # 12 -> at most 8 tokens
    every = json.loads(repo("dvc", "metrics", "diff", "HEAD", "--all", "--json"))["metrics/eval.json"]
    assert {f"{last}.win_share.accuracy", f"{last}.rouge_l", f"{last}.ppl",
            f"{last}.judge_score"} <= set(every), every
    repo("git", "add", "-A")
    repo("git", "commit", "-qm", "set evaluate.max_new_tokens")


def test_experiment_and_metrics_diff(repo):
    repo("dvc", "repro")
    repo("git", "add", "-A")
    repo("git", "commit", "-qm", "results", "--allow-empty")
    out = repo("dvc", "exp", "run", "-S", "sft.train.max_steps=4")
    assert {"sft", "evaluate@sft", "report"} <= ran(out) <= downstream_of(repo, "sft")
    shown = json.loads(repo("dvc", "exp", "show", "--json"))
    assert shown, "dvc exp show lists the experiment"
    diff = json.loads(repo("dvc", "metrics", "diff", "HEAD", "--json"))
    assert any(name.startswith("metrics/sft.json") for name in diff), diff
