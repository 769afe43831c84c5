"""Stage refine (METEOR 2): iterative refinement with teacher feedback and in-loop fine-tuning.

Starts from models/sft (the sft adapter on models/base) and reads data/distilled.jsonl joined by id
with data/scraped/train.jsonl (the reference answer the offline teacher judges against);
``refine.limit`` distilled rows when set, taken in turn from each category; rows with ``ok: false`` are skipped and counted.
For each question the student answers with its reasoning, the teacher (params ``teacher``) returns
a verdict {correct, feedback, hints}, and a wrong answer is revised given the feedback (the
teacher's, or with ``refine.feedback: self`` the student's own critique), for at most
``refine.max_iterations`` attempts. Every ``refine.fine_tune_interval`` training rows the student
is fine-tuned on the rows since the previous update (``refine.train``; at least one real optimiser
step) and continues with the updated weights. See :mod:`meteor.refine` for the targets (final |
chain) and what ``refine.keep_failed`` does. Generation uses params ``generation`` with
``refine.max_new_tokens``.

Writes data/refined.jsonl (one row per question in question order: {id, category, title,
question, attempts: [{iteration, answer, chain, verdict, error, feedback}], final_answer, source,
passed, passed_at, outcome, error, stopped_by_context, update}), models/refine/ (adapter + tokenizer),
metrics/refine.json (pass rate after each iteration, outcomes, updates, optimiser steps, examples
trained and the share that kept their end-of-turn token, teacher calls / cache hits / failures /
cost, what determines bitwise results) and the loss curve of all updates under
dvclive/refine/.

Exit status: non-zero after writing everything when the teacher budget (cumulative over the runs
of this stage since it last completed) stopped the stage or more than
``refine.max_failed_fraction`` of the questions got no verdict, so DVC does not record an
incomplete run as done. Re-running retraces the same
trajectory (greedy generation, seeded training) and takes the finished teacher calls from the cache.

Run alone:  python stages/refine.py        (or: dvc repro refine)
API key:    OPENAI_API_KEY from the environment only (backend openai); never written anywhere.
"""

from __future__ import annotations

import sys
from pathlib import Path

from dvclive import Live

from meteor.io import atomic_path, read_jsonl, write_json, write_jsonl
from meteor.refine import (NO_ANSWER, NOT_OK, SKIP_REASONS, TEACHER_ERROR, RefineParams, refine,
                           refine_inputs)
from meteor.rows import balanced_head
from meteor.runtime import Stage
from meteor.student.config import StudentParams
from meteor.student.generate import GenerationParams
from meteor.student.load import load_student
from meteor.teacher import make_teacher
from meteor.teacher.config import TeacherParams
from meteor.training.lora import make_trainable, save_trained

SFT_DIR = Path("models/sft")
DISTILLED = Path("data/distilled.jsonl")
TRAIN = Path("data/scraped/train.jsonl")
OUT = Path("data/refined.jsonl")
OUT_DIR = Path("models/refine")
METRICS = Path("metrics/refine.json")
LOG_DIR = Path("dvclive/refine")


def main() -> int:
    stage = Stage("refine", refine=RefineParams, generation=GenerationParams,
                  teacher=TeacherParams, student=StudentParams)
    refine_params, student = stage.params.refine, stage.params.student
    stage.seed(refine_params.train.seed)

    distilled = read_jsonl(DISTILLED)
    inputs, skipped = refine_inputs(distilled, read_jsonl(TRAIN), limit=refine_params.limit)
    model, tokenizer = load_student(SFT_DIR, dtype=student.dtype,
                                    trust_remote_code=student.trust_remote_code,
                                    adapter_trainable=True)
    # refine continues the sft adapter: refine.train.lora must describe it (checked, named).
    model = make_trainable(model, refine_params.train.lora, seed=refine_params.train.seed,
                           key="refine.train.lora")
    teacher = make_teacher(stage.params.teacher, stage="refine")
    # No git side effects: the DVC stage, not DVCLive, records the experiment.
    live = Live(dir=str(LOG_DIR), save_dvc_exp=False, dvcyaml=None) if stage.is_main else None
    try:
        run = refine(model, tokenizer, teacher, inputs, refine_params, stage.params.generation,
                     live=live)
        for problem in incomplete(run.metrics(refine_params.max_iterations),
                                  refine_params.max_failed_fraction):
            stage.incomplete(problem)
        if stage.complete:  # a cumulative budget starts afresh for the next run
            teacher.stage_completed()
    finally:
        if live is not None:
            live.end()
        teacher.close()
    if not stage.is_main:  # under accelerate launch only one process writes
        return stage.finish()
    # dvc.yaml declares the curve as an output; it must exist even when no update happened.
    (LOG_DIR / "plots" / "metrics").mkdir(parents=True, exist_ok=True)

    with atomic_path(OUT_DIR, is_dir=True) as tmp_dir:
        save_trained(model, tokenizer, tmp_dir)
    write_jsonl(OUT, run.rows)
    skipped.update(run.skipped)
    metrics = {
        **run.metrics(refine_params.max_iterations),
        "rows_in": len(balanced_head(distilled, refine_params.limit)),
        "rows_skipped": {reason: skipped[reason] for reason in SKIP_REASONS},
        "teacher": {"name": teacher.name, **teacher.stats.as_dict()},
        "target": refine_params.target,
        "feedback": refine_params.feedback,
        "keep_failed": refine_params.keep_failed,
        "failed_fraction": failed_fraction(run.metrics(refine_params.max_iterations)),
        "max_failed_fraction": refine_params.max_failed_fraction,
        "complete": stage.complete,
        "seconds": stage.seconds(),
        "reproducibility": stage.reproducibility(),
    }
    write_json(METRICS, metrics)
    stage.log.info("%d questions: pass rate by iteration %s, %d updates (%d optimiser steps, %d "
                   "rows trained), %d teacher calls, %d cache hits -> %s, %s",
                   metrics["questions"], metrics["pass_rate_by_iteration"], metrics["updates"],
                   metrics["optimizer_steps"], metrics["examples_trained"],
                   metrics["teacher"]["calls"], metrics["teacher"]["cache_hits"], OUT, OUT_DIR)
    if skipped[NOT_OK] or skipped[NO_ANSWER]:
        stage.log.info("skipped distilled rows: %s", dict(skipped))
    return stage.finish(see=f"the 'error' field of {OUT}")


def failed_fraction(metrics: dict) -> float:
    """Share of questions the teacher gave no verdict for."""
    n = metrics["questions"]
    return round(metrics["outcomes"][TEACHER_ERROR] / n, 4) if n else 0.0


def incomplete(metrics: dict, max_failed_fraction: float) -> list[str]:
    """Why this run must not count as done (empty when it is complete)."""
    problems = []
    if metrics["budget_stopped"]:
        problems.append("stopped by the teacher budget (teacher.budget_usd)")
    if failed_fraction(metrics) > max_failed_fraction:
        problems.append(f"{metrics['outcomes'][TEACHER_ERROR]}/{metrics['questions']} questions "
                        f"got no teacher verdict, above refine.max_failed_fraction="
                        f"{max_failed_fraction:g}")
    return problems


if __name__ == "__main__":
    sys.exit(main())
