"""Benchmark: batched, length-sorted generation vs one prompt at a time (greedy, same outputs).

64 chat prompts of mixed lengths go through ``meteor.student.generate.generate`` twice: with
``batch_size=1`` (the baseline: what the published METEOR code does) and batched. Greedy outputs
must be identical; the script prints both wall times and their ratio, measured in the same run.

The student is models/base when it exists (run the base stage first), else an untrained tiny
student of the default base size (``BaseParams()``: ~2.5M parameters) with a wide weight init so
that its greedy replies are varied text, not one token repeated.

Run:  python benchmarks/generate.py [--model models/base] [--batch-size 16] [--max-new-tokens 32]
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from meteor.student.pretrain import BaseParams
from meteor.student.generate import generate
from meteor.student.load import load_student
from meteor.student.tiny import build_tiny_model, tiny_llama_config, train_tokenizer
from meteor.utils import setup_logging

log = logging.getLogger("benchmarks.generate")

SUBJECTS = ["dropout", "batch normalization", "the learning rate", "tokenization", "beam search",
            "cross-validation", "data augmentation", "an attention mask"]
FILLER = ("I train a {s} model in PyTorch on a small dataset of labelled examples, with Adam, weight "
          "decay and early stopping, and I log the loss on a validation split after every epoch. ")


def prompts(n: int = 64) -> list[list[dict[str, str]]]:
    """n questions whose lengths range from a few words to a few hundred tokens."""
    out = []
    for i in range(n):
        subject = SUBJECTS[i % len(SUBJECTS)]
        context = FILLER.format(s=subject) * (i % 7)  # 0..6 sentences of context: mixed lengths
        out.append([{"role": "user", "content": f"{context}Why does {subject} matter here?"}])
    return out


def untrained_student():
    params = BaseParams()
    texts = [FILLER.format(s=s) + f"Why does {s} matter?" for s in SUBJECTS] * 20
    tokenizer = train_tokenizer(texts, vocab_size=params.vocab_size)
    config = tiny_llama_config(tokenizer, hidden_size=params.hidden_size, num_layers=params.num_layers,
                               num_heads=params.num_heads, intermediate_size=params.intermediate_size,
                               max_seq_len=params.max_seq_len)
    config.initializer_range = 0.3
    return build_tiny_model(config, seed=0), tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/base", help="student dir (fallback: untrained tiny)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--prompts", type=int, default=64)
    args = parser.parse_args()
    setup_logging()

    if Path(args.model).is_dir():
        model, tokenizer = load_student(args.model)
        name = args.model
    else:
        model, tokenizer = untrained_student()
        name = "untrained tiny student (BaseParams defaults)"
    conversations = prompts(args.prompts)
    lengths = [len(tokenizer.apply_chat_template(c, tokenize=False)) for c in conversations]
    log.info("model: %s, %.2fM parameters; %d prompts of %d-%d characters; %d new tokens",
             name, sum(p.numel() for p in model.parameters()) / 1e6, len(conversations),
             min(lengths), max(lengths), args.max_new_tokens)

    kwargs = dict(max_new_tokens=args.max_new_tokens, do_sample=False, progress=False)
    generate(model, tokenizer, conversations[:2], **kwargs)  # warm-up: first-call overheads

    start = time.perf_counter()
    single = generate(model, tokenizer, conversations, batch_size=1, **kwargs)
    single_s = time.perf_counter() - start

    start = time.perf_counter()
    batched = generate(model, tokenizer, conversations, batch_size=args.batch_size, **kwargs)
    batched_s = time.perf_counter() - start

    mismatches = [i for i, (a, b) in enumerate(zip(single, batched)) if a != b]
    assert not mismatches, f"batched greedy output differs from one-at-a-time for prompts {mismatches}"
    print(f"one at a time : {single_s:7.2f} s")
    print(f"batched ({args.batch_size:>3}) : {batched_s:7.2f} s")
    print(f"speed-up      : {single_s / batched_s:7.2f}x  (same greedy outputs for all "
          f"{len(conversations)} prompts)")


if __name__ == "__main__":
    main()
