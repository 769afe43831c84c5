"""params.yaml is loaded into typed objects; bad keys and values fail early, naming the key."""

from __future__ import annotations

import pytest
import yaml
from pydantic import BaseModel

from meteor.all_params import Params, load_params
from meteor.params import INHERITS, ParamsError, resolve_inheritance


def write(tmp_path, data) -> str:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def unwritten_fields(model: type[BaseModel], written: dict, prefix: str = "") -> list[str]:
    """Dotted names of every field of ``model`` (recursively, into sections) that ``written``
    does not spell out."""
    missing = []
    for name, info in model.model_fields.items():
        key = f"{prefix}{name}"
        if name not in written:
            missing.append(key)
            continue
        sub = info.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            value = written[name]
            if not isinstance(value, dict):
                missing.append(f"{key} (not a mapping)")
            else:
                missing += unwritten_fields(sub, value, f"{key}.")
    return missing


def test_repo_params_file_is_valid():
    # It may hold an applied experiment (values differing from the code's defaults): that is fine.
    assert isinstance(load_params("params.yaml"), Params)


def test_repo_params_file_spells_out_every_field():
    # Every default is written in params.yaml (once: an inheriting section takes the keys it does
    # not set from its parent, meteor.params.INHERITS), so the values a stage uses are all tracked
    # by DVC's `params:` and a changed default in meteor/params.py cannot silently change an output
    # (why params.py may be left out of dvc.yaml deps: tests/test_dvc_deps.py).
    written = resolve_inheritance(yaml.safe_load(open("params.yaml")))
    assert unwritten_fields(Params, written) == []


def test_unwritten_fields_finds_a_missing_nested_key():
    written = resolve_inheritance(yaml.safe_load(open("params.yaml")))
    del written["refine"]["train"]["lora"]["r"]
    del written["judge"]
    assert unwritten_fields(Params, written) == ["judge", "refine.train.lora.r"]


def test_shared_blocks_are_written_once():
    raw = yaml.safe_load(open("params.yaml"))
    for child, parent in INHERITS.items():
        node = raw
        for key in child.split("."):
            node = node[key]
        assert node == {}, f"{child} repeats {parent}: write only the keys that differ"


def test_inheriting_sections_take_the_parent_keys_they_do_not_set(tmp_path):
    p = load_params(write(tmp_path, {
        "teacher": {"backend": "openai", "model": "gpt-4o-mini", "max_concurrency": 3,
                    "prices": {"gpt-4o-mini": {"input": 1.0, "output": 2.0}}},
        "judge": {"model": "gpt-4o"},
        "sft": {"train": {"lora": {"r": 8, "alpha": 16}}},
        "refine": {"train": {"lora": {"alpha": 8}}},
    }))
    assert (p.teacher.model, p.judge.model) == ("gpt-4o-mini", "gpt-4o")
    assert p.judge.backend == "openai" and p.judge.max_concurrency == 3
    assert p.judge.prices == p.teacher.prices
    assert (p.refine.train.lora.r, p.refine.train.lora.alpha) == (8, 8)
    assert (p.sft.train.lora.r, p.sft.train.lora.alpha) == (8, 16)
    # an unknown key in the parent is reported where it is written and where it is inherited
    with pytest.raises(ParamsError, match=r"teacher\.colour: unknown key"):
        load_params(write(tmp_path, {"teacher": {"colour": "red"}}))


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(ParamsError, match=r"sft\.train\.learning_rate: unknown key"):
        load_params(write(tmp_path, {"sft": {"train": {"learning_rate": 1e-3}}}))


def test_unknown_section_is_named(tmp_path):
    with pytest.raises(ParamsError, match=r"sftt: unknown key"):
        load_params(write(tmp_path, {"sftt": {}}))


@pytest.mark.parametrize(
    "data, key",
    [
        ({"scrape": {"source": "web"}}, "scrape.source"),
        ({"teacher": {"backend": "anthropic"}}, "teacher.backend"),
        ({"teacher": {"max_concurrency": -1}}, "teacher.max_concurrency"),
        ({"judge": {"max_concurrency": 0}}, "judge.max_concurrency"),
        ({"sft": {"train": {"lr": "fast"}}}, "sft.train.lr"),
        ({"base": {"steps": 0}}, "base.steps"),
        ({"scrape": {"split": {"dev": 0.6, "test": 0.5}}}, "scrape.split"),
        ({"scrape": {"categories": {"ROBOTICS": ["ros"]}}}, "scrape.categories"),
        ({"base": {"hidden_size": 100, "num_heads": 3}}, "base"),
    ],
)
def test_bad_value_is_named(tmp_path, data, key):
    with pytest.raises(ParamsError) as err:
        load_params(write(tmp_path, data))
    assert f"  {key}" in str(err.value)


def test_dump_source_needs_a_path(tmp_path):
    with pytest.raises(ParamsError, match="dump_path"):
        load_params(write(tmp_path, {"scrape": {"source": "dump"}}))


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "nope.yaml")


def test_partial_file_takes_defaults(tmp_path):
    p = load_params(write(tmp_path, {"sft": {"train": {"lr": 1e-4}}}))
    assert p.sft.train.lr == 1e-4
    assert p.sft.train.epochs == Params().sft.train.epochs
