"""Benchmark: batched IFD / r-IFD scoring (meteor.ifd) vs the published scripts' way, same scores.

The baseline is written the way Cherry LLM's ``data_analysis.py`` and Selective Reflection-Tuning's
``selection_code/data_analysis.py`` score data: one row at a time, each of the four passes
(answer | question, answer alone, question | reverse prompt, question alone) its own batch-1
forward with labels (full logits and the HF loss), then a Python loop over every position taking
``log_softmax`` and the NLL of the true token (``.item()`` each), the target span's mean taken
from that list. It is given the token ids our encoder builds, so both score exactly the same
tokens; the scores (``ifd_loss``, ``ifd_ppl``, ``r_ifd``) must agree within 1e-5, or the script
fails. Both timings include tokenisation. The rows are distinct (no sequence is shared between
rows, so our de-duplication does not help); ``--pool`` scores the stage's actual pool instead
(distilled + refined rows, which share question passes, and often answers).

The scorer is models/base when it exists, else an untrained student of the default base size
(``BaseParams()``). Rows are the first ``--rows`` of data/distilled.jsonl when it exists, else
synthetic questions and answers of mixed lengths. ``--random-0.5b`` scores with a randomly
initialised Qwen2-0.5B-shaped model instead (for an accelerator: ``--device cuda``).

Run:  python benchmarks/ifd.py [--rows 24] [--batch-size 8] [--max-seq-len 512] [--device cpu]
      python benchmarks/ifd.py --random-0.5b --device cuda --rows 64 --batch-size 32
"""

from __future__ import annotations

import argparse
import math
import os
import random
import time
from pathlib import Path

import torch

from meteor.ifd import PASSES, encode_row, minimal_prefix_ids, score_rows
from meteor.io import read_jsonl
from meteor.student.pretrain import BaseParams
from meteor.student.load import load_student
from meteor.student.tiny import build_tiny_model, tiny_llama_config, train_tokenizer

WORDS = ("the model overfits because the validation loss rises while the training loss falls so "
         "we add dropout weight decay and early stopping then tune the learning rate with a "
         "scheduler and check the gradients of the convolution and attention layers").split()
CATEGORIES = ("ML", "DL", "NLP", "CV")
TOL = 1e-5


def synthetic_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)

    def text(k: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(k))

    return [{"id": i, "category": CATEGORIES[i % 4], "title": text(rng.randint(4, 12)) + "?",
             "question": text(rng.randint(20, 120)), "answer": text(rng.randint(20, 400))}
            for i in range(n)]


def untrained_student():
    params = BaseParams()
    tokenizer = train_tokenizer([" ".join(WORDS)] * 50, vocab_size=params.vocab_size)
    config = tiny_llama_config(tokenizer, hidden_size=params.hidden_size,
                               num_layers=params.num_layers, num_heads=params.num_heads,
                               intermediate_size=params.intermediate_size,
                               max_seq_len=params.max_seq_len)
    return build_tiny_model(config, seed=0).eval(), tokenizer


