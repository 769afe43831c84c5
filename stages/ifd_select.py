"""Stage ifd_select (Cherry LLM, Superfiltering, Selective Reflection-Tuning): the evolved student
scores every distilled and refined answer by IFD and r-IFD and keeps the most useful per chunk.

Reads data/distilled.jsonl (the teacher's answers; rows with ``"ok": false`` are skipped and
counted), data/refined.jsonl (refine's final answers; rows without one are skipped and counted),
data/scraped/train.jsonl (the questions, joined by id) and the scorer ``ifd_select.model``
(models/self_train by default, on models/base). Scores are batched on the accelerator when there
is one (:mod:`meteor.ifd`); the selection rules are in :mod:`meteor.selection`.

Writes:
  data/selected/<chunk>.jsonl  the kept rows of each chunk (categories by default), pool order,
                               each with its question, the scored answer, ``source`` and scores;
  data/ifd_scores.jsonl        every pool row with its scores, ``kept`` and ``drop_reason``
                               (the dropped rows live here, not in data/selected/);
  metrics/ifd.json             score quantiles per chunk and source, kept / dropped by reason,
                               the mix of sources kept, timings;
  metrics/ifd_hist.png         a histogram of the driving IFD by source.

Run alone:   python stages/ifd_select.py
Other scorer: python stages/ifd_select.py after setting ifd_select.model (e.g. models/refine)
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from tqdm import tqdm

from meteor.ifd import PASSES, score_rows
from meteor.io import atomic_path, read_jsonl, write_json, write_jsonl
from meteor.runtime import Stage
from meteor.selection import (POOL_SKIP_REASONS, SOURCES, IfdSelectParams, SelectionRules,
                              build_pool, plot_histogram, select, selection_metrics)
from meteor.student.config import StudentParams
from meteor.student.load import context_length, default_device, load_student

DISTILLED = Path("data/distilled.jsonl")
REFINED = Path("data/refined.jsonl")
TRAIN = Path("data/scraped/train.jsonl")
OUT_DIR = Path("data/selected")
SCORES = Path("data/ifd_scores.jsonl")
METRICS = Path("metrics/ifd.json")
HISTOGRAM = Path("metrics/ifd_hist.png")


def _json_row(row: dict) -> dict:
    """NaN / inf are not JSON: a score that could not be computed is written as null."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}


def main() -> None:
    stage = Stage("ifd_select", ifd_select=IfdSelectParams, student=StudentParams)
    p, student = stage.params.ifd_select, stage.params.student
    stage.seed(0)  # nothing is sampled; this also selects deterministic kernels

    distilled, refined, train = read_jsonl(DISTILLED), read_jsonl(REFINED), read_jsonl(TRAIN)
    pool, skipped = build_pool(distilled, refined, train)
    stage.log.info("pool: %d rows (%s)", len(pool),
                   {s: sum(r["source"] == s for r in pool) for s in SOURCES})

    model, tokenizer = load_student(p.model, dtype=student.dtype,
                                    trust_remote_code=student.trust_remote_code)
    if hasattr(model, "merge_and_unload"):  # scoring only: fold the adapter in for faster passes
        model = model.merge_and_unload()
    device = default_device()
    model.to(device)
    max_seq_len = p.max_seq_len or context_length(model, tokenizer)
    if max_seq_len is None:
        raise ValueError(f"ifd_select.max_seq_len: the scorer {p.model!r} states no context "
                         "length; set one")

    score_start = time.perf_counter()
    passes: dict = {}
    with tqdm(total=len(pool) * len(PASSES), desc="ifd passes", unit="seq") as bar:
        scores = score_rows(model, tokenizer, pool, max_seq_len=max_seq_len,
                            batch_size=p.batch_size, progress=bar.update, stats=passes)
    scoring_seconds = time.perf_counter() - score_start

    rows = [{**row, "ifd": getattr(s, p.score), **s.as_dict()} for row, s in zip(pool, scores)]
    rules = SelectionRules(max_ifd=p.max_ifd, max_r_ifd=p.max_r_ifd,
                           min_answer_tokens=p.min_answer_tokens, fraction=p.fraction,
                           chunk_by=p.chunk_by, per_question=p.per_question)
    selection = select(rows, rules)

    chunks = sorted(set(selection.chunk))
    with atomic_path(OUT_DIR, is_dir=True) as tmp_dir:
        for chunk in chunks:
            write_jsonl(tmp_dir / f"{chunk}.jsonl",
                        [_json_row(rows[i]) for i in selection.kept_indices
                         if selection.chunk[i] == chunk])
    write_jsonl(SCORES, [_json_row({**row, "kept": selection.kept(i),
                                    "drop_reason": selection.drop_reason[i]})
                         for i, row in enumerate(rows)])
    with atomic_path(HISTOGRAM) as tmp:
        plot_histogram(rows, tmp, score_name=p.score, max_ifd=p.max_ifd)

    metrics = {
        **selection_metrics(rows, selection),
        "rows_in": {"distilled": len(distilled), "refined": len(refined)},
        "rows_skipped": {s: {r: skipped[s][r] for r in POOL_SKIP_REASONS} for s in SOURCES},
        "score": p.score,
        "max_seq_len": max_seq_len,
        "answers_truncated": sum(r["answer_tokens"] < r["answer_tokens_total"] for r in rows),
        "questions_truncated": sum(r["question_tokens"] < r["question_tokens_total"] for r in rows),
        "device": device.type,
        "passes": passes,  # sequences requested / run once each, tokens fed to the scorer
        "scoring_seconds": round(scoring_seconds, 1),
        "rows_per_second": round(len(rows) / scoring_seconds, 1) if scoring_seconds else None,
        "seconds": stage.seconds(),
    }
    write_json(METRICS, metrics)
    empty = [c for c in chunks if not any(selection.chunk[i] == c for i in selection.kept_indices)]
    if empty:
        stage.log.warning("chunks with no row kept: %s", empty)
    stage.log.info("kept %d of %d rows (%s) in %d chunks -> %s; scoring %.1fs",
                   len(selection.kept_indices), len(rows), metrics["kept_by_source"], len(chunks),
                   OUT_DIR, scoring_seconds)


if __name__ == "__main__":
    main()
