"""Typed, validated parameters: one section of ``params.yaml`` per stage.

Every section is a pydantic model with ``extra="forbid"``, so a misspelt key or a wrong type or
value fails before any work, with a message that names the key (``sft.train.lr: ...``).
Stage scripts call :func:`load_params` and read only their own sections; ``dvc.yaml`` declares
exactly those sections, so changing one re-runs only the stages that read it.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

CATEGORIES = ("ML", "DL", "NLP", "CV")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------------------- scrape
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


# ------------------------------------------------------------------------------- student / base
class StudentParams(Section):
    model: str = Field("tiny", description="'tiny' (built offline by the base stage), a hub id/path, "
                       "a .gguf file or a packaged GGUF's short name (smollm2-135m).")
    revision: str | None = Field(None, description="Hub revision to pin (recorded either way).")
    trust_remote_code: bool = Field(False, description="Allow custom modelling code from the hub.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="Load dtype.")


class BaseParams(Section):
    """Pre-training of the tiny student (ignored when student.model is not 'tiny')."""

    vocab_size: int = Field(4096, ge=300, description="Byte-level BPE vocabulary size.")
    hidden_size: int = Field(192, ge=8)
    num_layers: int = Field(4, ge=1)
    num_heads: int = Field(4, ge=1)
    intermediate_size: int = Field(512, ge=8)
    max_seq_len: int = Field(512, ge=16, description="Context length of the model.")
    block_size: int = Field(256, ge=16, description="Tokens per pre-training sequence.")
    steps: int = Field(300, ge=1, description="Optimiser steps (bounded: ~2 min on 2 CPU cores).")
    batch_size: int = Field(8, ge=1, description="Blocks per step (300 x 8 x 256 = 614k tokens).")
    lr: float = Field(3e-3, gt=0)
    warmup_steps: int = Field(20, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    seed: int = 0

    @model_validator(mode="after")
    def _shapes(self) -> BaseParams:
        if self.hidden_size % self.num_heads:
            raise ValueError("hidden_size must be divisible by num_heads")
        if self.block_size > self.max_seq_len:
            raise ValueError("block_size must be <= max_seq_len")
        return self


class GenerationParams(Section):
    """Student decoding defaults shared by guideline, refine, self_train and evaluate."""

    batch_size: int = Field(16, ge=1)
    max_new_tokens: int = Field(128, ge=1)
    do_sample: bool = Field(False, description="Greedy (False) or seeded sampling.")
    temperature: float = Field(0.7, gt=0)
    top_p: float = Field(0.95, gt=0, le=1)
    repetition_penalty: float = Field(1.1, gt=0)
    no_repeat_ngram_size: int = Field(
        4, ge=0, description="Never repeat an n-gram of this size (0 = off); small students loop.")
    seed: int = 0


# ------------------------------------------------------------------------------ teacher / judge
class TeacherParams(Section):
    backend: Literal["offline", "openai", "local"] = Field("offline", description="Who answers.")
    model: str = Field("offline-reference", description="Model name (openai) or path/hub id (local).")
    base_url: str | None = Field(None, description="OpenAI-compatible endpoint; else $OPENAI_BASE_URL.")
    max_concurrency: int = Field(16, ge=1, description="Requests in flight at once.")
    timeout_s: float = Field(60.0, gt=0, description="Per-request timeout.")
    max_retries: int = Field(5, ge=0, description="Retries on 429/5xx/timeouts (exponential backoff).")
    json_retries: int = Field(2, ge=0, description="Re-asks when a JSON answer fails validation.")
    json_mode: bool = Field(
        True, description="Send response_format=json_object for verdict/score calls (OpenAI, vLLM, "
                          "Ollama); transformers serve ignores it. Off for servers that reject it.")
    temperature: float = Field(0.0, ge=0)
    max_tokens: int = Field(1024, ge=1)
    budget_usd: float | None = Field(None, gt=0, description="Stop cleanly before spending more.")
    prices: dict[str, dict[str, float]] = Field(
        default_factory=lambda: {
            "gpt-4o-mini": {"input": 0.15, "output": 0.60},
            "gpt-4o": {"input": 2.50, "output": 10.0},
        },
        description="USD per 1M tokens, by model name; unknown models cost 0.",
    )
    cache_dir: str | None = Field(
        None, description="Persistent response cache directory; null: <cache root>/teacher, the "
                          "root being $METEOR_CACHE_DIR, else $XDG_CACHE_HOME/meteor (~/.cache/meteor). "
                          "Outside the repo, so queued and temp experiments share it.")
    batch_size: int = Field(8, ge=1, description="Batch size of the local backend.")


# ------------------------------------------------------------------------- guideline / distill
class GuidelineParams(Section):
    max_new_tokens: int = Field(96, ge=1)
    limit: int | None = Field(None, ge=1, description="Only the first N train questions (debugging).")


class DistillParams(Section):
    limit: int | None = Field(None, ge=1, description="Only the first N guidelines (debugging).")
    ablation_size: int = Field(20, ge=0, description="Questions distilled with and without "
                               "guideline: the first ones whose guideline is not degenerate.")
    max_failed_fraction: float = Field(
        0.05, ge=0, le=1, description="Above this share of failed rows (or of ablation pairs that "
                                      "could not be compared) the stage writes its outputs and "
                                      "metrics, then exits non-zero; a re-run resumes from the cache.")


# ------------------------------------------------------------------------------------ training
class LoraParams(Section):
    enabled: bool = Field(True, description="LoRA (True) or full fine-tuning (False).")
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                 "down_proj"])


class TrainParams(Section):
    """One training loop for sft, refine, self_train and merge."""

    epochs: int = Field(2, ge=1)
    max_steps: int | None = Field(
        None, ge=1, description="Exactly this many optimiser steps (overrides epochs) when set.")
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(2e-3, gt=0)
    warmup_ratio: float = Field(0.1, ge=0, le=1, description="Warmup steps / total steps.")
    lr_scheduler: Literal["linear", "cosine", "constant_with_warmup"] = Field(
        "linear", description="Decay after warmup (transformers.get_scheduler).")
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    max_seq_len: int = Field(512, ge=8)
    group_by_length: bool = Field(True, description="Length-grouped batches (less padding).")
    seed: int = 0
    lora: LoraParams = Field(default_factory=LoraParams)


class SftParams(Section):
    train: TrainParams = Field(default_factory=TrainParams)


class RefineTrainParams(TrainParams):
    """Each in-loop update: one pass over the rows since the last update. Its own class, so a
    partial ``refine.train`` in params.yaml keeps these defaults rather than sft's."""

    epochs: int = Field(1, ge=1)
    lr: float = Field(1e-3, gt=0)
    # No warmup: an update is a step or two on an already-trained adapter, and the first warmup
    # step has learning rate 0, so a one-step update would change nothing.
    warmup_ratio: float = Field(0.0, ge=0, le=1, description="Warmup steps / total steps.")


