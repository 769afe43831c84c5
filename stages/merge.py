"""Stage merge (AutoLLM, ADMIRE-BayesOpt): one LoRA delta per chunk of the selected data on top
of the self-trained model, merge weights found by Bayesian optimisation, one exact merged adapter.

Reads models/base, models/self_train (a LoRA adapter on models/base), data/selected/<chunk>.jsonl
and data/scraped/dev.jsonl. Trains one delta per chunk (``merge.chunk_by``) and the train@all
baseline with ``merge.train`` while θ_self_train is active, then searches w ∈ [0, w_max]^K for
θ_self_train + Σ w_k·Δ_k with optuna (``merge.sampler``: gp | tpe), seeded with zeros, each
one-hot, uniform 1/K and all-ones, then ``merge.trials`` sampler trials, on the dev objective
(``merge.objective``: reference-answer NLL, or the judge's score of greedy answers). Weights
change in memory (LoRA scalings); nothing is reloaded per trial. Trained deltas and the optuna
study (SQLite) are kept under ``$METEOR_CACHE_DIR`` (default ``~/.cache/meteor``) ``/merge``,
keyed by a hash of their inputs: a killed run resumes its search, a finished one is read back.

Writes models/merged/ (ONE LoRA adapter on models/base: peft's exact ``cat`` of the self_train
adapter and the weighted deltas, checked against the in-memory model after a plain
``PeftModel.from_pretrained`` reload), data/merge_trials.jsonl (every trial: role, weights,
objective, seconds switching vs evaluating), metrics/merge.json (the AutoLLM-style table: no delta,
train@all, each delta alone, average, sum, auto; the recommendation; timings) and
metrics/merge_trace.png (the search trace).

Run alone:  python stages/merge.py        (or: dvc repro merge)
"""

from __future__ import annotations

import math
import statistics
import sys
from pathlib import Path

from meteor.io import write_json, write_jsonl
from meteor.merging.report import plot_trace
from meteor.merging.run import MergeParams, reload_and_compare, run_merge
from meteor.runtime import Stage
from meteor.student.config import StudentParams
from meteor.student.generate import GenerationParams
from meteor.teacher.config import TeacherParams

BASE_DIR = Path("models/base")
SELF_TRAIN_DIR = Path("models/self_train")
SELECTED_DIR = Path("data/selected")
DEV = Path("data/scraped/dev.jsonl")
OUT_DIR = Path("models/merged")
TRIALS = Path("data/merge_trials.jsonl")
METRICS = Path("metrics/merge.json")
TRACE = Path("metrics/merge_trace.png")
# Logits of the saved adapter vs the in-memory merge, relative to the largest |logit|: rounding
# only, which grows with the logits' scale and the depth (a wrong merge rule is off by ~0.1-1).
RELATIVE_TOLERANCE = {"float32": 1e-5, "auto": 1e-5, "bfloat16": 1e-2, "float16": 2e-3}


def main() -> int:
    stage = Stage("merge", merge=MergeParams, student=StudentParams, judge=TeacherParams,
                  generation=GenerationParams)
    params = stage.params
    stage.seed(params.merge.train.seed)

    run = run_merge(params, base_dir=BASE_DIR, self_train_dir=SELF_TRAIN_DIR,
                    selected_dir=SELECTED_DIR, dev_path=DEV)
    run.model.save_merged(run.adapter_weights(run.chosen), OUT_DIR, run.tokenizer,
                          base_model_name_or_path=str(BASE_DIR))
    max_diff, logit_scale = reload_and_compare(run, OUT_DIR, BASE_DIR, dtype=params.student.dtype,
                                               trust_remote_code=params.student.trust_remote_code)
    tolerance = RELATIVE_TOLERANCE[params.student.dtype] * max(1.0, logit_scale)

    records = run.search.records
    write_jsonl(TRIALS, [r.as_row() for r in records])
    plot_trace(run.search, run.table, TRACE, run.objective_info["name"])
    timed = [r for r in records if not math.isnan(r.seconds_eval)]
    switch = statistics.mean(r.seconds_switch for r in timed) if timed else None
    evaluate = statistics.mean(r.seconds_eval for r in timed) if timed else None
    metrics = {
        "table": run.table,
        "objective": run.objective_info,
        "recommendation": run.recommendation,
        "deltas": run.deltas,
        "chunks": run.chunks,
        "rows_skipped": dict(run.rows_skipped),
        "search": {"sampler": params.merge.sampler, "trials": len(records),
                   "trials_from_store": run.search.trials_from_store,
                   "trials_run": run.search.trials_run, "study": run.search.study_name},
        "timing": {"switch_s_mean": switch, "eval_s_mean": evaluate,
                   "switch_fraction": switch / (switch + evaluate) if timed else None},
        "exactness": {"max_abs_logit_diff": max_diff, "max_abs_logit": logit_scale,
                      "relative_tolerance": RELATIVE_TOLERANCE[params.student.dtype],
                      "tolerance": tolerance},
        "seconds": {**run.seconds, "total": stage.seconds()},
    }
    write_json(METRICS, metrics)
    stage.log.info("auto merge %s: dev %s %.4f (no delta %.4f) after %d trials (%d from the store); "
                   "saved adapter matches the in-memory merge to %.2g -> %s", run.chosen,
                   run.objective_info["name"], run.chosen_objective,
                   run.table["no_delta"]["objective"], len(records), run.search.trials_from_store,
                   max_diff, OUT_DIR)
    if not max_diff <= tolerance:
        stage.log.error("the saved merge differs from the in-memory merge by %.3g (> %.2g: %.1g of "
                        "the largest |logit| %.3g)", max_diff, tolerance,
                        RELATIVE_TOLERANCE[params.student.dtype], logit_scale)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
