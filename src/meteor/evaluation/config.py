"""The ``evaluate`` section of params.yaml: the journey's models, the decoding every model gets,
the judge criteria and the bootstrap."""

from __future__ import annotations

from pydantic import Field, field_validator, model_validator

from meteor.criteria import CRITERIA
from meteor.params import Section

JOURNEY = ("base", "sft", "refine", "self_train", "merged")


class BootstrapParams(Section):
    """Percentile bootstrap over test questions (paired: one resample serves every model pair)."""

    samples: int = Field(2000, ge=100, description="Resamples of the test questions.")
    confidence: float = Field(0.95, gt=0, lt=1, description="Coverage of each interval.")
    seed: int = Field(0, description="Seeds the resampling, so intervals are reproducible.")


class EvaluateParams(Section):
    """Every model of the journey answers the test split; objective metrics, judge, report."""

    models: list[str] = Field(
        default_factory=lambda: list(JOURNEY),
        description="The journey, in order: directories under models/ (each one DVC stage "
                    "evaluate@<model> and judge@<model>).")
    baseline: str = Field("base", description="The model every other one is compared with "
                                              "pairwise (METEOR's 'w/o' row); one of models.")
    limit: int | None = Field(None, ge=1, description="Only N test questions, taken in turn from "
                              "each category (small profiles); the same for every model.")
    max_new_tokens: int = Field(128, ge=1, description="The same answer budget for every model.")
    batch_size: int = Field(16, ge=1, description="Questions per generation / perplexity batch.")
    repetition_penalty: float = Field(
        1.1, gt=0, description="Greedy decoding's repetition penalty (1.0 = off); the same for "
                               "every model.")
    no_repeat_ngram_size: int = Field(
        4, ge=0, description="Never repeat an n-gram of this size (0 = off); small students loop.")
    max_seq_len: int = Field(
        1024, ge=8, description="Reference perplexity: question + accepted answer truncated to "
                               "this many tokens (truncated answers are counted).")
    criteria: list[str] = Field(default_factory=lambda: list(CRITERIA),
                                description="Judge criteria (METEOR's five), scored 1-10.")
    bootstrap: BootstrapParams = Field(default_factory=BootstrapParams)

    @field_validator("models")
    @classmethod
    def _model_names(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("list at least one model")
        bad = [m for m in v if not m or not all(c.isalnum() or c in "_-" for c in m)]
        if bad:
            raise ValueError(f"model names must be directory names under models/ "
                             f"(letters, digits, _ and -): {bad}")
        if len(set(v)) != len(v):
            raise ValueError(f"duplicate models in {v}")
        return v

    @field_validator("criteria")
    @classmethod
    def _criteria(cls, v: list[str]) -> list[str]:
        if not v or len(set(v)) != len(v) or any(c != c.strip().lower() or not c for c in v):
            raise ValueError(f"criteria must be distinct, non-empty, lower-case names; got {v}")
        return v

    @model_validator(mode="after")
    def _baseline_in_models(self) -> EvaluateParams:
        if self.baseline not in self.models:
            raise ValueError(f"baseline {self.baseline!r} is not one of models {self.models}")
        return self
