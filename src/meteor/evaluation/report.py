"""The evaluation report: tables (pandas), ``metrics/eval.json``, the journey plot.

Input per model: its answer rows (``eval/answers/<model>.jsonl``, with the per-question objective
measures) and its judgment rows (``eval/judge/<model>.jsonl``). Everything here is recomputed
from those rows, deterministically, so the report of a commit can be rebuilt from its outputs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd

from meteor.evaluation.aggregate import (OVERALL, mean_scores, objective_metrics, score_differences,
                                        win_shares)
from meteor.evaluation.config import BootstrapParams

DASH = "—"


@dataclass
class ModelResult:
    """Everything the report says about one model of the journey."""

    name: str
    objective: dict  # objective_metrics(): overall + per category
    scores: dict  # mean_scores(): overall + per criterion, scored / failed
    scores_by_category: dict[str, float | None]
    shares: dict | None  # win_shares() vs the baseline; None for the baseline itself
    diff: dict | None  # score_differences() vs the baseline
    judgments: int
    cached: int  # judge calls answered from the cache


def _calls(rows: Sequence[dict]) -> list[dict]:
    return [c for r in rows for c in ([r["call"]] if r["kind"] == "score" else r["calls"])]


def summarize(models: Sequence[str], baseline: str, answers: dict[str, list[dict]],
              judgments: dict[str, list[dict]], criteria: Sequence[str],
              bootstrap: BootstrapParams) -> list[ModelResult]:
    """One :class:`ModelResult` per model, in journey order."""
    missing = [m for m in models if m not in answers or m not in judgments]
    if missing:
        raise ValueError(f"no answers or judgments for models {missing}")
    ids = [r["id"] for r in answers[baseline]]
    for m in models:
        if [r["id"] for r in answers[m]] != ids:
            raise ValueError(f"{m} answered other questions than {baseline}: re-run evaluate@{m}")
    results = []
    for m in models:
        rows = judgments[m]
        objective = objective_metrics(answers[m])
        by_category = {c: mean_scores([r for r in rows if str(r["category"]) == c],
                                      criteria)[OVERALL] for c in objective if c != OVERALL}
        is_base = m == baseline
        results.append(ModelResult(
            name=m,
            objective=objective,
            scores=mean_scores(rows, criteria),
            scores_by_category=by_category,
            shares=None if is_base else win_shares(rows, criteria, bootstrap),
            diff=None if is_base else score_differences(rows, judgments[baseline], criteria,
                                                        bootstrap),
            judgments=len(_calls(rows)),
            cached=sum(bool(c["cached"]) for c in _calls(rows)),
        ))
    return results


# ------------------------------------------------------------------------------- formatting
def _num(x: float | None, digits: int = 2) -> str:
    return DASH if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _pct(x: float | None) -> str:
    return DASH if x is None else f"{100 * x:.1f} %"


def _pct_ci(stat: dict, *, complement: bool = False) -> str:
    """``62.5 % [45.0, 80.0]``; ``complement`` gives the other side's share (1 - x)."""
    v, lo, hi = stat["value"], stat["low"], stat["high"]
    if v is None:
        return DASH
    if complement:
        v, lo, hi = 1 - v, 1 - hi, 1 - lo
    return f"{100 * v:.1f} % [{100 * lo:.1f}, {100 * hi:.1f}]"


def _diff_ci(stat: dict) -> str:
    if stat["value"] is None:
        return DASH
    return f"{stat['value']:+.2f} [{stat['low']:+.2f}, {stat['high']:+.2f}]"


def verdict(shares: dict | None, baseline: str) -> str:
    """Plain words from the overall win-share interval (does it exclude 50 %?)."""
    if shares is None:
        return "reference"
    s = shares[OVERALL]["share"]
    if s["value"] is None:
        return "not judged (every comparison failed)"
    if s["low"] > 0.5:
        return f"better than {baseline}"
    if s["high"] < 0.5:
        return f"worse than {baseline}"
    return f"not distinguishable from {baseline}"


