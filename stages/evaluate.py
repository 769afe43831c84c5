"""Stage evaluate@<model>: one model of the journey answers the test questions; objective metrics.

Loads models/<model> (a save_pretrained dir or a LoRA adapter on models/base, merged into the base
weights for speed; on the GPU when there is one) and answers every question of data/scraped/test.jsonl with the student prompt
(chat template, greedy, batched, ``evaluate.max_new_tokens`` for every model). For each question
it also computes the perplexity of the accepted answer given the question (answer tokens only, as
training encodes it) and the answer's ROUGE-L against the accepted answer.

Writes eval/answers/<model>.jsonl (one row per test question, in file order: {id, category,
answer, tokens, stopped, rouge_l, ref_nll, ref_tokens, ref_truncated}) and
metrics/evaluate/<model>.json (questions, skipped rows by reason, device, the model's content
hash, seconds). The stage judge@<model> judges these answers; the stage report summarises all.

Run alone:  python stages/evaluate.py sft        (or: dvc repro evaluate@sft)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from meteor.evaluation.answers import (answer_questions, answer_rows, for_inference,
                                      reference_nll)
from meteor.evaluation.config import EvaluateParams
from meteor.evaluation.questions import SKIP_REASONS, usable_questions
from meteor.io import read_jsonl, write_json, write_jsonl
from meteor.runtime import Stage
from meteor.student.config import StudentParams
from meteor.student.load import default_device, load_student, resolve_revision

MODELS = Path("models")
TEST = Path("data/scraped/test.jsonl")
ANSWERS = Path("eval/answers")
METRICS = Path("metrics/evaluate")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a name under models/ listed in evaluate.models")
    args = parser.parse_args(argv)
    stage = Stage("evaluate", evaluate=EvaluateParams, student=StudentParams)
    ev, student = stage.params.evaluate, stage.params.student
    if args.model not in ev.models:
        parser.error(f"{args.model!r} is not in evaluate.models {ev.models}")
    model_dir = MODELS / args.model
    if not model_dir.is_dir():
        parser.error(f"{model_dir} does not exist: run the stage that writes it first")
    stage.seed(0)  # nothing here samples; this makes the kernels deterministic

    questions, skipped = usable_questions(read_jsonl(TEST), ev.limit)
    if not questions:
        raise SystemExit(f"{TEST} has no usable question (skipped: {dict(skipped)})")
    model, tokenizer = load_student(model_dir, dtype=student.dtype,
                                    trust_remote_code=student.trust_remote_code)
    device = default_device()
    model = for_inference(model, device)

    t0 = time.perf_counter()
    generations = answer_questions(model, tokenizer, questions, ev, progress=f"{args.model} answers")
    t1 = time.perf_counter()
    nlls = reference_nll(model, tokenizer, questions, max_seq_len=ev.max_seq_len,
                         batch_size=ev.batch_size)
    t2 = time.perf_counter()
    rows = answer_rows(questions, generations, nlls)
    write_jsonl(ANSWERS / f"{args.model}.jsonl", rows)
    write_json(METRICS / f"{args.model}.json", {
        "model": args.model,
        "revision": resolve_revision(model_dir)["revision"],
        "device": device.type,
        "questions": len(questions),
        "rows_skipped": {reason: skipped[reason] for reason in SKIP_REASONS},
        "tokens_generated": sum(g.tokens for g in generations),
        "seconds": stage.seconds(),
        "seconds_generate": round(t1 - t0, 1),
        "seconds_perplexity": round(t2 - t1, 1),
    })
    stage.log.info("%s answered %d test questions on %s (%d tokens, %.1f s generation, %.1f s "
                   "perplexity) -> %s", args.model, len(questions), device.type,
                   sum(g.tokens for g in generations), t1 - t0, t2 - t1,
                   ANSWERS / f"{args.model}.jsonl")
    if sum(skipped.values()):
        stage.log.warning("skipped test rows: %s", dict(skipped))
    return 0


if __name__ == "__main__":
    sys.exit(main())
