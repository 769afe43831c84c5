"""Every section of params.yaml in one schema: for tests, documentation and checking a whole file.

No stage imports this module (a stage validates only the sections it reads, see
:func:`meteor.params.load_sections`), so it may import every stage's schema without widening any
stage's deps. ``python -m meteor.all_params [params.yaml]`` validates a whole file.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pydantic import Field

from meteor.distill import DistillParams
from meteor.evaluation.config import EvaluateParams
from meteor.guideline import GuidelineParams
from meteor.merging.run import MergeParams
from meteor.params import SECTIONS, Section, read_params, validate
from meteor.refine import RefineParams
from meteor.scrape.config import ScrapeParams
from meteor.selection import IfdSelectParams
from meteor.self_train import SelfTrainParams
from meteor.student.config import StudentParams
from meteor.student.generate import GenerationParams
from meteor.student.pretrain import BaseParams
from meteor.teacher.config import TeacherParams
from meteor.training.config import SftParams


class Params(Section):
    scrape: ScrapeParams = Field(default_factory=ScrapeParams)
    student: StudentParams = Field(default_factory=StudentParams)
    base: BaseParams = Field(default_factory=BaseParams)
    generation: GenerationParams = Field(default_factory=GenerationParams)
    teacher: TeacherParams = Field(default_factory=TeacherParams)
    judge: TeacherParams = Field(default_factory=TeacherParams)
    guideline: GuidelineParams = Field(default_factory=GuidelineParams)
    distill: DistillParams = Field(default_factory=DistillParams)
    sft: SftParams = Field(default_factory=SftParams)
    refine: RefineParams = Field(default_factory=RefineParams)
    self_train: SelfTrainParams = Field(default_factory=SelfTrainParams)
    ifd_select: IfdSelectParams = Field(default_factory=IfdSelectParams)
    merge: MergeParams = Field(default_factory=MergeParams)
    evaluate: EvaluateParams = Field(default_factory=EvaluateParams)


assert tuple(Params.model_fields) == SECTIONS, "meteor.params.SECTIONS and Params disagree"


def load_params(path: str | Path = "params.yaml") -> Params:
    """Every section of ``path``, validated; a :class:`~meteor.params.ParamsError` naming each bad
    key otherwise."""
    return validate(path, Params, read_params(path))


if __name__ == "__main__":
    target = sys.argv[1] if len(sys.argv) > 1 else "params.yaml"
    load_params(target)
    print(f"{target}: valid")
