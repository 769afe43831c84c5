"""The merge method end to end: deltas, search, AutoLLM-style table, the chosen merge.

1. Load the base model with the self-trained adapter (:class:`~.deltas.DeltaModel`).
2. Train one LoRA delta per chunk of the selected data, and the train@all baseline (one delta on
   all selected rows), each on top of θ_self_train with the shared training loop. Trained deltas
   are kept in the per-user cache (``meteor.paths.cache_root() / "merge"``), keyed by a hash of
   what they are trained from, so a resumed or repeated run reuses exactly the same deltas.
3. Search the weights (:mod:`.search`) on the dev objective (:mod:`.objective`).
4. Report no delta, train@all, each delta alone, average, sum and auto (the recommendation).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal
from pathlib import Path
from types import SimpleNamespace

import torch
from peft import PeftModel
from pydantic import Field, model_validator

from meteor.io import read_jsonl
from meteor.rows import balanced_head
from meteor.params import Section
from meteor.paths import cache_root
from meteor.student.load import default_device, directory_hash, load_student
from meteor.training.data import answer_examples
from meteor.training.loop import train
from meteor.training.config import TrainParams
from meteor.merging.chunks import load_chunks
from meteor.merging.deltas import DeltaModel, delta_adapter_name
from meteor.merging.objective import AnswerNLL, JudgeScore
from meteor.merging.search import SearchResult, run_search, stable_hash


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

log = logging.getLogger(__name__)

TRAIN_ALL = "train_all"  # adapter name of the train@all baseline
# Bump when the meaning of a stored delta or trial changes (e.g. the objective's definition).
CACHE_VERSION = 1


@dataclass
class MergeRun:
    model: DeltaModel
    tokenizer: object
    chunks: list[str]
    search: SearchResult
    table: dict[str, dict]
    chosen: dict[str, float]  # chunk -> weight of the recommended merge
    chosen_objective: float
    recommendation: dict
    deltas: dict[str, dict]
    objective_info: dict
    seconds: dict[str, float]
    rows_skipped: Counter = field(default_factory=Counter)
    objective: object = None

    def adapter_weights(self, weights: dict[str, float]) -> dict[str, float]:
        return {delta_adapter_name(c): w for c, w in weights.items()}


def merge_cache_dir() -> Path:
    return cache_root() / "merge"


def run_merge(params: SimpleNamespace, *, base_dir: str | Path, self_train_dir: str | Path,
              selected_dir: str | Path, dev_path: str | Path,
              cache_dir: str | Path | None = None) -> MergeRun:
    mp = params.merge
    start = time.perf_counter()
    cache_dir = Path(cache_dir) if cache_dir is not None else merge_cache_dir()
    chunks, skipped = load_chunks(selected_dir, mp.chunk_by)
    dev_rows = balanced_head(read_jsonl(dev_path), mp.dev_limit)
    if not dev_rows:
        raise ValueError(f"{dev_path}: no dev rows to score merges on")

    base, tokenizer = load_student(base_dir, dtype=params.student.dtype,
                                   trust_remote_code=params.student.trust_remote_code)
    base.to(default_device())
    dm = DeltaModel.from_self_train(base, self_train_dir)
    hashes = {"base": directory_hash(base_dir), "self_train": directory_hash(self_train_dir)}

    # --- deltas -----------------------------------------------------------------------------
    to_train = [(delta_adapter_name(c), c, rows) for c, rows in chunks.items()]
    if mp.train_all:
        to_train.append((TRAIN_ALL, "all", [r for rows in chunks.values() for r in rows]))
    deltas: dict[str, dict] = {}
    delta_keys: dict[str, str] = {}
    for adapter, label, rows in to_train:
        key = stable_hash({"version": CACHE_VERSION, **hashes, "rows": rows,
                           "train": mp.train.model_dump(), "dtype": params.student.dtype})
        delta_keys[label] = key
        path = cache_dir / "deltas" / key
        examples, row_skips = answer_examples(rows)
        info = {"rows": len(rows), "examples": len(examples),
                "rows_skipped": dict(row_skips), "from_cache": path.is_dir()}
        if path.is_dir():
            dm.load_delta(adapter, path)
            log.info("delta %s: reused from the cache (%s)", label, key[:12])
        else:
            if not examples:
                raise ValueError(f"chunk {label}: no usable rows to train a delta on "
                                 f"(skipped: {dict(row_skips)})")
            dm.add_delta(adapter, mp.train.lora, seed=mp.train.seed)
            dm.training_mode(adapter)
            result = train(dm.model, tokenizer, examples, mp.train, desc=f"delta {label}")
            dm.set_weights({})
            dm.save_delta(adapter, path)
            info.update(final_loss=result.final_loss, first_loss=result.loss_history[0],
                        steps=result.steps, train_seconds=round(result.seconds, 3))
        deltas[label] = info
    dm.set_weights({})
    t_deltas = time.perf_counter() - start

    # --- objective and search ---------------------------------------------------------------
    if mp.objective == "nll":
        objective = AnswerNLL(tokenizer, dev_rows, max_seq_len=mp.train.max_seq_len,
                              batch_size=mp.eval_batch_size)
        objective_info = {"name": "nll", "direction": objective.direction,
                          "dev_rows": len(dev_rows), "dev_answer_tokens": objective.tokens,
                          **objective.data_stats}
        key_objective: dict = {}
    else:
        from meteor.student.generate import generation_kwargs
        from meteor.teacher import make_teacher

        judge = make_teacher(params.judge, section="judge")
        objective = JudgeScore(judge, tokenizer, dev_rows, generation_kwargs(params.generation))
        objective_info = {"name": "judge", "direction": objective.direction,
                          "dev_rows": len(objective.rows), "judge": judge.name}
        key_objective = {"judge": params.judge.model_dump(),
                         "generation": params.generation.model_dump()}
    names = list(chunks)

    def evaluate(weights: dict[str, float]) -> tuple[float, float, float]:
        t0 = time.perf_counter()
        dm.set_weights({delta_adapter_name(c): w for c, w in weights.items()})
        t1 = time.perf_counter()
        value = objective(dm.model)
        return value, t1 - t0, time.perf_counter() - t1

    search_params = mp.model_dump(exclude={"train_all", "recommend"})
    study_key = stable_hash({"version": CACHE_VERSION, "deltas": {c: delta_keys[c] for c in names},
                             "dev": dev_rows, "merge": search_params,
                             "dtype": params.student.dtype, **key_objective})
    search_start = time.perf_counter()
    try:
        result = run_search(
            evaluate, names, storage_path=cache_dir / "studies" / f"{study_key[:32]}.db",
            study_name=f"merge-{study_key[:16]}", direction=objective.direction, w_max=mp.w_max,
            trials=mp.trials, sampler=mp.sampler, seed=mp.seed,
            deterministic=mp.objective == "nll")
        table = _table(result, names, dm, objective, train_all=mp.train_all)
    finally:
        if isinstance(objective, JudgeScore):
            objective.judge.close()
    if isinstance(objective, JudgeScore):
        objective_info.update(judge_failures=objective.failures,
                              judge_calls=objective.judge.stats.as_dict())

    recommendation = recommend(result, mp.recommend, objective_name=mp.objective)
    chosen = recommendation["weights"]
    table["auto"] = {"weights": chosen, "objective": recommendation["objective"],
                     "trial": recommendation["trial"], "trials": len(result.records)}
    dm.set_weights({delta_adapter_name(c): w for c, w in chosen.items()})
    seconds = {"deltas": round(t_deltas, 3),
               "search": round(time.perf_counter() - search_start, 3),
               "total": round(time.perf_counter() - start, 3)}
    return MergeRun(model=dm, tokenizer=tokenizer, chunks=names, search=result, table=table,
                    chosen=chosen, chosen_objective=recommendation["objective"],
                    recommendation=recommendation, deltas=deltas, objective_info=objective_info,
                    seconds=seconds, rows_skipped=skipped, objective=objective)


def _table(result: SearchResult, names: list[str], dm: DeltaModel, objective, *,
           train_all: bool) -> dict[str, dict]:
    """AutoLLM's rows: no delta, train@all, each delta alone, average (1/K), sum (all ones)."""
    def row(weights: dict[str, float]) -> dict:
        point = result.find_point(weights)  # every one of these is a seeded trial
        return {"weights": point.weights, "objective": point.objective, "trial": point.number}

    table = {"no_delta": row({n: 0.0 for n in names})}
    if train_all:
        t0 = time.perf_counter()
        dm.set_weights({TRAIN_ALL: 1.0})
        table["train_all"] = {"weights": {"all": 1.0}, "objective": objective(dm.model),
                              "trial": None, "seconds_eval": round(time.perf_counter() - t0, 3)}
    for n in names:
        table[f"delta_{n}"] = row({m: float(m == n) for m in names})
    table["average"] = row({n: 1.0 / len(names) for n in names})
    table["sum"] = row({n: 1.0 for n in names})
    return table


