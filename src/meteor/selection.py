"""IFD data selection (Cherry LLM, Selective Reflection-Tuning): the pool, the filters, the
top fraction per chunk, and the numbers that describe them.

The pool holds two versions of each question: the teacher's distilled answer (``source:
"distilled"``) and refine's final answer (``source: "refined"``), keyed by ``(id, source)``, in
that order (distilled file order, then refined file order). Title, question and category come from
the train split (joined by id). Rows without a usable answer are skipped and counted.

Selection, given each row's scores (:mod:`meteor.ifd`) and ``ifd`` = the score chosen to drive it:

1. drop, in this order, counting each row under the first reason that applies
   (:data:`DROP_REASONS`): answers shorter than ``min_answer_tokens`` tokens; a driving score
   that is NaN or infinite; a refined answer identical to its question's distilled answer (refine
   kept the teacher's answer: the same text twice would only be trained on twice); ``ifd >=
   max_ifd`` (the question does not help the student produce the answer); optionally ``r_ifd >=
   max_r_ifd`` (Selective Reflection-Tuning keeps a row only when both are below 1);
2. ``per_question: best``: when both versions of a question survive, keep the one with the *lower*
   IFD, i.e. the answer the question helps the student most to produce (the version the student
   finds more useful to learn from, the Selective Reflection-Tuning idea of the student choosing
   between the original and the improved pair); ``both`` keeps both;
3. in each chunk (``chunk_by``: the category, or the source), keep the ``ceil(fraction * n)`` rows
   with the *highest* IFD (Cherry LLM's "cherry" data: hard for the student, yet helped by the
   question), ties broken by id then source so the result does not depend on the rows' order.

The kept rows are returned in pool order.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from pydantic import Field

from meteor.params import Section
from meteor.rows import join_to_questions


class IfdSelectParams(Section):
    """IFD / r-IFD data selection (Cherry LLM, Superfiltering, Selective Reflection-Tuning)."""

    model: str = Field(
        "models/self_train",
        description="Scorer: a student dir (adapter or full model) or hub id. dvc.yaml tracks "
        "models/self_train; point this elsewhere and change that dependency too.")
    score: Literal["ifd_loss", "ifd_ppl"] = Field(
        "ifd_loss", description="Which IFD drives selection (written as `ifd`): Cherry LLM's ratio "
        "of mean losses or Superfiltering's ratio of perplexities.")
    max_ifd: float = Field(1.0, gt=0, description="Drop rows with ifd >= this (1: the question "
                           "does not help the student produce the answer).")
    max_r_ifd: float | None = Field(
        None, gt=0, description="Also drop rows with r_ifd >= this (Selective Reflection-Tuning: "
        "1.0); null: r_ifd is computed and reported but does not select.")
    min_answer_tokens: int = Field(8, ge=1, description="Drop answers with fewer tokens.")
    fraction: float = Field(0.5, gt=0, le=1, description="Keep the ceil(fraction * n) highest-IFD "
                            "rows of each chunk's n surviving rows.")
    chunk_by: Literal["category", "source"] = Field(
        "category", description="The chunks: one data/selected/<chunk>.jsonl each.")
    per_question: Literal["best", "both"] = Field(
        "best", description="When both versions of a question survive: keep the lower-IFD one "
        "(best) or both.")
    max_seq_len: int | None = Field(
        None, ge=8, description="Truncate scored sequences to this many tokens; null: the "
        "scorer's context length.")
    batch_size: int = Field(8, ge=1, description="Sequences per forward pass (scores do not "
                            "depend on it; on a CPU small batches are faster, on a GPU larger).")

SOURCES = ("distilled", "refined")
POOL_SKIP_REASONS = ("not_ok", "no_answer")
DROP_REASONS = ("too_short", "not_finite", "duplicate", "ifd_at_least_max", "r_ifd_at_least_max",
                "other_version_kept", "below_fraction")
SCORE_NAMES = ("ifd", "ifd_loss", "ifd_ppl", "r_ifd")
QUANTILES = {"min": 0.0, "q10": 0.1, "q25": 0.25, "median": 0.5, "q75": 0.75, "q90": 0.9,
             "max": 1.0}


# ---------------------------------------------------------------------------------------- pool
def build_pool(distilled: Sequence[dict], refined: Sequence[dict], questions: Sequence[dict]
               ) -> tuple[list[dict], dict[str, Counter]]:
    """Pool rows ``{id, category, title, question, answer, source, answer_by}`` and, per source,
    the skipped rows by reason (:data:`POOL_SKIP_REASONS`).

    ``answer`` is stripped of surrounding whitespace: it is exactly the text that gets scored.
    ``answer_by`` says who wrote it (refine's final answer may be the student's or the teacher's).
    """
    pool: list[dict] = []
    skipped = {source: Counter() for source in SOURCES}
    inputs = (
        ("distilled", distilled, "answer", "distill"),
        ("refined", refined, "final_answer", "refine"),
    )
    for source, rows, key, stage in inputs:
        for row, q in join_to_questions(rows, questions, what=source, rerun=stage):
            answer = row.get(key)
            if row.get("ok") is False:
                skipped[source]["not_ok"] += 1
            elif not isinstance(answer, str) or not answer.strip():
                skipped[source]["no_answer"] += 1
            else:
                pool.append({
                    "id": q["id"], "category": q.get("category"), "title": q["title"],
                    "question": q["question"], "answer": answer.strip(), "source": source,
                    "answer_by": "teacher" if source == "distilled" else row.get("source"),
                })
    return pool, skipped


# ----------------------------------------------------------------------------------- selection
@dataclass(frozen=True)
class SelectionRules:
    max_ifd: float = 1.0
    max_r_ifd: float | None = None
    min_answer_tokens: int = 1
    fraction: float = 1.0
    chunk_by: str = "category"
    per_question: str = "best"

    def __post_init__(self):
        if not 0 < self.fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {self.fraction}")
        if self.chunk_by not in ("category", "source"):
            raise ValueError(f"chunk_by must be 'category' or 'source', got {self.chunk_by!r}")
        if self.per_question not in ("best", "both"):
            raise ValueError(f"per_question must be 'best' or 'both', got {self.per_question!r}")


@dataclass
class Selection:
    """Per pool row: kept or the reason it was dropped; plus the chunk of each row."""

    drop_reason: list[str | None]
    chunk: list[str]
    kept_indices: list[int] = field(default_factory=list)

    def kept(self, i: int) -> bool:
        return self.drop_reason[i] is None


def _id_key(value) -> tuple:
    return (0, value, "") if isinstance(value, (int, float)) else (1, 0, str(value))


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def select(rows: Sequence[dict], rules: SelectionRules) -> Selection:
    """Apply the module's selection to pool rows carrying ``ifd``, ``r_ifd`` and
    ``answer_tokens_total`` (see the module docstring for the order of the rules)."""
    reason: list[str | None] = [None] * len(rows)
    distilled_answer = {r["id"]: r["answer"] for r in rows if r["source"] == "distilled"}
    for i, row in enumerate(rows):
        if row["answer_tokens_total"] < rules.min_answer_tokens:
            reason[i] = "too_short"
        elif not _finite(row["ifd"]) or (rules.max_r_ifd is not None and not _finite(row["r_ifd"])):
            reason[i] = "not_finite"
        elif row["source"] == "refined" and distilled_answer.get(row["id"]) == row["answer"]:
            reason[i] = "duplicate"
        elif row["ifd"] >= rules.max_ifd:
            reason[i] = "ifd_at_least_max"
        elif rules.max_r_ifd is not None and row["r_ifd"] >= rules.max_r_ifd:
            reason[i] = "r_ifd_at_least_max"

    source_rank = {s: k for k, s in enumerate(SOURCES)}

    def order_key(i: int) -> tuple:  # highest IFD first; ties by id, then source
        return (-rows[i]["ifd"], _id_key(rows[i]["id"]), source_rank.get(rows[i]["source"], 99))

    if rules.per_question == "best":
        by_id: dict = {}
        for i, row in enumerate(rows):
            if reason[i] is None:
                by_id.setdefault(_id_key(row["id"]), []).append(i)
        for versions in by_id.values():
            # lowest IFD wins; on a tie the distilled version (source order)
            best = min(versions,
                       key=lambda i: (rows[i]["ifd"], source_rank.get(rows[i]["source"], 99)))
            for i in versions:
                if i != best:
                    reason[i] = "other_version_kept"

    chunks = [str(row[rules.chunk_by]) for row in rows]
    candidates: dict[str, list[int]] = {}
    for i in range(len(rows)):
        if reason[i] is None:
            candidates.setdefault(chunks[i], []).append(i)
    for members in candidates.values():
        n_keep = math.ceil(rules.fraction * len(members))
        for i in sorted(members, key=order_key)[n_keep:]:
            reason[i] = "below_fraction"
    return Selection(drop_reason=reason, chunk=chunks,
                     kept_indices=[i for i in range(len(rows)) if reason[i] is None])


# ------------------------------------------------------------------------------------- metrics
def quantiles(values: Sequence[float]) -> dict[str, float | int | None]:
    """Quantiles and mean of the finite values, and how many values were not finite."""
    finite = np.array([v for v in values if _finite(v)], dtype=float)
    out: dict[str, float | int | None] = {"n": len(finite),
                                          "n_not_finite": len(values) - len(finite)}
    for name, q in QUANTILES.items():
        out[name] = round(float(np.quantile(finite, q)), 6) if len(finite) else None
    out["mean"] = round(float(finite.mean()), 6) if len(finite) else None
    return out


def selection_metrics(rows: Sequence[dict], selection: Selection) -> dict:
    """Score quantiles per chunk and source, kept / dropped by reason per chunk, the source mix."""
    chunk_names = sorted(set(selection.chunk))
    chunks = {}
    for chunk in chunk_names:
        members = [i for i, c in enumerate(selection.chunk) if c == chunk]
        dropped = Counter(selection.drop_reason[i] for i in members if not selection.kept(i))
        kept_sources = Counter(rows[i]["source"] for i in members if selection.kept(i))
        chunks[chunk] = {
            "pool": len(members),
            "kept": sum(kept_sources.values()),
            "dropped": {r: dropped[r] for r in DROP_REASONS},
            "kept_by_source": {s: kept_sources[s] for s in SOURCES},
            "scores": {
                source: {name: quantiles([rows[i][name] for i in members
                                          if rows[i]["source"] == source])
                         for name in SCORE_NAMES}
                for source in SOURCES
            },
        }
    kept_sources = Counter(rows[i]["source"] for i in selection.kept_indices)
    n_kept = len(selection.kept_indices)
    dropped = Counter(r for r in selection.drop_reason if r is not None)
    return {
        "pool": len(rows),
        "pool_by_source": {s: sum(r["source"] == s for r in rows) for s in SOURCES},
        "kept": n_kept,
        "dropped": {r: dropped[r] for r in DROP_REASONS},
        "kept_by_source": {s: kept_sources[s] for s in SOURCES},
        "kept_share_by_source": {s: round(kept_sources[s] / n_kept, 4) if n_kept else None
                                 for s in SOURCES},
        "scores_by_source": {
            source: {name: quantiles([r[name] for r in rows if r["source"] == source])
                     for name in SCORE_NAMES}
            for source in SOURCES
        },
        "chunks": chunks,
    }


def plot_histogram(rows: Sequence[dict], path, *, score_name: str, max_ifd: float) -> None:
    """A PNG histogram of the driving IFD score of the pool, one series per source."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    values = {s: [r["ifd"] for r in rows if r["source"] == s and _finite(r["ifd"])]
              for s in SOURCES}
    finite = [v for vs in values.values() for v in vs]
    bins = np.linspace(min(finite), max(finite), 31) if finite else 30
    if finite and bins[0] == bins[-1]:
        bins = 30
    for (source, vs), style in zip(values.items(), ("-", "--")):
        # outlines, not filled bars: identical distributions stay visible on top of each other
        ax.hist(vs, bins=bins, histtype="step", linewidth=1.5, linestyle=style,
                label=f"{source} (n={len(vs)})")
    ax.axvline(max_ifd, color="black", linestyle="--", linewidth=1, label=f"max_ifd = {max_ifd:g}")
    ax.set_xlabel(f"IFD ({score_name})")
    ax.set_ylabel("rows")
    ax.set_title("IFD of the pool by source (lower: the question helps more)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png", metadata={"Software": None})
    plt.close(fig)
