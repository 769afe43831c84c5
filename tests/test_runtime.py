"""The stage runtime (meteor.runtime.Stage) and loading a stage's own params sections."""

from __future__ import annotations

import logging

import pytest
import yaml

from meteor.all_params import Params
from meteor.merging.run import MergeParams
from meteor.params import SECTIONS, ParamsError, load_sections
from meteor.runtime import EXIT_INCOMPLETE, Stage
from meteor.teacher.config import TeacherParams
from meteor.training.config import SftParams


def write(tmp_path, data) -> str:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_a_stage_gets_its_sections_validated_and_nothing_else(tmp_path):
    path = write(tmp_path, {"sft": {"train": {"lr": 1e-4}}, "teacher": {"model": "m"},
                            "judge": {"temperature": 0.5}})
    stage = Stage("sft", params_path=path, sft=SftParams, judge=TeacherParams)
    assert stage.params.sft.train.lr == 1e-4
    assert stage.params.judge.model == "m"  # inherited from teacher
    assert stage.params.judge.temperature == 0.5
    assert not hasattr(stage.params, "teacher")  # not asked for


def test_only_the_sections_read_are_validated_but_unknown_sections_are_refused(tmp_path):
    # a bad key in a section this stage does not read is the other stage's error ...
    path = write(tmp_path, {"sft": {}, "merge": {"trials": "many"}})
    assert load_sections(path, sft=SftParams).sft == SftParams()
    with pytest.raises(ParamsError, match=r"merge\.trials"):
        load_sections(path, merge=MergeParams)
    # ... but a misspelt section is nobody's, so every stage refuses it
    with pytest.raises(ParamsError, match=r"sftt: unknown key"):
        load_sections(write(tmp_path, {"sftt": {}}), sft=SftParams)


def test_errors_name_every_bad_key_of_every_section_read(tmp_path):
    path = write(tmp_path, {"sft": {"train": {"learning_rate": 1}}, "judge": {"backend": "x"}})
    with pytest.raises(ParamsError) as e:
        load_sections(path, sft=SftParams, judge=TeacherParams)
    assert "sft.train.learning_rate: unknown key" in str(e.value)
    assert "judge.backend" in str(e.value)


def test_sections_match_the_full_schema():
    assert tuple(Params.model_fields) == SECTIONS


def test_finish_is_zero_when_complete_and_exit_3_with_the_reasons_logged(tmp_path, caplog):
    stage = Stage("t", params_path=write(tmp_path, {}))
    assert stage.complete and stage.finish() == 0
    stage.incomplete("stopped by the budget")
    stage.incomplete("3/10 rows failed")
    with caplog.at_level(logging.ERROR, logger="t"):
        assert stage.finish(see="the 'error' field of out.jsonl") == EXIT_INCOMPLETE
    assert not stage.complete
    message = caplog.records[-1].getMessage()
    assert "stopped by the budget; 3/10 rows failed" in message
    assert "the 'error' field of out.jsonl" in message


def test_only_rank_zero_writes(tmp_path, monkeypatch):
    stage = Stage("t", params_path=write(tmp_path, {}))
    monkeypatch.delenv("RANK", raising=False)
    assert stage.is_main
    monkeypatch.setenv("RANK", "1")
    assert not stage.is_main
    monkeypatch.setenv("RANK", "0")
    assert stage.is_main


def test_seconds_count_from_the_start(tmp_path):
    stage = Stage("t", params_path=write(tmp_path, {}))
    assert 0 <= stage.seconds() < 60
