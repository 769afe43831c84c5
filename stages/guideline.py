"""Stage guideline (METEOR 1a): the base student writes a numbered answer guideline per question.

Reads models/base and data/scraped/train.jsonl (``guideline.limit`` questions when set, taken in
turn from each category).
The student, prompted as an expert of the question's field, does not answer: it lists what a
precise answer needs (scope, definitions, steps, pitfalls, resources). Batched, chat-templated
generation with params ``generation`` (greedy by default) and ``guideline.max_new_tokens``.
Writes data/guidelines.jsonl ({id, category, title, question, guideline, degenerate}, one row per
question in question order; a degenerate guideline keeps its row, with the reason) and
metrics/guideline.json (count, length stats, degenerate by reason, truncated prompts, seconds).

Run alone:  python stages/guideline.py        (or: dvc repro guideline)
"""

from __future__ import annotations

from pathlib import Path

from meteor.guideline import GuidelineParams, write_guidelines
from meteor.io import read_jsonl, write_json, write_jsonl
from meteor.rows import balanced_head
from meteor.runtime import Stage
from meteor.student.config import StudentParams
from meteor.student.generate import GenerationParams
from meteor.student.load import load_student

BASE_DIR = Path("models/base")
TRAIN = Path("data/scraped/train.jsonl")
OUT = Path("data/guidelines.jsonl")
METRICS = Path("metrics/guideline.json")


def main() -> dict:
    stage = Stage("guideline", guideline=GuidelineParams, generation=GenerationParams,
                  student=StudentParams)
    p = stage.params
    stage.seed(p.generation.seed)

    questions = balanced_head(read_jsonl(TRAIN), p.guideline.limit)  # None: every question
    model, tokenizer = load_student(BASE_DIR, dtype=p.student.dtype,
                                    trust_remote_code=p.student.trust_remote_code)
    run = write_guidelines(model, tokenizer, questions, generation=p.generation,
                           max_new_tokens=p.guideline.max_new_tokens)
    write_jsonl(OUT, run.rows)
    metrics = run.metrics(p.guideline.max_new_tokens)
    write_json(METRICS, metrics)
    stage.log.info("%d guidelines (%d usable) -> %s", metrics["count"], metrics["usable"], OUT)
    return metrics


if __name__ == "__main__":
    main()
