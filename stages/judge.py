"""Stage judge@<model>: the judge scores a model's test answers and compares them with the baseline's.

Reads data/scraped/test.jsonl, eval/answers/<model>.jsonl and eval/answers/<baseline>.jsonl
(``evaluate.baseline``; the baseline itself is only scored). With the judge of params ``judge``
(offline reference heuristic by default; any OpenAI-compatible server or a local model):
every answer is scored 1-10 on each of ``evaluate.criteria``, and every (model, baseline) pair is
compared in both orders (position swap; disagreeing orders are a tie). Replies are validated and
re-asked (``judge.json_retries``); a judgment that never validates is kept with ``ok: false``.
Calls go through the response cache, so a re-run pays for no finished call.

Writes eval/judge/<model>.jsonl (one ``score`` row per question, then one ``pair`` row per question
holding both calls: raw reply, parsed result, cache hit; see :mod:`meteor.evaluation.judge`) and
metrics/judge/<model>.json (judge calls, cache hits, tokens, cost, failed scores and pairs,
seconds). The stage report turns these into win shares, intervals and tables.

Exit status: non-zero after writing everything when the judge budget stopped the stage or no
judgment validated, so DVC does not record an incomplete run as done.

Run alone:  python stages/judge.py sft       (or: dvc repro judge@sft)
API key:    OPENAI_API_KEY from the environment only (backend openai); never written anywhere.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from meteor.evaluation.config import EvaluateParams
from meteor.evaluation.judge import judge_model
from meteor.evaluation.questions import answers_for, usable_questions
from meteor.io import read_jsonl, write_json, write_jsonl
from meteor.runtime import Stage
from meteor.teacher import make_teacher
from meteor.teacher.chat import BUDGET
from meteor.teacher.config import TeacherParams

TEST = Path("data/scraped/test.jsonl")
ANSWERS = Path("eval/answers")
OUT = Path("eval/judge")
METRICS = Path("metrics/judge")


def _calls(rows: list[dict]) -> list[dict]:
    return [c for r in rows for c in ([r["call"]] if r["kind"] == "score" else r["calls"])]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a name listed in evaluate.models")
    args = parser.parse_args(argv)
    stage = Stage("judge", evaluate=EvaluateParams, judge=TeacherParams)
    ev = stage.params.evaluate
    if args.model not in ev.models:
        parser.error(f"{args.model!r} is not in evaluate.models {ev.models}")

    # evaluate@<model> counted the skipped ones
    questions, _ = usable_questions(read_jsonl(TEST), ev.limit)
    answers = answers_for(questions, read_jsonl(ANSWERS / f"{args.model}.jsonl"), args.model)
    baseline_answers = None
    if args.model != ev.baseline:
        baseline_answers = answers_for(questions, read_jsonl(ANSWERS / f"{ev.baseline}.jsonl"),
                                       ev.baseline)
    judge = make_teacher(stage.params.judge, section="judge")
    try:
        rows = judge_model(judge, args.model, questions, answers, ev.criteria,
                           baseline=ev.baseline, baseline_answers=baseline_answers)
    finally:
        judge.close()
    out = OUT / f"{args.model}.jsonl"
    write_jsonl(out, rows)

    scores = [r for r in rows if r["kind"] == "score"]
    pairs = [r for r in rows if r["kind"] == "pair"]
    budget_stopped = any(c["error"] == BUDGET for c in _calls(rows))
    metrics = {
        "model": args.model,
        "baseline": ev.baseline,
        "judge": {"name": judge.name, **judge.stats.as_dict()},
        "scores_failed": sum(not r["ok"] for r in scores),
        "pairs_failed": sum(not r["ok"] for r in pairs),
        "scored": len(scores),
        "pairs": len(pairs),
        "budget_stopped": budget_stopped,
        "seconds": stage.seconds(),
    }
    write_json(METRICS / f"{args.model}.json", metrics)
    stage.log.info("%s: %d answers scored (%d failed), %d pairs vs %s (%d failed); %d judge "
                   "calls, %d cache hits -> %s", args.model, len(scores),
                   metrics["scores_failed"], len(pairs), ev.baseline, metrics["pairs_failed"],
                   judge.stats.calls, judge.stats.cache_hits, out)
    if budget_stopped:
        stage.incomplete("stopped by the judge budget (judge.budget_usd)")
    if not any(r["ok"] for r in rows):
        stage.incomplete("no judgment validated")
    return stage.finish(see=f"the 'error' fields of {out}")


if __name__ == "__main__":
    sys.exit(main())
