"""What makes results bitwise: fixed intra-op threads, CPU kernels pinned to AVX2, and the
record of what remains machine-dependent (meteor.utils)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from meteor.utils import DEFAULT_NUM_THREADS, configure_determinism, reproducibility_info

SRC = Path(__file__).resolve().parents[1] / "src"


def test_reproducibility_info_names_what_determines_the_bits():
    info = reproducibility_info()
    assert info["torch"] == torch.__version__
    assert info["intra_op_threads"] == torch.get_num_threads()
    assert info["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert info["blas"]  # e.g. "mkl" or "open", as torch.__config__ reports it
    assert {"transformers", "peft", "accelerate", "python", "machine", "device"} <= set(info)


def test_intra_op_threads_are_fixed_unless_overridden(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("METEOR_NUM_THREADS", raising=False)
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        configure_determinism()
        assert torch.get_num_threads() == DEFAULT_NUM_THREADS  # not "one per core"
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        configure_determinism()
        assert torch.get_num_threads() == 1
        monkeypatch.setenv("METEOR_NUM_THREADS", "3")
        configure_determinism()
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


# A few training steps of a small Llama; prints the CPU kernels used and a hash of the weights.
TRAIN_STEPS = """
import hashlib, torch
from meteor.utils import seed_everything
seed_everything(0)
from transformers import LlamaConfig, LlamaForCausalLM
config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256)
model = LlamaForCausalLM(config)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
ids = torch.randint(0, 512, (4, 128))
for _ in range(3):
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
weights = b"".join(p.detach().numpy().tobytes() for p in model.parameters())
print(torch.backends.cpu.get_cpu_capability(), hashlib.sha256(weights).hexdigest())
"""


def _run(extra_env: dict[str, str]) -> tuple[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS")}
    env.update(PYTHONPATH=f"{SRC}{os.pathsep}{env.get('PYTHONPATH', '')}", **extra_env)
    out = subprocess.run([sys.executable, "-c", TRAIN_STEPS], env=env, check=True,
                         capture_output=True, text=True).stdout.split()
    return out[-2], out[-1]


@pytest.mark.slow
@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="x86-64 only")
def test_an_avx512_machine_gives_the_bits_of_an_avx2_machine():
    """On a CPU with AVX-512, PyTorch would pick wider kernels that round differently from an
    AVX2-only CPU's; pinned, both give the same weights. The AVX2-only machine is emulated by
    limiting PyTorch's and MKL's instruction sets."""
    capability, ours = _run({})
    assert capability == "AVX2"
    emulated = _run({"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"})
    assert emulated == ("AVX2", ours)
