"""Stage distill (METEOR 1b): the teacher answers each train question following its guideline.

Reads data/guidelines.jsonl (``distill.limit`` rows when set, taken in turn from each category) and joins each row to its
question in data/scraped/train.jsonl by id. The teacher (params ``teacher``: offline by default,
or an OpenAI-compatible endpoint, or a local HF model) gets field, guideline, title and body; a
degenerate guideline is replaced by none. Ablation: the first ``distill.ablation_size`` questions
whose guideline was used are also distilled without it and the judge (params ``judge``) scores
both sets 1-10 (means are null when no question had a usable guideline).
Writes data/distilled.jsonl ({id, category, title, question, guideline, guideline_degenerate,
answer, ok, error, teacher, usage}; every question has a row, failed calls have ok=false and the
reason) and metrics/distill.json (quality with vs without guideline, teacher and judge calls,
cache hits, tokens, cost, failures).

Exit status: non-zero after writing both files when a budget (``teacher.budget_usd`` or
``judge.budget_usd``, cumulative over the runs of this stage since it last completed) stopped the
stage, or when more than ``distill.max_failed_fraction`` of the rows failed or of the ablation
sample could not be compared, so DVC does not record an incomplete run as done. Finished calls
are in the teacher cache: re-running resumes, paying only for what is missing.

Run alone:  python stages/distill.py        (or: dvc repro distill)
API key:    OPENAI_API_KEY from the environment only (backend openai); never written anywhere.
"""

from __future__ import annotations

import sys
from pathlib import Path

from meteor.distill import (DistillParams, distill_inputs, distill_metrics, distill_rows,
                            guideline_ablation)
from meteor.io import read_jsonl, write_json, write_jsonl
from meteor.runtime import Stage
from meteor.teacher import make_teacher
from meteor.teacher.config import TeacherParams

GUIDELINES = Path("data/guidelines.jsonl")
TRAIN = Path("data/scraped/train.jsonl")
OUT = Path("data/distilled.jsonl")
METRICS = Path("metrics/distill.json")


def main() -> int:
    stage = Stage("distill", distill=DistillParams, teacher=TeacherParams, judge=TeacherParams)
    p = stage.params
    max_failed = p.distill.max_failed_fraction
    inputs = distill_inputs(read_jsonl(GUIDELINES), read_jsonl(TRAIN), limit=p.distill.limit)
    teacher = make_teacher(p.teacher, stage="distill")
    try:
        judge = make_teacher(p.judge, section="judge", stage="distill")
        try:
            rows = distill_rows(teacher, inputs)
            ablation = guideline_ablation(teacher, judge, inputs, rows, p.distill.ablation_size)
            metrics = distill_metrics(rows, ablation, teacher, judge, stage.seconds())
            metrics["max_failed_fraction"] = max_failed
            for problem in incomplete(metrics, max_failed):
                stage.incomplete(problem)
            metrics["complete"] = stage.complete
            if stage.complete:  # a cumulative budget starts afresh for the next run
                teacher.stage_completed()
                judge.stage_completed()
        finally:
            judge.close()
    finally:
        teacher.close()

    write_jsonl(OUT, rows)
    write_json(METRICS, metrics)
    quality = metrics["quality"]
    stage.log.info("%d rows (%d failed) -> %s; judge quality with guideline %s vs without %s "
                   "(n=%d)", metrics["rows"], metrics["failed"], OUT, quality["with_guideline"],
                   quality["without_guideline"], quality["n"])
    return stage.finish()


def incomplete(metrics: dict, max_failed_fraction: float) -> list[str]:
    """Why this run must not count as done (empty when it is complete)."""
    problems = []
    if metrics["budget_stopped"]:
        problems.append("stopped by the budget (teacher.budget_usd / judge.budget_usd)")
    if metrics["rows"] and metrics["failed_fraction"] > max_failed_fraction:
        problems.append(f"{metrics['failed']}/{metrics['rows']} rows failed "
                        f"({metrics['failed_by_reason']}), above distill.max_failed_fraction="
                        f"{max_failed_fraction:g}")
    if metrics["ablation_failed_fraction"] > max_failed_fraction:
        problems.append(f"{metrics['ablation_failed_fraction']:.0%} of the ablation sample could "
                        f"not be compared ({metrics['ablation_failures']}), above "
                        f"distill.max_failed_fraction={max_failed_fraction:g}")
    return problems


if __name__ == "__main__":
    sys.exit(main())
