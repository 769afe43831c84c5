"""base: the starting student, saved to models/base/ (safetensors, tokenizer, chat template).

* ``student.model: tiny`` (default): train a byte-level BPE tokenizer and pre-train a small
  Llama-architecture model on the *train* split only (data/scraped/train.jsonl), params ``base.*``.
* a ``.gguf`` file or the short name of a packaged one (``smollm2-135m``; see
  ``meteor.student.gguf``): dequantise it and save it as safetensors; the revision is its sha256.
* otherwise ``student.model`` is a hub id or local path: load it (safetensors only,
  ``student.trust_remote_code``) and save it into models/base with its resolved revision.

Writes metrics/base.json (parameters, tokens_seen, final_loss, seconds, revision) and
metrics/base_samples.json (greedy replies to a few prompts, to see what the model writes).

Run alone:  python stages/base.py        (or: dvc repro base)
"""

from __future__ import annotations

import json
from pathlib import Path

from meteor.io import atomic_path, read_jsonl, write_json
from meteor.runtime import Stage
from meteor.student.config import StudentParams
from meteor.student.generate import generate
from meteor.student.gguf import is_gguf, load_gguf
from meteor.student.load import load_student, prepare_tokenizer_for_generation, resolve_revision
from meteor.student.pretrain import BaseParams, pretrain

TRAIN = Path("data/scraped/train.jsonl")
OUT = Path("models/base")
METRICS = Path("metrics/base.json")
SAMPLES = Path("metrics/base_samples.json")
SOURCE_FILE = "meteor_source.json"  # inside models/base: what was loaded, at which revision
SAMPLE_PROMPTS = [
    "How do I stop my neural network from overfitting?",
    "What is the difference between precision and recall?",
    "Why does my PyTorch training loss become NaN?",
]


def main(params_path: str = "params.yaml") -> dict:
    stage = Stage("base", params_path=params_path, student=StudentParams, base=BaseParams)
    student, base = stage.params.student, stage.params.base
    stage.seed(base.seed)  # before any tensor work: fixes threads and CPU kernels too
    if student.model == "tiny":
        result = pretrain(read_jsonl(TRAIN), base)  # the train split only: dev/test stay unseen
        model, tokenizer = result.model, result.tokenizer
        metrics = {"parameters": result.parameters, "tokens_seen": result.tokens_seen,
                   "initial_loss": round(result.loss_history[0], 4),
                   "final_loss": round(result.final_loss, 4), "source": "tiny"}
    elif is_gguf(student.model):
        model, tokenizer, source = load_gguf(student.model, revision=student.revision,
                                             dtype=student.dtype)
        metrics = {"parameters": sum(p.numel() for p in model.parameters()), "tokens_seen": 0,
                   "final_loss": None, "revision": source["revision"], "source": student.model}
    else:
        model, tokenizer = load_student(student.model, revision=student.revision, dtype=student.dtype,
                                        trust_remote_code=student.trust_remote_code,
                                        allow_download=student.allow_download)
        source = resolve_revision(student.model, student.revision)  # after the load: now in the hub cache
        metrics = {"parameters": sum(p.numel() for p in model.parameters()), "tokens_seen": 0,
                   "final_loss": None, "revision": source["revision"], "source": student.model}

    prepare_tokenizer_for_generation(tokenizer)
    with atomic_path(OUT, is_dir=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if student.model != "tiny":
            (tmp / SOURCE_FILE).write_text(json.dumps(source, indent=2, sort_keys=True) + "\n")
    metrics["seconds"] = stage.seconds()
    if student.model == "tiny":
        metrics["revision"] = resolve_revision(OUT)["revision"]  # content hash of what was trained

    replies = generate(model, tokenizer, [[{"role": "user", "content": p}] for p in SAMPLE_PROMPTS],
                       max_new_tokens=64, batch_size=len(SAMPLE_PROMPTS), progress=False)
    for prompt, reply in zip(SAMPLE_PROMPTS, replies):
        stage.log.info("sample | %s\n%s", prompt, reply)
    write_json(SAMPLES, [{"prompt": p, "reply": r} for p, r in zip(SAMPLE_PROMPTS, replies)])
    metrics["reproducibility"] = stage.reproducibility()
    write_json(METRICS, metrics)
    stage.log.info("base: %s", metrics)
    return metrics


if __name__ == "__main__":
    main()