class RefineParams(Section):
    max_iterations: int = Field(3, ge=1, description="Answer + at most N-1 revisions per question.")
    fine_tune_interval: int = Field(
        10, ge=1, description="Update the student every N training rows (accepted answers, plus "
                              "teacher answers with keep_failed=reference).")
    target: Literal["final", "chain"] = Field("final", description="METEOR final answer or SelFee chain.")
    feedback: Literal["teacher", "self"] = Field("teacher", description="Who critiques (SELF: student).")
    keep_failed: Literal["drop", "last", "reference"] = Field(
        "reference", description="Rows never judged correct: drop, keep the last attempt (not "
                                 "trained on), or train on the teacher's distilled answer. The "
                                 "default keeps in-loop updates happening when the student rarely "
                                 "passes (the tiny student against the offline teacher).")
    limit: int | None = Field(None, ge=1, description="Only the first N questions (debugging).")
    max_new_tokens: int = Field(160, ge=1)
    max_failed_fraction: float = Field(
        0.05, ge=0, le=1, description="Above this share of questions that got no teacher verdict, "
                                      "the stage writes its outputs and metrics, then exits "
                                      "non-zero; a re-run resumes from the cache.")
    train: RefineTrainParams = Field(default_factory=RefineTrainParams)


# A section that inherits every key it does not set from another, so params.yaml writes each shared
# value once: the judge is the teacher unless told otherwise, and refine keeps training the sft
# adapter, whose LoRA shape it must share. (YAML anchors / merge keys cannot do this: `dvc exp run
# -S teacher.x=...` rewrites the file with every merged key copied into the child, so the override
# silently skips the judge and the link is gone.) A stage reading a child must also list its parent
# under `params:` in dvc.yaml (tests/test_dvc_deps.py checks it).
INHERITS = {"judge": "teacher", "refine.train.lora": "sft.train.lora"}


