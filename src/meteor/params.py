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


class BaseParams(Section):
    """Pre-training of the tiny student (ignored when student.model is not 'tiny')."""

    vocab_size: int = Field(4096, ge=300, description="Byte-level BPE vocabulary size.")
    hidden_size: int = Field(192, ge=8)
    num_layers: int = Field(4, ge=1)
    num_heads: int = Field(4, ge=1)
    intermediate_size: int = Field(512, ge=8)
    max_seq_len: int = Field(
        1024, ge=16, description="Context length of the model: fits sft/refine examples whole "
                                 "(question + answer + end-of-turn), so the student learns to stop.")
    block_size: int = Field(512, ge=16, description="Tokens per pre-training sequence.")
    steps: int = Field(300, ge=1, description="Optimiser steps (bounded: ~2 min on 2 CPU cores).")
    batch_size: int = Field(4, ge=1, description="Blocks per step (300 x 4 x 512 = 614k tokens).")
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
    limit: int | None = Field(None, ge=1, description="Only N train questions, taken in turn from "
                              "each category (debugging, small profiles).")


class DistillParams(Section):
    limit: int | None = Field(None, ge=1, description="Only N guidelines, taken in turn from each "
                              "category (debugging).")
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
    max_seq_len: int = Field(
        1024, ge=8, description="Examples are cut to this many tokens; one cut in its answer "
                                "loses the end-of-turn token, and with it the lesson to stop.")
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
    lora: LoraParams = Field(
        default_factory=LoraParams,
        description="Must describe the sft adapter, which refine keeps training (a value that "
                    "differs is refused, naming the key); with a fully fine-tuned sft model, "
                    "enabled: true trains a new adapter on it.")


class RefineParams(Section):
    max_iterations: int = Field(3, ge=1, description="Answer + at most N-1 revisions per question.")
    fine_tune_interval: int = Field(
        10, ge=1, description="Update the student every N training rows (accepted answers, plus "
                              "teacher answers with keep_failed=reference).")
    target: Literal["final", "chain"] = Field("final", description="METEOR final answer or SelFee chain.")
    feedback: Literal["teacher", "self"] = Field(
        "teacher", description="Who critiques a wrong answer: the teacher, or (SELF) the student "
                               "itself, which then also learns to critique: each update trains "
                               "it on the teacher's feedback for its critiqued answers. The "
                               "teacher decides correctness either way.")
    keep_failed: Literal["drop", "last", "reference"] = Field(
        "reference", description="Rows never judged correct: drop, keep the last attempt (not "
                                 "trained on), or train on the teacher's distilled answer. The "
                                 "default keeps in-loop updates happening when the student rarely "
                                 "passes (the tiny student against the offline teacher).")
    limit: int | None = Field(None, ge=1, description="Only N questions, taken in turn from each "
                              "category (debugging).")
    max_new_tokens: int = Field(
        128, ge=1, description="Per answer, revision or self-critique (generation's default; "
                               "kept at it to pay for the 1024-token training examples).")
    max_failed_fraction: float = Field(
        0.05, ge=0, le=1, description="Above this share of questions that got no teacher verdict, "
                                      "the stage writes its outputs and metrics, then exits "
                                      "non-zero; a re-run resumes from the cache.")
    train: RefineTrainParams = Field(default_factory=RefineTrainParams)


class SelfTrainTrainParams(TrainParams):
    """Each turn's training on that turn's pairs. Its own class, so a partial ``self_train.train``
    keeps these defaults. ``batch_size`` counts pairs (two sequences each). ``lora`` must describe
    the adapter self_train continues (refine's): it is checked against it, not applied."""

    epochs: int = Field(1, ge=1)
    batch_size: int = Field(4, ge=1, description="Pairs per micro-batch (2 sequences each).")
    lr: float = Field(5e-4, gt=0)
    # No warmup: a turn is a few steps on an already-trained adapter (the first warmup step has
    # learning rate 0).
    warmup_ratio: float = Field(0.0, ge=0, le=1, description="Warmup steps / total steps.")


