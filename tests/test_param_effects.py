"""No param that silently does nothing: changing any declared param of a stage changes its
outputs, or the stage (or params validation) refuses it with a message naming the key.

Every stage in ``STAGES`` runs once on tiny params and small inputs (the baseline); then, for each
leaf param the stage declares in ``dvc.yaml``, the stage alone runs again, in a copy of the
baseline directory, with that one param changed (``alternative``), and its outs and metrics
(minus timings) are compared with the baseline's. A param passes when at least one stage that
declares it changed its outputs or refused the value naming the key. Params that by design do
not change outputs in this set-up are in ``NO_EFFECT_BY_DESIGN``, each with the reason; an entry
that does change outputs fails the test, so the list cannot go stale.

A new stage registers by adding its name to ``STAGES`` (after its inputs' stages), tiny values
to ``TINY`` when the defaults are slow, and alternatives or allow-list entries for params whose
changed value cannot be derived from its type.
"""

from __future__ import annotations

import copy
import hashlib
import json
import runpy
import shutil
import typing
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from meteor.io import read_jsonl, write_jsonl
from meteor.all_params import Params, load_params
from meteor.params import ParamsError

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
STAGES = ("scrape", "base", "guideline", "distill", "sft", "refine")  # in DAG order
OTHER_DUMP = "data/raw/other.xml"
EXTERNAL_MODEL = "external_model"  # a local HF model dir, as student.model / teacher.model

# Tiny and fast, and chosen so each knob has room to act (several batches and steps per epoch,
# more than one training step per refine update).
TINY = {
    "base": {"vocab_size": 512, "hidden_size": 32, "num_layers": 1, "num_heads": 2,
             "intermediate_size": 64, "max_seq_len": 512, "block_size": 64, "steps": 4,
             "batch_size": 4, "warmup_steps": 1},
    "generation": {"batch_size": 8, "max_new_tokens": 12},
    "guideline": {"max_new_tokens": 12, "limit": 10},
    "distill": {"limit": 8, "ablation_size": 4},
    "sft": {"train": {"epochs": 2, "batch_size": 4, "max_seq_len": 512,
                      "lora": {"r": 4, "alpha": 8}}},
    "refine": {"limit": 4, "fine_tune_interval": 2, "max_iterations": 2, "max_new_tokens": 8,
               "train": {"epochs": 2, "batch_size": 1, "max_seq_len": 512,
                         "lora": {"r": 4, "alpha": 8}}},
}

# The changed value of params whose alternative cannot be derived from the type (strings,
# lists, None defaults) or whose derived one would be invalid or too small to act. A dict value
# changes several keys at once (the first is the one tested).
ALTERNATIVES: dict[str, typing.Any] = {
    "scrape.source": {"scrape.source": "dump", "scrape.dump_path": OTHER_DUMP},
    "scrape.sample_path": OTHER_DUMP,
    "scrape.dump_path": OTHER_DUMP,
    "scrape.min_score": 30,
    "scrape.categories": {k: v for k, v in Params().scrape.categories.items() if k != "CV"},
    "scrape.split.salt": "another-salt",
    "scrape.api.base_url": "http://127.0.0.1:9/2.3",
    "scrape.api.site": "superuser",
    "scrape.api.page_size": 50,
    "student.model": EXTERNAL_MODEL,
    "student.revision": "main",
    "student.dtype": "bfloat16",
    "base.hidden_size": 48,
    "base.num_heads": 4,
    "teacher.backend": {"teacher.backend": "local", "teacher.model": EXTERNAL_MODEL,
                        "teacher.max_tokens": 8},
    "judge.backend": {"judge.backend": "local", "judge.model": EXTERNAL_MODEL,
                      "judge.max_tokens": 8},
    "guideline.limit": 3,
    "sft.train.max_steps": 3,
    "sft.train.warmup_ratio": 1.0,
    "sft.train.weight_decay": 0.1,
    "sft.train.max_grad_norm": 1e-4,
    "sft.train.max_seq_len": 400,  # prompts are ~270-420 tokens: cuts some, drops one
    "sft.train.lora.target_modules": ["q_proj", "v_proj"],
    "refine.train.max_steps": 3,
    "refine.train.warmup_ratio": 0.5,
    "refine.train.weight_decay": 0.1,
    "refine.train.max_grad_norm": 1e-4,
    "refine.train.max_seq_len": 400,
    "refine.max_new_tokens": 2,  # the tiny student stops by itself after a few tokens
    "refine.train.lora.target_modules": ["q_proj", "v_proj"],
}
for section in ("teacher", "judge"):
    ALTERNATIVES.update({f"{section}.model": "another-name",
                         f"{section}.base_url": "http://127.0.0.1:9/v1",
                         f"{section}.temperature": 0.5, f"{section}.budget_usd": 1.0,
                         f"{section}.prices": {}, f"{section}.cache_dir": "another-cache"})

