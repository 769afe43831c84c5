"""Stage report: the evaluation report of the whole journey.

Reads, for every model of ``evaluate.models`` (in order), eval/answers/<model>.jsonl and
eval/judge/<model>.jsonl, and computes per model: reference perplexity, ROUGE-L, answer length and
stop rate (overall and per category), the mean judge score per criterion and overall, and against
``evaluate.baseline``: win share per criterion (ties split; disagreeing orders are ties), position
consistency, mean-score difference, each with a seeded bootstrap interval over questions
(``evaluate.bootstrap``). Failed judgments are excluded and counted.

Writes eval/report.md (the METEOR-format table, the journey table, per-category table, judgment
counts), eval/judgments.jsonl (every judgment of every model, in journey order), eval/journey.json
and eval/win_share.json (the ``dvc plots`` data), eval/journey.png and metrics/eval.json (``sft.win_share.accuracy``,
``refine.rouge_l``, ``merged.ppl``, ...; compare commits with ``dvc metrics diff``).

Run alone:  python stages/report.py       (or: dvc repro report)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from meteor.evaluation.report import (eval_metrics, journey_points, plot_journey, render_report,
                                      summarize)
from meteor.evaluation.config import EvaluateParams
from meteor.io import atomic_path, read_jsonl, write_json, write_jsonl
from meteor.runtime import Stage

ANSWERS = Path("eval/answers")
JUDGE = Path("eval/judge")
REPORT = Path("eval/report.md")
JUDGMENTS = Path("eval/judgments.jsonl")
JOURNEY = Path("eval/journey.json")
WIN_SHARE = Path("eval/win_share.json")
PLOT = Path("eval/journey.png")
METRICS = Path("metrics/eval.json")


def main() -> int:
    stage = Stage("report", evaluate=EvaluateParams)
    ev = stage.params.evaluate
    answers = {m: read_jsonl(ANSWERS / f"{m}.jsonl") for m in ev.models}
    judgments = {m: read_jsonl(JUDGE / f"{m}.jsonl") for m in ev.models}
    results = summarize(ev.models, ev.baseline, answers, judgments, ev.criteria, ev.bootstrap)
    judge_names = sorted({r["judge"] for rows in judgments.values() for r in rows})
    if len(judge_names) > 1:
        raise SystemExit(f"the models were judged by different judges {judge_names}: re-run the "
                         "judge stages (dvc repro)")

    text = render_report(results, baseline=ev.baseline, criteria=ev.criteria,
                         judge_name=judge_names[0] if judge_names else "none",
                         bootstrap=ev.bootstrap, max_new_tokens=ev.max_new_tokens)
    with atomic_path(REPORT) as tmp:
        tmp.write_text(text, encoding="utf-8")
    write_jsonl(JUDGMENTS, (r for m in ev.models for r in judgments[m]))
    points, shares = journey_points(results)
    for path, data in ((JOURNEY, points), (WIN_SHARE, shares)):
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    with atomic_path(PLOT) as tmp:
        plot_journey(results, tmp, baseline=ev.baseline)
    metrics = eval_metrics(results, ev.criteria)
    write_json(METRICS, metrics)
    for r in results:
        stage.log.info("%s: ppl %s, ROUGE-L %.3f, judge score %s%s", r.name,
                       metrics[r.name].get("ppl"), metrics[r.name]["rouge_l"],
                       metrics[r.name].get("judge_score"),
                       f", win share vs {ev.baseline} {metrics[r.name]['win_share']['overall']:.3f}"
                       if "win_share" in metrics[r.name] else "")
    stage.log.info("-> %s, %s, %s, %s", REPORT, METRICS, JUDGMENTS, PLOT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