def _node(data: dict, dotted: str) -> dict | None:
    for key in dotted.split("."):
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data if isinstance(data, dict) else None


def resolve_inheritance(data: dict) -> dict:
    """``data`` (a raw params mapping) with each :data:`INHERITS` child completed by its parent's
    keys (the child's own keys win; a key's whole value is taken, e.g. a whole ``prices`` table)."""
    if not isinstance(data, dict):
        return data
    data = copy.deepcopy(data)
    for child, parent in INHERITS.items():
        inherited = _node(data, parent)
        if not inherited:
            continue
        *path, last = child.split(".")
        node = data
        for key in path:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                break
        else:
            own = node.get(last)
            if own is None:
                own = {}
            if isinstance(own, dict):
                node[last] = {**copy.deepcopy(inherited), **own}
    return data
# ----------------------------------------------------------------------------------- ifd_select
class IfdSelectParams(Section):
    """IFD / r-IFD data selection (Cherry LLM, Superfiltering, Selective Reflection-Tuning)."""

    model: str = Field(
        "models/self_train",
        description="Scorer: a student dir (adapter or full model) or hub id. dvc.yaml tracks "
        "models/self_train; point this elsewhere and change that dependency too.")
    score: Literal["ifd_loss", "ifd_ppl"] = Field(
        "ifd_loss", description="Which IFD drives selection (written as `ifd`): Cherry LLM's ratio "
        "of mean losses or Superfiltering's ratio of perplexities.")
    max_ifd: float = Field(1.0, gt=0, description="Drop rows with ifd >= this (1: the question "
                           "does not help the student produce the answer).")
    max_r_ifd: float | None = Field(
        None, gt=0, description="Also drop rows with r_ifd >= this (Selective Reflection-Tuning: "
        "1.0); null: r_ifd is computed and reported but does not select.")
    min_answer_tokens: int = Field(8, ge=1, description="Drop answers with fewer tokens.")
    fraction: float = Field(0.5, gt=0, le=1, description="Keep the ceil(fraction * n) highest-IFD "
                            "rows of each chunk's n surviving rows.")
    chunk_by: Literal["category", "source"] = Field(
        "category", description="The chunks: one data/selected/<chunk>.jsonl each.")
    per_question: Literal["best", "both"] = Field(
        "best", description="When both versions of a question survive: keep the lower-IFD one "
        "(best) or both.")
    max_seq_len: int | None = Field(
        None, ge=8, description="Truncate scored sequences to this many tokens; null: the "
        "scorer's context length.")
    batch_size: int = Field(8, ge=1, description="Sequences per forward pass (scores do not "
                            "depend on it; on a CPU small batches are faster, on a GPU larger).")


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
    ifd_select: IfdSelectParams = Field(default_factory=IfdSelectParams)

    @model_validator(mode="before")
    @classmethod
    def _inherit(cls, data):
        return resolve_inheritance(data)


class ParamsError(ValueError):
    """A params.yaml problem, with every offending key named."""


def load_params(path: str | Path = "params.yaml") -> Params:
    """Load and validate ``params.yaml``; raise :class:`ParamsError` naming each bad key."""
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"params file not found: {path}")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: top level must be a mapping of stage sections")
    try:
        return Params.model_validate(raw)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            key = ".".join(str(p) for p in err["loc"])
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            lines.append(f"  {key}: {msg}")
        raise ParamsError(f"{path}: invalid params\n" + "\n".join(lines)) from None