class SelfTrainParams(Section):
    """METEOR 3: greedy (low compute) vs beam search (high compute) answers as preference pairs."""

    turns: int = Field(2, ge=1, description="Rounds of (regenerate pairs with the current model, "
                                            "train on them); each turn's reference is its start.")
    limit: int | None = Field(
        48, ge=1, description="Only N train questions, taken in turn from each category, each "
                              "turn (null = all); bounds the time: beam search costs about "
                              "num_beams greedy decodings.")
    num_beams: int = Field(4, ge=2, description="Beams of the high-compute answer (the paper: 10).")
    max_new_tokens: int = Field(64, ge=1, description="Answer length cap of both decodings.")
    pairing: Literal["compute", "judge"] = Field(
        "compute", description="compute: chosen = beam, rejected = greedy (the paper); judge: the "
                               "judge's position-swapped winner is chosen, ties are skipped.")
    judge_pairs: bool = Field(
        True, description="Judge every kept pair in both orders (params judge) and report how "
                          "often the high-compute answer wins; required by pairing: judge.")
    min_difference: float = Field(
        0.1, ge=0, le=1, description="Skip pairs whose answers differ less: 1 - difflib "
                                     "SequenceMatcher ratio over words (0 identical, 1 disjoint).")
    loss: Literal["dpo", "simpo", "margin"] = Field(
        "dpo", description="dpo (reference: the turn's starting adapter), simpo or METEOR's "
                           "length-normalised NLL margin (both reference-free).")
    beta: float = Field(0.1, gt=0, description="DPO beta (loss: dpo).")
    simpo_beta: float = Field(2.0, gt=0, description="SimPO beta (loss: simpo).")
    simpo_gamma: float = Field(0.5, ge=0, description="SimPO target margin gamma (loss: simpo).")
    margin: float = Field(0.0, ge=0, description="relu(NLL_chosen - NLL_rejected + margin) "
                                                 "(loss: margin; 0 = METEOR's).")
    sft_weight: float = Field(0.0, ge=0, description="Weight of an added NLL term on the chosen "
                                                     "answer (against likelihood collapse).")
    on_no_pairs: Literal["error", "pass_through"] = Field(
        "error", description="A turn with no usable pair: fail (non-zero exit), or pass the "
                             "turn's starting model through unchanged, record it and stop.")
    max_failed_fraction: float = Field(
        0.05, ge=0, le=1, description="Above this share of judged pairs that got no verdict, the "
                                      "stage writes its outputs and metrics, then exits non-zero; "
                                      "a re-run takes finished calls from the cache.")
    train: SelfTrainTrainParams = Field(default_factory=SelfTrainTrainParams)

    @model_validator(mode="after")
    def _judge_pairing(self) -> SelfTrainParams:
        if self.pairing == "judge" and not self.judge_pairs:
            raise ValueError("self_train.pairing: judge needs self_train.judge_pairs: true")
        return self


# A section that inherits every key it does not set from another, so params.yaml writes each shared
# value once: the judge is the teacher unless told otherwise, and refine keeps training the sft
# adapter, whose LoRA shape it must share. (YAML anchors / merge keys cannot do this: `dvc exp run
# -S teacher.x=...` rewrites the file with every merged key copied into the child, so the override
# silently skips the judge and the link is gone.) A stage reading a child must also list its parent
# under `params:` in dvc.yaml (tests/test_dvc_deps.py checks it).
INHERITS = {"judge": "teacher", "refine.train.lora": "sft.train.lora",
            # self_train continues refine's adapter (resolved after refine's own line above)
            "self_train.train.lora": "refine.train.lora"}


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


# --------------------------------------------------------------------------------------- merge
class MergeTrainParams(TrainParams):
    """Training of each delta (and of train@all) on top of the self-trained model. Its own
    class, so a partial ``merge.train`` in params.yaml keeps these defaults rather than sft's."""

    epochs: int = Field(1, ge=1)


class MergeParams(Section):
    """One LoRA delta per chunk of the selected data; weights by Bayesian optimisation."""

    chunk_by: Literal["file", "category", "source"] = Field(
        "file", description="Chunks: each data/selected/<chunk>.jsonl (ifd_select writes one per "
                            "category), or all selected rows regrouped by their category or "
                            "source field (distilled vs refined).")
    train: MergeTrainParams = Field(default_factory=MergeTrainParams)
    train_all: bool = Field(True, description="Also train the train@all baseline (one delta on "
                                              "all selected rows), as AutoLLM's table reports.")
    objective: Literal["nll", "judge"] = Field(
        "nll", description="Dev objective: reference-answer NLL (teacher-forced, answer tokens "
                           "only, deterministic; minimised) or the judge's mean score of greedy "
                           "dev answers (params judge and generation; maximised).")
    sampler: Literal["gp", "tpe"] = Field("gp", description="optuna GPSampler or TPESampler.")
    trials: int = Field(16, ge=0, description="Sampler trials after the seeded points (zeros, "
                                              "each one-hot, uniform 1/K, all-ones).")
    w_max: float = Field(1.0, ge=1.0, description="Upper bound of every weight (>= 1: the "
                                                  "all-ones seed must lie in the box).")
    seed: int = Field(0, description="Sampler seed.")
    recommend: Literal["best", "posterior_mean"] = Field(
        "best", description="The merge saved: the best measured trial, or the argmax of the GP "
                            "posterior mean (evaluated once as an extra trial; needs gp).")
    dev_limit: int | None = Field(None, ge=1, description="Only N dev rows, taken in turn from "
                                   "each category.")
    eval_batch_size: int = Field(8, ge=1, description="Dev sequences per forward pass (nll).")

    @model_validator(mode="after")
    def _posterior_needs_gp(self) -> MergeParams:
        if self.recommend == "posterior_mean" and self.sampler != "gp":
            raise ValueError("recommend: posterior_mean needs sampler: gp")
        return self


# ------------------------------------------------------------------------------------ evaluate
JOURNEY = ("base", "sft", "refine", "self_train", "merged")
JUDGE_CRITERIA = ("accuracy", "completeness", "relevance", "coherence", "reliability")


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
    criteria: list[str] = Field(default_factory=lambda: list(JUDGE_CRITERIA),
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