def random_half_billion(tokenizer):
    """A randomly initialised model of Qwen2.5-0.5B's shape (~0.5B parameters, 151,936 vocab)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=151_936, hidden_size=896, intermediate_size=4864,
                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         max_position_embeddings=32_768, tie_word_embeddings=True,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    return Qwen2ForCausalLM(config).eval()


# ---------------------------------------------------------------- the published scripts' way
log_softmax = torch.nn.LogSoftmax(dim=-1)
nll_loss = torch.nn.NLLLoss(reduction="none")


FORWARD_SECONDS = [0.0]  # the reference's time in the model's forward passes alone


def reference_pass(model, prefix, target, device) -> float:
    """One pass as Cherry LLM computes it: batch 1, labels, then a loop over every token."""
    if not target:
        return math.nan
    input_ids = torch.tensor([[*prefix, *target]], device=device)
    labels = input_ids.clone()
    labels[0, :len(prefix)] = -100
    sync(str(device))
    start = time.perf_counter()
    with torch.no_grad():
        outputs = model(input_ids, labels=labels)
    sync(str(device))
    FORWARD_SECONDS[0] += time.perf_counter() - start
    losses = []
    logits = outputs.logits
    for i in range(1, input_ids.shape[1]):
        log_prob_dist = log_softmax(logits[0, i - 1].float())
        true_token = input_ids[0, i]
        token_loss = nll_loss(log_prob_dist.unsqueeze(0), true_token.unsqueeze(0))
        losses.append(token_loss.item())
    span = losses[len(prefix) - 1:]
    return sum(span) / len(span)


def reference_scores(model, tokenizer, rows, max_seq_len, device) -> list[dict]:
    prefix = minimal_prefix_ids(tokenizer)
    out = []
    for row in rows:
        enc = encode_row(tokenizer, row, row["answer"], max_seq_len, prefix)
        l_ac, l_ad, l_qc, l_qd = (reference_pass(model, p, t, device) for p, t in enc.sequences())
        out.append({"ifd_loss": l_ac / l_ad if l_ad else math.nan,
                    "ifd_ppl": math.exp(l_ac) / math.exp(l_ad),
                    "r_ifd": math.exp(l_qc) / math.exp(l_qd)})
    return out


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/base", help="scorer dir (fallback: untrained)")
    parser.add_argument("--rows", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-seq-len", type=int, default=512)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--pool", action="store_true",
                        help="score the stage's pool (distilled + refined rows) instead")
    parser.add_argument("--random-0.5b", dest="half_billion", action="store_true",
                        help="a randomly initialised Qwen2-0.5B-shaped scorer")
    args = parser.parse_args()

    if Path(args.model).is_dir():
        model, tokenizer = load_student(args.model, dtype="float32")
        scorer = args.model
    else:
        model, tokenizer = untrained_student()
        scorer = "untrained default-size tiny student"
    if args.half_billion:
        model, scorer = random_half_billion(tokenizer), "random Qwen2-0.5B-shaped model"
    model.to(args.device)

    if args.pool:
        from meteor.selection import build_pool

        pool, _ = build_pool(read_jsonl("data/distilled.jsonl"), read_jsonl("data/refined.jsonl"),
                             read_jsonl("data/scraped/train.jsonl"))
        ids = list(dict.fromkeys(r["id"] for r in pool))[:max(1, args.rows // 2)]
        rows = [r for r in pool if r["id"] in set(ids)]  # both versions of each question
        source = "the stage's pool (distilled and refined versions)"
    elif Path("data/distilled.jsonl").exists():
        rows = [r for r in read_jsonl("data/distilled.jsonl") if r.get("answer")][:args.rows]
        source = "data/distilled.jsonl"
    else:
        rows, source = synthetic_rows(args.rows), "synthetic rows"
    params = sum(p.numel() for p in model.parameters())
    print(f"scorer: {scorer} ({params / 1e6:.1f}M parameters) on {args.device}, "
          f"torch threads {torch.get_num_threads()}, OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', 'unset')}, load average {os.getloadavg()[0]:.1f}")
    print(f"rows: {len(rows)} from {source}, {len(PASSES)} passes each, max_seq_len "
          f"{args.max_seq_len}")

    # warm-up (first-call allocations, kernels) for both, outside the timings
    reference_scores(model, tokenizer, rows[:1], args.max_seq_len, args.device)
    score_rows(model, tokenizer, rows[:2], max_seq_len=args.max_seq_len, batch_size=args.batch_size)

    sync(args.device)
    FORWARD_SECONDS[0] = 0.0
    start = time.perf_counter()
    reference = reference_scores(model, tokenizer, rows, args.max_seq_len, args.device)
    sync(args.device)
    reference_s = time.perf_counter() - start

    start = time.perf_counter()
    stats: dict = {}
    ours = score_rows(model, tokenizer, rows, max_seq_len=args.max_seq_len,
                      batch_size=args.batch_size, stats=stats)
    sync(args.device)
    ours_s = time.perf_counter() - start

    worst = 0.0
    for i, (r, o) in enumerate(zip(reference, ours)):
        for key, value in r.items():
            got = getattr(o, key)
            if math.isnan(value) and math.isnan(got):
                continue
            diff = abs(got - value)
            worst = max(worst, diff)
            if not diff <= TOL:
                raise SystemExit(f"row {i}: {key} differs: reference {value!r}, batched {got!r}")
    print(f"same scores: max |difference| {worst:.2e} (tolerance {TOL:g})")
    print(f"reference (batch 1, per-token loop): {reference_s:7.2f} s  "
          f"{len(rows) / reference_s:8.2f} rows/s")
    forward_s = FORWARD_SECONDS[0]
    print(f"  of which batch-1 forward passes:   {forward_s:7.2f} s  (the loop, tokenisation "
          f"and the rest: {reference_s - forward_s:.2f} s)")
    print(f"batched (batch {args.batch_size:>3}, meteor.ifd):   {ours_s:7.2f} s  "
          f"{len(rows) / ours_s:8.2f} rows/s")
    print(f"speed-up: {reference_s / ours_s:.1f}x  ({stats['unique_sequences']} of "
          f"{stats['sequences']} sequences run, {stats['tokens']} tokens, "
          f"{stats['tokens'] / ours_s:.0f} tokens/s batched)")
    # The same FLOPs run batched or not: where batch-1 forwards already keep the cores busy (long
    # sequences on a CPU), batching can only remove the loop and the per-call overhead.
    print(f"batched vs the reference's forward passes alone: {forward_s / ours_s:.2f}x")


if __name__ == "__main__":
    main()
