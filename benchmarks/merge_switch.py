"""Benchmark: a merge trial's cost, switching the weights in memory vs evaluating the objective.

K delta adapters (random non-zero LoRA weights: timing does not need trained ones) sit on
θ_self_train in one peft model (``meteor.merging.deltas.DeltaModel``). For each of ``--trials``
random weight vectors the script times (a) ``set_weights`` (LoRA scalings, the merge stage's
mechanism), (b) the dev reference-answer NLL (the default objective) and, as the baseline the
stage avoids, (c) rebuilding the merge from checkpoints: loading the K delta adapters from disk
and combining them with peft's ``add_weighted_adapter(cat)``. It prints the mean seconds of
each, the fraction of a trial spent switching, and how many times faster switching is than
reloading. It also prints the max logit difference of peft's ``cat`` and ``linear`` combinations
from the in-memory merge (``cat`` is exact, ``linear`` is not).

Uses models/base + models/self_train and data/scraped/dev.jsonl when they exist (run the
pipeline first), else an untrained tiny student with a random self_train adapter and synthetic
dev answers.

Run:  python benchmarks/merge_switch.py [--deltas 4] [--trials 8] [--dev-limit 26]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch
from peft.tuners.lora import LoraLayer

from meteor.io import read_jsonl
from meteor.merging.deltas import DeltaModel
from meteor.merging.objective import AnswerNLL
from meteor.student.pretrain import BaseParams
from meteor.training.config import LoraParams
from meteor.student.load import load_student
from meteor.utils import setup_logging

log = logging.getLogger("benchmarks.merge_switch")


def randomise(model, adapter: str, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, LoraLayer) and adapter in m.lora_B:
            w = m.lora_B[adapter].weight
            w.data = torch.randn(w.shape, generator=g) * 0.02


def student(tmp: Path):
    """(base model, tokenizer, self_train dir): the pipeline's, or a tiny untrained stand-in."""
    if Path("models/base").is_dir() and Path("models/self_train/adapter_config.json").is_file():
        base, tok = load_student("models/base")
        return base, tok, Path("models/self_train")
    from meteor.student.tiny import build_tiny_model, tiny_llama_config, train_tokenizer
    from meteor.training.lora import make_trainable, save_trained

    params = BaseParams()
    texts = ["Gradient descent lowers the loss step by step.",
             "A convolution slides a learned filter over the image."] * 50
    tok = train_tokenizer(texts, vocab_size=params.vocab_size)
    config = tiny_llama_config(tok, hidden_size=params.hidden_size, num_layers=params.num_layers,
                               num_heads=params.num_heads,
                               intermediate_size=params.intermediate_size,
                               max_seq_len=params.max_seq_len)
    build_tiny_model(config, seed=0).save_pretrained(tmp / "base")
    tok.save_pretrained(tmp / "base")
    model, tok = load_student(tmp / "base")
    model = make_trainable(model, LoraParams(), seed=0)
    randomise(model, "default", 0)
    save_trained(model, tok, tmp / "self_train")
    base, tok = load_student(tmp / "base")
    return base, tok, tmp / "self_train"


def dev_rows(limit: int) -> list[dict]:
    if Path("data/scraped/dev.jsonl").is_file():
        return read_jsonl("data/scraped/dev.jsonl")[:limit]
    answer = "Scale the features first, then fit the model and check it on held-out data. " * 20
    return [{"title": f"Question {i}", "question": "Why is my model overfitting? " * (1 + i % 5),
             "answer": answer} for i in range(limit)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deltas", type=int, default=4)
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--dev-limit", type=int, default=26)
    parser.add_argument("--max-seq-len", type=int, default=512)
    args = parser.parse_args()
    setup_logging("WARNING")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base, tok, self_train_dir = student(tmp)
        dm = DeltaModel.from_self_train(base, self_train_dir)
        names = [f"delta_{i}" for i in range(args.deltas)]
        for i, name in enumerate(names):
            dm.add_delta(name, LoraParams(), seed=0)
            randomise(dm.model, name, 10 + i)
            dm.save_delta(name, tmp / name)
        objective = AnswerNLL(tok, dev_rows(args.dev_limit), max_seq_len=args.max_seq_len,
                              batch_size=8)
        g = torch.Generator().manual_seed(0)
        switch, evaluate, reload = [], [], []
        for _ in range(args.trials):
            weights = {n: float(w) for n, w in zip(names, torch.rand(len(names), generator=g))}
            t0 = time.perf_counter()
            dm.set_weights(weights)
            t1 = time.perf_counter()
            objective(dm.model)
            t2 = time.perf_counter()
            switch.append(t1 - t0)
            evaluate.append(t2 - t1)

            # the baseline: rebuild the merge from the checkpoints on disk
            t3 = time.perf_counter()
            fresh, _ = load_student(self_train_dir.parent / "base")
            other = DeltaModel.from_self_train(fresh, self_train_dir)
            for name in names:
                other.load_delta(name, tmp / name)
            other.use_only(other.merged_adapter(weights))
            reload.append(time.perf_counter() - t3)

        with torch.inference_mode():
            batch = {k: objective.batches[0][k] for k in ("input_ids", "attention_mask")}
            dm.set_weights(weights)
            expected = dm.model(**batch).logits
            diffs = {}
            for kind in ("cat", "linear"):
                try:
                    dm.use_only(dm.merged_adapter(weights, adapter_name=kind,
                                                  combination_type=kind))
                except ValueError as err:  # linear needs every adapter at the same rank
                    diffs[kind] = float("nan")
                    log.warning("%s: %s", kind, err)
                    continue
                diffs[kind] = (dm.model(**batch).logits - expected).abs().max().item()
                dm.set_weights(weights)

    s, e, r = (statistics.mean(x) for x in (switch, evaluate, reload))
    print(f"{args.deltas} deltas, {args.trials} trials, {objective.tokens} dev answer tokens "
          f"({len(objective.batches)} batches)")
    print(f"switch weights in memory : {s * 1e3:9.3f} ms per trial")
    print(f"evaluate dev NLL         : {e * 1e3:9.1f} ms per trial")
    print(f"rebuild from checkpoints : {r * 1e3:9.1f} ms per trial (the baseline avoided)")
    print(f"switching is {100 * s / (s + e):.3f} % of a trial; {r / s:.0f}x faster than rebuilding")
    print(f"max |logit diff| from the in-memory merge: cat {diffs['cat']:.2e}, "
          f"linear {diffs['linear']:.2e}")


if __name__ == "__main__":
    main()