def recommend(result: SearchResult, policy: str, *, objective_name: str) -> dict:
    """The recommended weights: the best measured trial, or the GP posterior-mean point."""
    best = result.best
    pm = result.posterior_mean
    out = {"policy": policy, "best_trial": {"trial": best.number, "role": best.role,
                                            "weights": best.weights, "objective": best.objective}}
    if pm is not None:
        out["posterior_mean"] = {"weights": pm.weights, "predicted": pm.predicted,
                                 "measured": pm.measured, "trial": pm.trial}
        out["agree"] = pm.trial == best.number
    if policy == "posterior_mean":
        if pm is None:
            raise ValueError("merge.recommend: posterior_mean needs merge.sampler: gp")
        out.update(chosen="posterior_mean", weights=pm.weights, objective=pm.measured,
                   trial=pm.trial,
                   reason="merge.recommend=posterior_mean: the argmax of the GP posterior mean "
                          "(ADMIRE-BayesOpt) averages out noise in the observed objective")
    else:
        if objective_name == "nll":
            why = ("the dev NLL is deterministic, so the best measured trial is exact, while the "
                   "posterior mean is a model estimate")
        else:
            why = "merge.recommend=best: the best measured trial"
        if pm is not None and pm.trial == best.number:
            why += "; the posterior-mean point, measured, is that trial"
        out.update(chosen="best", weights=best.weights, objective=best.objective,
                   trial=best.number, reason=why)
    return out