# ----------------------------------------------------------------------------------- tables
def meteor_table(results: Sequence[ModelResult], baseline: str, criteria: Sequence[str]
                 ) -> pd.DataFrame:
    """METEOR's table: per model a row pair, "<model> w/o journey" (the baseline's side) and
    "<model>", with each criterion's win share [CI] and the mean judge score."""
    base = next(r for r in results if r.name == baseline)
    rows = []
    for r in results:
        if r.shares is None:
            continue
        for label, side, score in ((f"{r.name} w/o journey ({baseline})", True,
                                    base.scores[OVERALL]),
                                   (r.name, False, r.scores[OVERALL])):
            row = {"model": label}
            for c in criteria:
                row[c] = _pct_ci(r.shares["criteria"][c]["share"], complement=side)
            row["judge score"] = _num(score)
            rows.append(row)
    return pd.DataFrame(rows, columns=["model", *criteria, "judge score"])


def journey_table(results: Sequence[ModelResult], baseline: str, confidence: float = 0.95
                  ) -> pd.DataFrame:
    """One row per model: objective metrics, judge score and the comparison with the baseline."""
    ci = f"[{100 * confidence:g} % CI]"
    rows = []
    for r in results:
        o = r.objective[OVERALL]
        failed = r.scores["failed"] + (r.shares["failed"] if r.shares else 0)
        rows.append({
            "model": r.name,
            "ref. PPL ↓": _num(o["ppl"]),
            "ROUGE-L": _num(o["rouge_l"], 3),
            "length (tokens)": _num(o["length"], 1),
            "stop rate": _pct(o["stop_rate"]),
            "judge score (1-10)": _num(r.scores[OVERALL]),
            f"Δ score vs {baseline} {ci}": _diff_ci(r.diff[OVERALL]) if r.diff else DASH,
            f"win share vs {baseline} {ci}": (_pct_ci(r.shares[OVERALL]["share"])
                                                   if r.shares else DASH),
            "position consistency": _pct(r.shares[OVERALL]["consistency"]) if r.shares else DASH,
            "verdict": verdict(r.shares, baseline),
            "judge failures": str(failed),
        })
    return pd.DataFrame(rows)


def category_table(results: Sequence[ModelResult]) -> pd.DataFrame:
    """Per model and category: questions, objective metrics and the mean judge score."""
    rows = []
    for r in results:
        for cat, o in r.objective.items():
            if cat == OVERALL:
                continue
            rows.append({"model": r.name, "category": cat, "questions": o["n"],
                         "ref. PPL ↓": _num(o["ppl"]), "ROUGE-L": _num(o["rouge_l"], 3),
                         "length (tokens)": _num(o["length"], 1), "stop rate": _pct(o["stop_rate"]),
                         "judge score (1-10)": _num(r.scores_by_category.get(cat))})
    return pd.DataFrame(rows)


def wtl_table(results: Sequence[ModelResult], criteria: Sequence[str]) -> pd.DataFrame:
    """Raw counts behind the shares: wins / ties / losses per criterion, and the consistency."""
    rows = []
    for r in results:
        if r.shares is None:
            continue
        row = {"model": r.name, "compared": r.shares["compared"], "failed": r.shares["failed"]}
        for c in criteria:
            s = r.shares["criteria"][c]
            row[c] = f"{s['wins']} / {s['ties']} / {s['losses']} ({_pct(s['consistency'])})"
        rows.append(row)
    return pd.DataFrame(rows, columns=["model", "compared", "failed", *criteria])


