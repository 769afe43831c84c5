"""Training throughput: length-grouped batches vs random batches padded to their longest example.

    python benchmarks/train_throughput.py [--examples 192] [--batch-size 8] [--repeats 3]
    python benchmarks/train_throughput.py --real-size --device cuda     # on a GPU machine

Both variants run our training loop (meteor.training.train) for one epoch over the same
mixed-length chat examples, on fresh copies of the same model; they differ only in
``group_by_length``. Throughput counts real (non-pad) tokens per second, so padding is pure cost.
Prints the median tokens/s of each variant over ``--repeats`` alternating runs and their ratio
(target >= 1.3x on CPU), all measured in this run; absolute numbers depend on the machine.

``--real-size`` builds a randomly initialised model of real size (a Qwen2-0.5B-shaped config: 24
layers, hidden 896, vocabulary 151,936; nothing is downloaded) and also reports peak GPU memory.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import random
import statistics
import time

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from meteor.training.config import TrainParams
from meteor.student.tiny import build_tiny_model, tiny_llama_config, train_tokenizer
from meteor.training.data import encode_examples
from meteor.training.loop import train
from meteor.training.lora import make_trainable
from meteor.training.data import make_batch_sampler
from meteor.utils import setup_logging

log = logging.getLogger("train_throughput")

WORDS = ("gradient descent loss weights layer tensor batch model training validation overfitting "
         "tokenizer embedding attention convolution filter image pixel feature vector matrix "
         "learning rate optimizer dropout regularisation accuracy precision recall dataset split "
         "pytorch keras sklearn numpy inference checkpoint epoch").split()


def mixed_length_examples(n: int, seed: int, min_words: int, max_words: int) -> list:
    """Questions and answers whose lengths spread log-uniformly (like real Q&A data)."""
    rng = random.Random(seed)

    def text(lo: int, hi: int) -> str:
        k = int(round(lo * (hi / lo) ** rng.random()))
        return " ".join(rng.choice(WORDS) for _ in range(k)) + "."

    return [[{"role": "user", "content": text(min_words, max_words // 4)},
             {"role": "assistant", "content": text(min_words, max_words)}] for _ in range(n)]


def real_size_model(vocab_size: int) -> Qwen2ForCausalLM:
    """Qwen2.5-0.5B's shapes, randomly initialised."""
    config = Qwen2Config(vocab_size=max(vocab_size, 151_936), hidden_size=896,
                         intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, max_position_embeddings=4096,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    return Qwen2ForCausalLM(config)


def padded_tokens(lengths: list[int], batch_size: int, grouped: bool) -> int:
    """Tokens the model processes in one epoch, padding included (epoch 0's batches)."""
    sampler = make_batch_sampler(lengths, batch_size, group_by_length=grouped, seed=0)
    return sum(max(lengths[i] for i in batch) * len(batch) for batch in sampler)


def run_once(base, tokenizer, data, params: TrainParams, device: str) -> tuple[float, float | None]:
    model = make_trainable(copy.deepcopy(base), params.lora, seed=params.seed)
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    desc = "grouped" if params.group_by_length else "random"
    result = train(model, tokenizer, data, params, desc=desc)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    del model
    return result.tokens_per_s, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=192)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-seq-len", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs per variant")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--real-size", action="store_true", help="a 0.5B Qwen2-shaped model")
    parser.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads; 1 keeps timings stable on a shared machine")
    args = parser.parse_args()
    setup_logging("WARNING")

    if args.device == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "true"  # even on a GPU machine
        # Several OpenMP threads on busy cores spin-wait on each other (10x slower small ops).
        torch.set_num_threads(args.threads)
    elif not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")

    corpus = [" ".join(WORDS)] * 4 + ["What is the loss of this model?"]
    tokenizer = train_tokenizer(corpus, vocab_size=600)
    examples = mixed_length_examples(args.examples, seed=0, min_words=4, max_words=300)
    data = encode_examples(tokenizer, examples, args.max_seq_len)
    if args.real_size:
        base = real_size_model(len(tokenizer))
    else:
        base = build_tiny_model(
            tiny_llama_config(tokenizer, hidden_size=128, num_layers=2, num_heads=4,
                              intermediate_size=256, max_seq_len=args.max_seq_len), seed=0)
    n_params = sum(p.numel() for p in base.parameters())
    lengths = data.lengths
    padded = padded_tokens(lengths, args.batch_size, grouped=False)
    padded_grouped = padded_tokens(lengths, args.batch_size, grouped=True)
    print(f"model: {type(base).__name__}, {n_params / 1e6:.1f}M parameters, device {args.device}, "
          f"{'full fine-tuning' if args.full else 'LoRA r=16'}")
    print(f"data: {len(lengths)} examples, {sum(lengths)} tokens, length min/median/max "
          f"{min(lengths)}/{int(statistics.median(lengths))}/{max(lengths)}, "
          f"batch {args.batch_size}")
    print(f"tokens incl. padding per epoch: random {padded} ({padded / sum(lengths):.2f}x real), "
          f"grouped {padded_grouped} ({padded_grouped / sum(lengths):.2f}x real)")

    def params(group_by_length: bool) -> TrainParams:
        return TrainParams(epochs=1, batch_size=args.batch_size, lr=1e-4, warmup_ratio=0.0,
                           max_seq_len=args.max_seq_len, group_by_length=group_by_length,
                           lora={"enabled": not args.full})

    # Warm-up (allocator, kernels, thread pools) on a few steps, not measured.
    run_once(base, tokenizer, encode_examples(tokenizer, examples[:2 * args.batch_size],
                                              args.max_seq_len), params(False), args.device)
    speeds: dict[bool, list[float]] = {True: [], False: []}
    peaks: dict[bool, float | None] = {}
    start = time.perf_counter()
    for repeat in range(args.repeats):
        order = (True, False) if repeat % 2 == 0 else (False, True)  # alternate against drift
        for grouped in order:
            tokens_per_s, peaks[grouped] = run_once(base, tokenizer, data, params(grouped),
                                                    args.device)
            speeds[grouped].append(tokens_per_s)
    grouped, naive = statistics.median(speeds[True]), statistics.median(speeds[False])

    print(f"random batches (padded to longest): {naive:10.0f} real tokens/s  "
          f"runs {[round(s) for s in speeds[False]]}")
    print(f"length-grouped batches:             {grouped:10.0f} real tokens/s  "
          f"runs {[round(s) for s in speeds[True]]}")
    print(f"ratio grouped / random: {grouped / naive:.2f}x (target >= 1.3x on CPU)")
    if args.device == "cuda":
        print(f"peak GPU memory: random {peaks[False]:.2f} GiB, grouped {peaks[True]:.2f} GiB")
    print(f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
