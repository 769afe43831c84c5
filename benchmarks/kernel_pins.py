"""Benchmark: what pinning the CPU kernels (meteor.kernels) costs on whole stages.

Runs two real stage scripts, base (pre-training: matmul-bound training) and guideline (batched
generation), each in a fresh process, once with the pins (the default) and once with
``METEOR_PIN_KERNELS=0`` (the machine's own PyTorch, MKL and oneDNN code paths; threads stay
fixed), alternating so that both see the same machine load. It prints each stage's wall time,
the pinned/unpinned ratio, and the sha256 of models/base and data/guidelines.jsonl per variant
(pinned runs must agree with each other; unpinned ones may differ from them).

The stages run in a temporary copy of the repo's inputs (data/raw, params.yaml with a shorter
``base.steps`` and a ``guideline.limit``), so nothing in the working tree is touched.

Run:  python benchmarks/kernel_pins.py [--steps 40] [--limit 64] [--repeats 2]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"pinned": {}, "unpinned": {"METEOR_PIN_KERNELS": "0"}}
# Set by the parent shell or by an earlier import of meteor: the child decides for itself.
PIN_VARS = ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA", "MKL_DYNAMIC",
            "MKL_ENABLE_INSTRUCTIONS", "METEOR_PIN_KERNELS")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        digest.update(file.name.encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()[:12]


def run_stage(workdir: Path, stage: str, extra_env: dict[str, str]) -> float:
    env = {k: v for k, v in os.environ.items() if k not in PIN_VARS}
    env.update(extra_env, PYTHONPATH=f"{ROOT / 'src'}{os.pathsep}{env.get('PYTHONPATH', '')}",
               METEOR_LOG_LEVEL="WARNING")
    start = time.perf_counter()
    subprocess.run([sys.executable, str(ROOT / "stages" / f"{stage}.py")], cwd=workdir, env=env,
                   check=True)
    return time.perf_counter() - start


def make_workdir(steps: int, limit: int) -> Path:
    workdir = Path(tempfile.mkdtemp(prefix="kernel-pins-"))
    (workdir / "data").mkdir()
    shutil.copytree(ROOT / "data" / "raw", workdir / "data" / "raw")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["base"]["steps"] = steps
    params["guideline"]["limit"] = limit
    (workdir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run_stage(workdir, "scrape", {})
    return workdir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="base.steps (default run: 300)")
    parser.add_argument("--limit", type=int, default=64, help="guideline.limit (questions)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--also", action="append", default=[], metavar="VAR=VALUE",
                        help="another variant to time, e.g. MKL_CBWR=AVX2 (a candidate pin)")
    args = parser.parse_args()
    variants = dict(VARIANTS)
    for spec in args.also:
        name, _, value = spec.partition("=")
        variants[spec] = {name: value}

    workdir = make_workdir(args.steps, args.limit)
    seconds = {(v, s): [] for v in variants for s in ("base", "guideline")}
    hashes = {v: set() for v in variants}
    try:
        for _ in range(args.repeats):
            for variant, env in variants.items():  # alternate: both variants see the same load
                for stage in ("base", "guideline"):
                    seconds[variant, stage].append(run_stage(workdir, stage, env))
                hashes[variant].add((sha256_of(workdir / "models" / "base"),
                                     sha256_of(workdir / "data" / "guidelines.jsonl")))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    print(f"{args.repeats} runs per variant, base.steps={args.steps}, "
          f"guideline.limit={args.limit}, {os.cpu_count()} CPUs")
    for stage in ("base", "guideline"):
        unpinned = min(seconds["unpinned", stage])
        for variant in variants:
            best = min(seconds[variant, stage])
            print(f"{stage:10s} {variant:18s} {best:7.1f} s   /unpinned {best / unpinned:.2f}x "
                  "(best of each)")
    for variant, found in hashes.items():
        print(f"{variant:18s} models/base, guidelines sha256: "
              + "; ".join(f"{b}, {g}" for b, g in sorted(found)))
    if len(hashes["pinned"]) != 1:
        sys.exit("pinned runs gave different outputs")


if __name__ == "__main__":
    main()
