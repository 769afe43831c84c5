"""Stage self_train (METEOR 3): high- vs low-compute answers as preference pairs, for turns.

Starts from models/refine (the refine adapter on models/base) and the first ``self_train.limit``
questions of data/scraped/train.jsonl (rows without title or body are skipped and counted). Each
turn the student answers every question greedily (low compute) and with beam search
(``self_train.num_beams``, high compute), chat-templated and batched (params ``generation`` for
the batch size and repetition knobs, ``self_train.max_new_tokens``). Pairs that are empty,
(near-)identical or cut off by ``self_train.train.max_seq_len`` are skipped and counted by reason.
The judge (params ``judge``, cached) compares every kept pair in both orders: how often does it
prefer the high-compute answer? Chosen = beam (``pairing: compute``) or the judge's winner
(``pairing: judge``). The adapter is trained on the pairs with ``self_train.loss`` (dpo: the
reference is a frozen copy of the turn's starting adapter; simpo; margin) on the shared training
loop (``self_train.train``), and the next turn regenerates the pairs with the updated model.
See :mod:`meteor.self_train` and :mod:`meteor.training.preference`.

Writes data/self_pairs.jsonl (one row per question and turn: id, turn, skip_reason (null when
kept), chosen_from, chosen, rejected, lengths, each decoding's text and generated tokens,
difference, judge verdicts), models/self_train/ (one LoRA adapter on models/base + tokenizer: the
policy only), metrics/self_train.json (per turn: pairs kept / skipped by reason, mean chosen vs
rejected length, beam/greedy compute ratio, judge agreement, loss, rewards chosen / rejected,
reward accuracy and margin before and after training), metrics/self_train_compute.json (per pair
and turn: tokens and seconds of each decoding; apart from the pairs, which must not depend on the
machine's speed) and the per-step curves under dvclive/self_train/.

Exit status: non-zero when a turn has no usable pair (unless ``self_train.on_no_pairs:
pass_through``; pairs and metrics are still written, the model is not), or, after writing
everything, when the judge budget (cumulative over the runs until one completes) stopped the
stage or more than ``self_train.max_failed_fraction`` of the judged pairs got no verdict (with
``pairing: judge`` those pairs are skipped, ``judge_failed``); a re-run takes finished calls
from the cache.

Run alone:  python stages/self_train.py        (or: dvc repro self_train)
API key:    OPENAI_API_KEY from the environment only (judge backend openai); never written anywhere.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

from dvclive import Live

from meteor.io import atomic_path, read_jsonl, write_json, write_jsonl
from meteor.rows import balanced_head
from meteor.runtime import Stage
from meteor.self_train import NoUsablePairs, SelfTrainParams, self_train
from meteor.student.config import StudentParams
from meteor.student.generate import GenerationParams
from meteor.student.load import load_student
from meteor.teacher import make_teacher
from meteor.teacher.chat import BUDGET
from meteor.teacher.config import TeacherParams
from meteor.training.lora import require_adapter, save_trained

REFINE_DIR = Path("models/refine")
TRAIN = Path("data/scraped/train.jsonl")
OUT = Path("data/self_pairs.jsonl")
OUT_DIR = Path("models/self_train")
METRICS = Path("metrics/self_train.json")
COMPUTE = Path("metrics/self_train_compute.json")
LOG_DIR = Path("dvclive/self_train")
EXIT_NO_PAIRS = 2


def usable_questions(rows: list[dict], limit: int | None) -> tuple[list[dict], Counter]:
    """``limit`` train rows (taken in turn from each category) that have a title and a body (the
    prompt needs both)."""
    questions, skipped = [], Counter()
    for row in balanced_head(rows, limit):
        if all(isinstance(row.get(k), str) and row[k].strip() for k in ("title", "question")):
            questions.append(row)
        else:
            skipped["no_question"] += 1
    return questions, skipped


def main() -> int:
    stage = Stage("self_train", self_train=SelfTrainParams, generation=GenerationParams,
                  judge=TeacherParams, student=StudentParams)
    st, student = stage.params.self_train, stage.params.student
    stage.seed(st.train.seed)

    rows = read_jsonl(TRAIN)
    questions, skipped = usable_questions(rows, st.limit)
    model, tokenizer = load_student(REFINE_DIR, dtype=student.dtype,
                                    trust_remote_code=student.trust_remote_code,
                                    adapter_trainable=True)
    require_adapter(model, st.train.lora, "self_train.train.lora")  # self_train continues it
    judge = (make_teacher(stage.params.judge, section="judge", stage="self_train")
             if st.judge_pairs else None)
    # No git side effects: the DVC stage, not DVCLive, records the experiment.
    live = Live(dir=str(LOG_DIR), save_dvc_exp=False, dvcyaml=None) if stage.is_main else None
    failed = None
    try:
        try:
            run = self_train(model, tokenizer, questions, st, stage.params.generation, judge,
                             live=live)
        except NoUsablePairs as e:
            run, failed = e.run, e
        for problem in incomplete(run.rows, st.max_failed_fraction):
            stage.incomplete(problem)
        if judge is not None and failed is None and stage.complete:
            judge.stage_completed()  # a cumulative judge budget starts afresh for the next run
    finally:
        if live is not None:
            live.end()
        if judge is not None:
            judge.close()
    if not stage.is_main:  # under accelerate launch only one process writes
        return EXIT_NO_PAIRS if failed is not None else stage.finish()
    # dvc.yaml declares the curves as an output; they must exist even when nothing was trained.
    (LOG_DIR / "plots" / "metrics").mkdir(parents=True, exist_ok=True)

    if failed is None:
        with atomic_path(OUT_DIR, is_dir=True) as tmp_dir:
            save_trained(model, tokenizer, tmp_dir)
    write_jsonl(OUT, run.rows)
    write_json(COMPUTE, run.compute)
    metrics = {
        **run.metrics(),
        "rows_in": len(balanced_head(rows, st.limit)),
        "rows_skipped": {"no_question": skipped["no_question"]},
        "loss": st.loss,
        "pairing": st.pairing,
        "num_beams": st.num_beams,
        "judge": ({"name": judge.name, **judge.stats.as_dict(),
                   "failed_fraction": judge_failed_fraction(run.rows),
                   "budget_stopped": budget_stopped(run.rows)} if judge is not None else None),
        "max_failed_fraction": st.max_failed_fraction,
        "complete": failed is None and stage.complete,
        "seconds": stage.seconds(),
    }
    write_json(METRICS, metrics)
    if failed is not None:
        stage.log.error("%s", failed)
        return EXIT_NO_PAIRS
    final = metrics["final"] or {}
    stage.log.info("%d turns on %d questions: reward accuracy %s, margin %s -> %s, %s",
                   len(run.turns), len(questions), final.get("reward_accuracy"),
                   final.get("mean_margin"), OUT_DIR, OUT)
    return stage.finish(see=f"the 'judge' field of {OUT}")


def _judgments(rows: list[dict]) -> list[dict]:
    return [r["judge"] for r in rows if r["judge"] is not None]


def judge_failed_fraction(rows: list[dict]) -> float:
    """Share of judged pairs the judge gave no verdict for (either order failed)."""
    judged = _judgments(rows)
    return round(sum(not j["ok"] for j in judged) / len(judged), 4) if judged else 0.0


def budget_stopped(rows: list[dict]) -> bool:
    return any(not j["ok"] and BUDGET in (j.get("error") or "") for j in _judgments(rows))


def incomplete(rows: list[dict], max_failed_fraction: float) -> list[str]:
    """Why this run must not count as done (empty when it is complete)."""
    problems = []
    if budget_stopped(rows):
        problems.append("stopped by the judge budget (judge.budget_usd)")
    if judge_failed_fraction(rows) > max_failed_fraction:
        problems.append(f"{judge_failed_fraction(rows):.1%} of the judged pairs got no verdict, "
                        f"above self_train.max_failed_fraction={max_failed_fraction:g}")
    return problems


if __name__ == "__main__":
    sys.exit(main())
