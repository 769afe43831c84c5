"""The ``scrape`` section of params.yaml: where questions come from, the tag -> category table,
the split and the Stack Exchange API client."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from meteor.categories import CATEGORIES
from meteor.params import Section


class ApiParams(Section):
    """Stack Exchange API v2.3 client (``scrape.source: api``)."""

    base_url: str = Field("https://api.stackexchange.com/2.3", description="API root.")
    site: str = Field("stackoverflow", description="Stack Exchange site.")
    page_size: int = Field(100, ge=1, le=100, description="Items per page (API max 100).")
    max_pages: int = Field(10, ge=1, description="Pages per category tag; bounds quota use.")
    max_retries: int = Field(5, ge=0, description="Retries of a throttled or failed request.")
    timeout_s: float = Field(30.0, gt=0, description="Per-request timeout.")
    min_quota: int = Field(10, ge=0, description="Stop cleanly when quota_remaining falls below.")


class SplitParams(Section):
    """Deterministic split by a hash of the question id: adding data never moves old rows."""

    dev: float = Field(0.1, ge=0, lt=1, description="Fraction of questions in dev.")
    test: float = Field(0.1, ge=0, lt=1, description="Fraction of questions in test.")
    salt: str = Field(
        "stackoverflow",
        description="Hash salt; change it to draw a different split (this one gives every category "
        "5-9 dev and test questions on the bundled corpus).")

    @model_validator(mode="after")
    def _fractions(self) -> SplitParams:
        if self.dev + self.test >= 1:
            raise ValueError("dev + test must be < 1 so that train is not empty")
        return self


class ScrapeParams(Section):
    source: Literal["sample", "dump", "api"] = Field("sample", description="Where questions come from.")
    sample_path: str = Field("data/raw/Posts.xml", description="The bundled dump (source=sample).")
    dump_path: str | None = Field(None, description="A Stack Exchange Posts.xml (source=dump).")
    categories: dict[str, list[str]] = Field(
        default_factory=lambda: {
            "ML": ["machine-learning", "scikit-learn", "xgboost", "random-forest", "cross-validation"],
            "DL": ["deep-learning", "pytorch", "tensorflow", "keras", "neural-network"],
            "NLP": ["nlp", "huggingface-transformers", "nltk", "spacy", "word-embedding"],
            "CV": ["computer-vision", "opencv", "image-processing", "object-detection",
                   "image-segmentation"],
        },
        description="Tag -> category table; a question takes the first category whose tags match.",
    )
    min_score: int = Field(0, description="Drop questions scoring below this.")
    workers: int = Field(0, ge=0, description="Processes converting dump HTML to Markdown; "
                         "0 = one per CPU, 1 = no pool. The records do not depend on it.")
    split: SplitParams = Field(default_factory=SplitParams)
    api: ApiParams = Field(default_factory=ApiParams)

    @field_validator("categories")
    @classmethod
    def _known_categories(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        unknown = set(v) - set(CATEGORIES)
        if unknown:
            raise ValueError(f"unknown categories {sorted(unknown)}; expected a subset of {CATEGORIES}")
        return v

    @model_validator(mode="after")
    def _dump_needs_path(self) -> ScrapeParams:
        if self.source == "dump" and not self.dump_path:
            raise ValueError("scrape.dump_path is required when scrape.source is 'dump'")
        return self