_OFFLINE = ("read by the openai and local backends only; the offline teacher (the default) is "
            "deterministic, free and uncached")
# Params that by design change no output of the registered stages in this set-up. Keep reasons
# specific: an entry here is a param a user could change to no effect.
# (scrape.workers, the dump conversion's parallelism, is by design not a declared param of
# scrape in dvc.yaml, so it is not tested here.)
NO_EFFECT_BY_DESIGN = {
    "scrape.dump_path": "read with scrape.source: dump only (tested with scrape.source)",
    **{f"scrape.api.{k}": "read with scrape.source: api only (network)"
       for k in ("base_url", "site", "page_size", "max_pages", "max_retries", "timeout_s",
                 "min_quota")},
    "generation.batch_size": "batched greedy decoding equals one prompt at a time "
                             "(test_generate.py::test_batched_greedy_equals_one_at_a_time)",
    "generation.max_new_tokens": "guideline and refine use their own max_new_tokens; for the "
                                 "stages that generate with the shared default (self_train, "
                                 "evaluate)",
    **{f"generation.{k}": "a sampling knob, read with generation.do_sample: true only"
       for k in ("temperature", "top_p", "seed")},
    **{f"{section}.{k}": _OFFLINE for section in ("teacher", "judge")
       for k in ("base_url", "max_concurrency", "timeout_s", "max_retries", "json_retries",
                 "json_mode", "temperature", "max_tokens", "budget_usd", "prices", "cache_dir",
                 "batch_size")},
}
VOLATILE = {"seconds", "train_seconds", "tokens_per_s"}  # timings: differ between any two runs


# ------------------------------------------------------------------------- params plumbing
def _field(path: str):
    model, info = Params, None
    for part in path.split("."):
        info = model.model_fields[part]
        model = info.annotation
    return info


def leaves(prefix: str) -> list[str]:
    """The leaf params under a dvc.yaml ``params:`` entry (a section or a key)."""
    node = Params()
    for part in prefix.split("."):
        node = getattr(node, part)
    if not isinstance(node, BaseModel):
        return [prefix]
    return [leaf for name in type(node).model_fields for leaf in leaves(f"{prefix}.{name}")]


def alternative(key: str, value) -> dict[str, typing.Any]:
    """``{key: changed value, ...}`` for one variation."""
    if key in ALTERNATIVES:
        alt = ALTERNATIVES[key]
        return alt if isinstance(alt, dict) and key in alt else {key: alt}
    choices = typing.get_args(_field(key).annotation)
    if isinstance(value, bool):
        return {key: not value}
    if choices and all(isinstance(c, str) for c in choices):
        return {key: next(c for c in choices if c != value)}
    if isinstance(value, int):
        return {key: value + 1}
    if isinstance(value, float) and value > 0:
        return {key: value / 2}
    raise AssertionError(f"no alternative value for {key}={value!r}: add one to ALTERNATIVES")


def get(tree: dict, key: str):
    for part in key.split("."):
        tree = tree[part]
    return tree


def set_(tree: dict, key: str, value) -> None:
    *parents, last = key.split(".")
    for part in parents:
        tree = tree[part]
    tree[last] = value


def deep_update(base: dict, new: dict) -> dict:
    for k, v in new.items():
        base[k] = deep_update(base.get(k, {}), v) if isinstance(v, dict) and k in base else v
    return base


# --------------------------------------------------------------------------- running stages
DVC = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def _paths(entries) -> list[str]:
    return [next(iter(e)) if isinstance(e, dict) else e for e in entries or []]


