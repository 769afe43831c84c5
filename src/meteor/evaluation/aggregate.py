"""From judgment rows (see :mod:`.judge`) to the numbers of the report.

- Win share per criterion (METEOR's table): a question counts 1 for a model win, 1/2 for a tie
  (including a tie because the two orders disagreed) and 0 for a loss, so
  ``share = (wins + ties / 2) / compared`` and the model's and the baseline's shares sum to 1.
  The overall win share is the mean over criteria of the per-criterion shares (equivalently, a
  per-question outcome averaged over criteria, then over questions).
- Position consistency: the share of (question, criterion) pairs where the two orders named the
  same winner (a tie in both counts as agreeing).
- Mean judge score: over criteria and successfully scored questions (1-10).
- Mean-score difference vs the baseline: paired by question (both scored), model minus baseline.

Intervals: percentile bootstrap over questions (resample the test questions with replacement,
recompute the statistic), seeded, so the same judgments always give the same intervals. With
28 test questions they are wide; they say how much the test split can tell apart.

Objective metrics (from the answer rows of :mod:`.answers`): corpus perplexity of the reference
answers ``exp(total NLL / total tokens)``, mean ROUGE-L, mean length, stop rate; overall and per
category.

Failed judgments are excluded from every average and reported as counts; a statistic over zero
judgments is ``None`` (never 0).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from meteor.categories import CATEGORIES
from meteor.evaluation.config import BootstrapParams

OUTCOME = {"model": 1.0, "tie": 0.5, "baseline": 0.0}
OVERALL = "overall"


def bootstrap_interval(values: Sequence[float] | np.ndarray, params: BootstrapParams
                       ) -> tuple[float, float] | None:
    """Percentile interval of the mean of ``values`` (one per question); ``None`` when empty."""
    values = np.asarray(values, dtype=float)
    if values.size == 0:
        return None
    rng = np.random.default_rng(params.seed)
    idx = rng.integers(0, values.size, size=(params.samples, values.size))
    means = values[idx].mean(axis=1)
    alpha = 1.0 - params.confidence
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def _stat(values: np.ndarray, params: BootstrapParams) -> dict:
    interval = bootstrap_interval(values, params)
    return {"value": float(values.mean()) if values.size else None,
            "low": interval[0] if interval else None, "high": interval[1] if interval else None}


def win_shares(pair_rows: Sequence[dict], criteria: Sequence[str], params: BootstrapParams) -> dict:
    """Per criterion and overall: wins, losses, ties, compared, share with its interval; the
    position consistency; ``failed`` = pairs excluded because a call never validated."""
    rows = [r for r in pair_rows if r["kind"] == "pair"]
    ok = [r for r in rows if r["ok"]]
    out: dict = {"compared": len(ok), "failed": len(rows) - len(ok), "criteria": {}}
    outcomes = np.array([[OUTCOME[r["winners"][c]] for c in criteria] for r in ok],
                        dtype=float).reshape(len(ok), len(criteria))
    consistent = np.array([[r["consistent"][c] for c in criteria] for r in ok],
                          dtype=float).reshape(len(ok), len(criteria))
    for k, c in enumerate(criteria):
        winners = [r["winners"][c] for r in ok]
        out["criteria"][c] = {
            "wins": winners.count("model"), "losses": winners.count("baseline"),
            "ties": winners.count("tie"), "share": _stat(outcomes[:, k], params),
            "consistency": float(consistent[:, k].mean()) if ok else None,
        }
    out[OVERALL] = {"share": _stat(outcomes.mean(axis=1) if ok else np.array([]), params),
                    "consistency": float(consistent.mean()) if ok else None}
    return out


def _scores_by_id(score_rows: Sequence[dict]) -> dict:
    return {r["id"]: r["scores"] for r in score_rows if r["kind"] == "score" and r["ok"]}


def mean_scores(score_rows: Sequence[dict], criteria: Sequence[str]) -> dict:
    """Mean judge score per criterion and overall (over criteria and questions), with counts."""
    rows = [r for r in score_rows if r["kind"] == "score"]
    scored = list(_scores_by_id(rows).values())
    out = {"scored": len(scored), "failed": len(rows) - len(scored), "criteria": {}}
    for c in criteria:
        out["criteria"][c] = float(np.mean([s[c] for s in scored])) if scored else None
    out[OVERALL] = float(np.mean([[s[c] for c in criteria] for s in scored])) if scored else None
    return out


def score_differences(model_rows: Sequence[dict], baseline_rows: Sequence[dict],
                      criteria: Sequence[str], params: BootstrapParams) -> dict:
    """Model minus baseline judge score, paired by question, per criterion and overall (the mean
    over criteria), each with its bootstrap interval; ``paired`` questions had both scored."""
    model, baseline = _scores_by_id(model_rows), _scores_by_id(baseline_rows)
    ids = [i for i in model if i in baseline]  # model_rows' order: deterministic
    diffs = np.array([[model[i][c] - baseline[i][c] for c in criteria] for i in ids],
                     dtype=float).reshape(len(ids), len(criteria))
    out = {"paired": len(ids), "criteria": {}}
    for k, c in enumerate(criteria):
        out["criteria"][c] = _stat(diffs[:, k], params)
    out[OVERALL] = _stat(diffs.mean(axis=1) if ids else np.array([]), params)
    return out


def _summary(rows: Sequence[dict]) -> dict:
    scored = [r for r in rows if r["ref_tokens"] > 0]
    tokens = sum(r["ref_tokens"] for r in scored)
    return {
        "n": len(rows),
        "ppl": math.exp(sum(r["ref_nll"] for r in scored) / tokens) if tokens else None,
        "rouge_l": sum(r["rouge_l"] for r in rows) / len(rows),
        "length": sum(r["tokens"] for r in rows) / len(rows),
        "stop_rate": sum(bool(r["stopped"]) for r in rows) / len(rows),
        "ref_tokens": tokens,
        "ref_truncated": sum(bool(r["ref_truncated"]) for r in rows),
        "ref_unscored": len(rows) - len(scored),
    }


def objective_metrics(rows: Sequence[dict]) -> dict[str, dict]:
    """``{"overall": {...}, "<category>": {...}}``: n, ppl, rouge_l, length (tokens), stop_rate,
    and how many reference answers were truncated or lay entirely beyond ``max_seq_len``."""
    if not rows:
        raise ValueError("no answers to summarise")
    out = {OVERALL: _summary(rows)}
    present = {str(r["category"]) for r in rows}
    known = [c for c in CATEGORIES if c in present]  # the usual ML, DL, NLP, CV order
    for category in known + sorted(present - set(known)):
        out[category] = _summary([r for r in rows if str(r["category"]) == category])
    return out
