"""Runs a training script once as one process and once as two DDP processes (torchrun, gloo on
CPU), for tests that check 2 processes x 1 micro-batch == 1 process x 2 accumulated micro-batches.

The script takes its own arguments, then the gradient accumulation steps, then an output JSON
path that its main process writes; the results come back as {"single": ..., "ddp": ...}.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def run_single_and_ddp(script: Path, args: list[str], tmp_path: Path,
                       timeout_s: int = 300) -> dict[str, dict]:
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    runs = {
        "single": [sys.executable, str(script), *args, "2"],
        "ddp": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--standalone", str(script), *args, "1"],
    }
    results = {}
    for name, cmd in runs.items():
        out = tmp_path / f"{name}.json"
        proc = subprocess.run([*cmd, str(out)], env=env, capture_output=True, text=True,
                              timeout=timeout_s)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[name] = json.loads(out.read_text())
    assert results["single"]["processes"] == 1 and results["ddp"]["processes"] == 2
    return results