def _scrub(value):
    if isinstance(value, dict):
        return {k: _scrub(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [_scrub(v) for v in value]
    return value


def digest(workdir: Path, stage: str) -> str:
    """Hash of the stage's outs and metrics (timings removed)."""
    h = hashlib.sha256()
    for rel in sorted(_paths(DVC[stage].get("outs")) + _paths(DVC[stage].get("metrics"))):
        path = workdir / rel
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            h.update(file.relative_to(workdir).as_posix().encode())
            data = file.read_bytes() if file.exists() else b"<missing>"
            if file.suffix == ".json" and rel in _paths(DVC[stage].get("metrics")):
                data = json.dumps(_scrub(json.loads(data)), sort_keys=True).encode()
            h.update(hashlib.sha256(data).digest())
    return h.hexdigest()


def run_stage(workdir: Path, stage: str, params: dict, monkeypatch) -> str:
    """``"refused: <message>"`` or the digest of what the stage wrote (and its exit code)."""
    (workdir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    code = 0
    with monkeypatch.context() as m:
        m.chdir(workdir)
        try:
            runpy.run_path(str(REPO / "stages" / f"{stage}.py"), run_name="__main__")
        except SystemExit as e:
            code = e.code or 0
        except (ValueError, RuntimeError, OSError) as e:  # ParamsError is a ValueError
            return f"refused: {e}"
    return f"{digest(workdir, stage)} exit {code}"


def _make_some_guidelines_usable(path: Path, n: int = 6) -> None:
    """The untrained tiny student writes no usable guideline, and then distill's ablation (and so
    ``distill.ablation_size``) has nothing to act on; give more rows than the ablation samples a
    numbered guideline, as a real student writes, so distill's params are exercised."""
    rows = read_jsonl(path)
    for row in rows[:n]:
        row.update(guideline="1. Define the terms.\n2. Explain the cause.\n3. Show the fix.",
                   degenerate=None)
    write_jsonl(path, rows)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, tiny_model_dir):
    """The tiny pipeline run once: (directory with every stage's outputs, params, digests)."""
    monkeypatch = pytest.MonkeyPatch()
    workdir = tmp_path_factory.mktemp("param_effects") / "baseline"
    rows = (REPO / "data" / "raw" / "Posts.xml").read_text().splitlines()
    head, body = rows[:2], [r for r in rows if r.lstrip().startswith("<row")]
    (workdir / "data" / "raw").mkdir(parents=True)
    for name, part in (("Posts.xml", body[:110]), ("other.xml", body[110:200])):
        (workdir / "data" / "raw" / name).write_text("\n".join(head + part + ["</posts>"]) + "\n")
    shutil.copytree(tiny_model_dir, workdir / EXTERNAL_MODEL)
    params = deep_update(Params().model_dump(), copy.deepcopy(TINY))
    digests = {}
    for stage in STAGES:
        digests[stage] = run_stage(workdir, stage, params, monkeypatch)
        assert not digests[stage].startswith("refused"), f"{stage}: {digests[stage]}"
        if stage == "guideline":
            _make_some_guidelines_usable(workdir / "data" / "guidelines.jsonl")
    monkeypatch.undo()
    return workdir, params, digests


def test_stages_are_deterministic(baseline, tmp_path, monkeypatch):
    """The premise: running a stage again with the same params gives the same outputs."""
    workdir, params, digests = baseline
    for stage in STAGES:
        copy_dir = tmp_path / stage
        shutil.copytree(workdir, copy_dir)
        assert run_stage(copy_dir, stage, params, monkeypatch) == digests[stage], stage
        shutil.rmtree(copy_dir)


def declared() -> dict[str, list[str]]:
    """param leaf -> the registered stages that declare it in dvc.yaml."""
    out: dict[str, list[str]] = {}
    for stage in STAGES:
        for entry in DVC[stage].get("params", []):
            for leaf in leaves(entry):
                out.setdefault(leaf, []).append(stage)
    return out


def test_every_declared_param_changes_outputs_or_is_refused(baseline, tmp_path, monkeypatch):
    workdir, params, digests = baseline
    stale = set(NO_EFFECT_BY_DESIGN) - set(declared())
    assert not stale, f"NO_EFFECT_BY_DESIGN names params no registered stage declares: {stale}"
    silent, stale_allowed = [], []
    for n, (key, stages) in enumerate(sorted(declared().items())):
        changed = copy.deepcopy(params)
        for k, v in alternative(key, get(params, key)).items():
            set_(changed, k, v)
        path = tmp_path / "params.yaml"
        path.write_text(yaml.safe_dump(changed))
        try:
            load_params(path)
            outcomes = {}
        except ParamsError as e:
            outcomes = {"params": f"refused: {e}"}
        for stage in stages if not outcomes else []:
            copy_dir = tmp_path / f"{n}-{stage}"
            shutil.copytree(workdir, copy_dir)
            outcomes[stage] = run_stage(copy_dir, stage, changed, monkeypatch)
            shutil.rmtree(copy_dir)
            if outcomes[stage] != digests[stage] and key not in NO_EFFECT_BY_DESIGN:
                break  # one stage acting on it is enough
        # A refusal must name the key (or the key within its section, e.g. train.max_seq_len).
        names = (key, key.split(".", 1)[-1])
        acted = [s for s, o in outcomes.items()
                 if (o.startswith("refused") and any(k in o for k in names)) or
                 (not o.startswith("refused") and o != digests[s])]
        refused_elsewise = [f"{s}: {o}" for s, o in outcomes.items()
                            if o.startswith("refused") and s not in acted]
        if key in NO_EFFECT_BY_DESIGN:
            if acted:
                stale_allowed.append(f"{key} acts in {acted}: remove it from NO_EFFECT_BY_DESIGN")
        elif not acted:
            silent.append(f"{key} (declared by {stages}): {refused_elsewise or 'no change'}")
    assert not silent, "params that change nothing:\n" + "\n".join(silent)
    assert not stale_allowed, "\n".join(stale_allowed)