def reload_and_compare(run: MergeRun, out_dir: str | Path, base_dir: str | Path, *,
                       dtype: str, trust_remote_code: bool) -> tuple[float, float]:
    """Max |logit difference| between the saved adapter (plain ``PeftModel.from_pretrained``
    on a freshly loaded base) and the in-memory weighted model on the first dev batch, and the
    max |logit| of the in-memory model there (the scale rounding errors grow with)."""
    if not isinstance(run.objective, AnswerNLL):
        # The judge objective has no token batches; build a small one from the dev answers.
        batch = None
    else:
        batch = run.objective.batches[0]
    if batch is None:
        ids = run.tokenizer("A merge is checked on this text.", return_tensors="pt")
        batch = {"input_ids": ids["input_ids"], "attention_mask": ids["attention_mask"]}
    device = next(run.model.model.parameters()).device
    inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask")}
    run.model.set_weights(run.adapter_weights(run.chosen))
    with torch.inference_mode():
        expected = run.model.model(**inputs).logits.float()
        fresh, _ = load_student(base_dir, dtype=dtype, trust_remote_code=trust_remote_code)
        saved = PeftModel.from_pretrained(fresh.to(device), str(out_dir)).eval()
        got = saved(**inputs).logits.float()
    mask = inputs["attention_mask"].bool()
    return float((got - expected).abs()[mask].max()), float(expected.abs()[mask].max())
