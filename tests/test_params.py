"""params.yaml is loaded into typed objects; bad keys and values fail early, naming the key."""

from __future__ import annotations

import pytest
import yaml

from meteor.params import Params, ParamsError, load_params


def write(tmp_path, data) -> str:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_repo_params_file_is_valid_and_matches_defaults():
    # params.yaml is the documented default; keep it in step with the code's defaults.
    assert load_params("params.yaml") == Params()


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
