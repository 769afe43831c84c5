"""The ``student`` section of params.yaml: which model the journey starts from and how every stage
loads it."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from meteor.params import Section


class StudentParams(Section):
    model: str = Field("tiny", description="'tiny' (built offline by the base stage), a hub id/path, "
                       "a .gguf file or a packaged GGUF's short name (smollm2-135m).")
    revision: str | None = Field(None, description="Hub revision to pin (recorded either way).")
    trust_remote_code: bool = Field(False, description="Allow custom modelling code from the hub.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="Load dtype.")
    allow_download: bool = Field(
        False, description="Let the base stage download student.model from the hub; off: it must "
                           "be a local dir or already in the local Hugging Face cache.")

    @model_validator(mode="after")
    def _hub_options_need_a_hub_model(self) -> StudentParams:
        # The tiny student is built here from the corpus: these would silently do nothing.
        if self.model == "tiny":
            for key, default in (("revision", None), ("trust_remote_code", False),
                                 ("allow_download", False)):
                if getattr(self, key) != default:
                    raise ValueError(f"student.{key} applies to a hub or local model only; "
                                     "student.model is 'tiny'")
        return self
