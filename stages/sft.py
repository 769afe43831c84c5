"""Stage sft (METEOR 1c): fine-tune the base student on the teacher's distilled answers.

Reads models/base and data/distilled.jsonl (rows marked ``"ok": false`` or without an answer are
skipped and counted). Each row becomes a chat example: the student's prompt (system: an expert
of the question's field; user: title + body, as refine and evaluate ask it), assistant = the
teacher's answer, with the loss on the answer tokens only. Trains with ``sft.train`` from
params.yaml: LoRA by default (``sft.train.lora.enabled: false`` for full fine-tuning), AdamW with
warmup and decay, gradient accumulation, truncation to ``max_seq_len``.
Writes models/sft/ (the LoRA adapter, or the full model, plus the tokenizer), metrics/sft.json
and the per-step loss / learning rate under dvclive/sft/.

Run alone:   python stages/sft.py
On GPUs:     accelerate launch --config_file configs/accelerate/ddp.yaml stages/sft.py
             (see docs/training.md; configs/accelerate/deepspeed_zero2.yaml for DeepSpeed ZeRO-2)
"""

from __future__ import annotations

from pathlib import Path

from meteor.io import atomic_path, read_jsonl, write_json
from meteor.runtime import Stage
from meteor.student.config import StudentParams
from meteor.student.load import load_student
from meteor.training.config import SftParams
from meteor.training.data import ROW_SKIP_REASONS, answer_examples
from meteor.training.loop import train
from meteor.training.lora import make_trainable, save_trained

BASE_DIR = Path("models/base")
DISTILLED = Path("data/distilled.jsonl")
OUT_DIR = Path("models/sft")
METRICS = Path("metrics/sft.json")
LOG_DIR = Path("dvclive/sft")


def main() -> None:
    stage = Stage("sft", sft=SftParams, student=StudentParams)
    train_params, student = stage.params.sft.train, stage.params.student
    stage.seed(train_params.seed)

    rows = read_jsonl(DISTILLED)
    examples, skipped = answer_examples(rows)
    model, tokenizer = load_student(BASE_DIR, dtype=student.dtype,
                                    trust_remote_code=student.trust_remote_code)
    model = make_trainable(model, train_params.lora, seed=train_params.seed)
    result = train(model, tokenizer, examples, train_params, log_dir=LOG_DIR, desc="sft")
    if not stage.is_main:
        return

    with atomic_path(OUT_DIR, is_dir=True) as tmp_dir:
        save_trained(model, tokenizer, tmp_dir)
    metrics = {
        **result.metrics(),
        "rows_in": len(rows),
        "rows_skipped": {reason: skipped[reason] for reason in ROW_SKIP_REASONS},
        "lora": train_params.lora.enabled,
        "seconds": stage.seconds(),
        "reproducibility": stage.reproducibility(),
    }
    write_json(METRICS, metrics)
    stage.log.info("final loss %.4f after %d steps on %d examples (%d rows skipped) -> %s",
                   result.final_loss, result.steps, metrics["examples_used"],
                   sum(skipped.values()), OUT_DIR)


if __name__ == "__main__":
    main()