# ---------------------------------------------------------------------------------- metrics
def _clean(d: dict) -> dict:
    """Drop ``None`` leaves (``dvc metrics diff`` compares numbers) and round floats."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            v = _clean(v)
            if v:
                out[k] = v
        elif v is not None:
            out[k] = round(v, 4) if isinstance(v, float) else v
    return out


def eval_metrics(results: Sequence[ModelResult], criteria: Sequence[str]) -> dict:
    """``metrics/eval.json``: per model, keys that read well in ``dvc metrics diff``
    (``sft.win_share.accuracy``, ``refine.rouge_l``, ``merged.ppl``, ...)."""
    out: dict = {}
    for r in results:
        o = r.objective[OVERALL]
        m: dict = {
            "ppl": o["ppl"], "rouge_l": o["rouge_l"], "length": o["length"],
            "stop_rate": o["stop_rate"], "judge_score": r.scores[OVERALL],
            "score": dict(r.scores["criteria"]),
            "judge_failed": r.scores["failed"] + (r.shares["failed"] if r.shares else 0),
            "by_category": {cat: {"ppl": v["ppl"], "rouge_l": v["rouge_l"],
                                  "judge_score": r.scores_by_category.get(cat)}
                            for cat, v in r.objective.items() if cat != OVERALL},
        }
        if r.shares is not None:
            overall = r.shares[OVERALL]
            m["win_share"] = {**{c: r.shares["criteria"][c]["share"]["value"] for c in criteria},
                              OVERALL: overall["share"]["value"]}
            m["win_share_low"] = overall["share"]["low"]
            m["win_share_high"] = overall["share"]["high"]
            m["consistency"] = overall["consistency"]
            m["score_diff"] = r.diff[OVERALL]["value"]
            m["score_diff_low"] = r.diff[OVERALL]["low"]
            m["score_diff_high"] = r.diff[OVERALL]["high"]
        out[r.name] = m
    return _clean(out)


def journey_points(results: Sequence[ModelResult]) -> tuple[list[dict], list[dict]]:
    """The ``dvc plots`` data: one point per model (``eval/journey.json``) and one per model
    compared with the baseline (``eval/win_share.json``). Every point of a file has the same keys
    (``dvc plots`` needs it); a statistic that could not be computed is ``null``."""
    points, shares = [], []
    for step, r in enumerate(results):
        o = r.objective[OVERALL]
        points.append({"step": step, "model": r.name, "ppl": _round(o["ppl"]),
                       "rouge_l": _round(o["rouge_l"]), "length": _round(o["length"]),
                       "stop_rate": _round(o["stop_rate"]),
                       "judge_score": _round(r.scores[OVERALL])})
        if r.shares is not None:
            s = r.shares[OVERALL]["share"]
            shares.append({"step": step, "model": r.name, "win_share": _round(s["value"]),
                           "win_share_low": _round(s["low"]), "win_share_high": _round(s["high"])})
    return points, shares


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


# ------------------------------------------------------------------------------------- text
def judge_note(judge_name: str) -> str:
    """What the judge can and cannot tell, in one sentence."""
    if judge_name.startswith("offline:"):
        return (f"The judge is the offline reference heuristic (`{judge_name}`), not a model: it "
                "rewards closeness to the accepted Stack Overflow answer (its wording, key terms "
                "and identifiers, without repetition), so it can tell whether a model moved "
                "towards the reference answers, but not whether a differently worded answer is "
                "correct, nor how good its reasoning is — read \"better\" here as \"closer to the "
                "reference\".")
    return (f"The judge is `{judge_name}`, an LLM: its scores are opinions with their own biases "
            "(length, style, self-preference); the position swap cancels its order bias and the "
            "consistency column says how often the two orders agreed.")


def render_report(results: Sequence[ModelResult], *, baseline: str, criteria: Sequence[str],
                  judge_name: str, bootstrap: BootstrapParams, max_new_tokens: int) -> str:
    """``eval/report.md``."""
    n = results[0].objective[OVERALL]["n"]
    conf = f"{100 * bootstrap.confidence:g} %"
    lines = [
        "# Evaluation of the journey",
        "",
        f"Every model answered the same {n} test questions (never seen in training) greedily, "
        f"with at most {max_new_tokens} new tokens. Judge: `{judge_name}`, criteria "
        f"{', '.join(criteria)} (1-10 each).",
        "",
        judge_note(judge_name),
        "",
        "## How each model compares with " + baseline,
        "",
    ]
    for r in results:
        if r.shares is None:
            continue
        s, d = r.shares[OVERALL]["share"], r.diff[OVERALL]
        if s["value"] is None:
            lines.append(f"- **{r.name}**: no comparison validated ({r.shares['failed']} failed).")
            continue
        lines.append(
            f"- **{r.name}**: {verdict(r.shares, baseline)} — the judge prefers it on "
            f"{_pct(s['value'])} of question-criterion comparisons ({conf} CI "
            f"{_pct(s['low'])} to {_pct(s['high'])}; 50 % = no difference); mean judge score "
            f"{_num(r.scores[OVERALL])} vs {_num(next(b for b in results if b.name == baseline).scores[OVERALL])} "
            f"(difference {_diff_ci(d)}, paired over {r.diff['paired']} questions); reference "
            f"perplexity {_num(r.objective[OVERALL]['ppl'])}, ROUGE-L "
            f"{_num(r.objective[OVERALL]['rouge_l'], 3)}.")
    lines += [
        "",
        f"## METEOR-format table: win shares vs {baseline} ({conf} bootstrap CI)",
        "",
        "Per criterion, each question is a win, a loss or a tie for the model; the judge saw every "
        "pair in both orders and a question counts as a win only when both orders agree, "
        "otherwise it is a tie. Win share = (wins + ties / 2) / compared, so the two rows of a "
        f"pair sum to 100 %. \"judge score\" is the mean single-answer score over criteria and "
        "questions (the analogue of METEOR's GPT-4 Score).",
        "",
        meteor_table(results, baseline, criteria).to_markdown(index=False, disable_numparse=True),
        "",
        "## The journey",
        "",
        f"Reference PPL: perplexity of the accepted answers' tokens given the question (chat "
        "template, answer tokens only, as in training; lower is better). ROUGE-L: F-measure of the "
        "answer against the accepted answer. Length: generated tokens. Stop rate: answers the "
        f"model ended itself before {max_new_tokens} tokens. Δ score: mean judge score minus "
        f"{baseline}'s, paired by question. Verdict: whether the win-share CI excludes 50 %.",
        "",
        journey_table(results, baseline, bootstrap.confidence).to_markdown(index=False, disable_numparse=True),
        "",
        "Wins / ties / losses per criterion (position consistency: share of comparisons where "
        "both orders named the same winner):",
        "",
        wtl_table(results, criteria).to_markdown(index=False, disable_numparse=True),
        "",
        "## Per category",
        "",
        category_table(results).to_markdown(index=False, disable_numparse=True),
        "",
        "## Judgments",
        "",
    ]
    for r in results:
        failed = r.scores["failed"] + (r.shares["failed"] if r.shares else 0)
        lines.append(f"- {r.name}: {r.judgments} judge calls ({r.cached} from the cache); "
                     f"{r.scores['scored']} answers scored, {r.scores['failed']} scores failed"
                     + (f"; {r.shares['compared']} pairs compared, {r.shares['failed']} failed"
                        if r.shares else "")
                     + (" — failed judgments are excluded from the numbers above, never scored "
                        "as zero." if failed else "."))
    lines += ["", "Every judgment (both orders, raw reply, parsed result, cache hit) is in "
              "`eval/judgments.jsonl`; answers in `eval/answers/<model>.jsonl`; numbers in "
              "`metrics/eval.json`; plot in `eval/journey.png`.", ""]
    return "\n".join(lines)


def plot_journey(results: Sequence[ModelResult], path, *, baseline: str) -> None:
    """``eval/journey.png``: perplexity, ROUGE-L, judge score and win share along the journey."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r.name for r in results]
    x = list(range(len(results)))
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    panels = [
        ("reference perplexity (lower is better)", [r.objective[OVERALL]["ppl"] for r in results]),
        ("ROUGE-L vs accepted answer", [r.objective[OVERALL]["rouge_l"] for r in results]),
        ("mean judge score (1-10)", [r.scores[OVERALL] for r in results]),
    ]
    for ax, (title, values) in zip(axes.flat, panels):
        ax.bar(x, [math.nan if v is None else v for v in values], color="#4C72B0")
        ax.set_title(title)
    axes.flat[2].set_ylim(0, 10)
    ax = axes.flat[3]
    shares = [r.shares[OVERALL]["share"] if r.shares else None for r in results]
    values = [s["value"] if s and s["value"] is not None else math.nan for s in shares]
    err = [[(s["value"] - s["low"]) if s and s["value"] is not None else 0 for s in shares],
           [(s["high"] - s["value"]) if s and s["value"] is not None else 0 for s in shares]]
    ax.bar(x, [100 * v for v in values], yerr=[[100 * e for e in err[0]], [100 * e for e in err[1]]],
           color="#55A868", capsize=4)
    ax.axhline(50, color="grey", linestyle="--", linewidth=1)
    ax.set_ylim(0, 100)
    ax.set_title(f"win share vs {baseline} (%, with CI)")
    for ax in axes.flat:
        ax.set_xticks(x, names, rotation=20)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)
