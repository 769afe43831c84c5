"""Pin every CPU kernel choice that changes floating-point bits, before any tensor operation.

A seed fixes the random numbers; it does not fix the order in which a kernel adds them up. On
x86-64 that order depends on the machine unless it is pinned:

* PyTorch's own vectorised kernels (softmax, norms, element-wise) are compiled for AVX2 and AVX-512
  and picked per CPU: ``ATEN_CPU_CAPABILITY=avx2`` picks the AVX2 ones everywhere.
* MKL (torch's BLAS: every matmul) dispatches per CPU *and per vendor*: the same AVX2 matmul gives
  other bits on an Intel Xeon (even with MKL's ``MKL_CBWR=AVX2`` branch) than on an AMD EPYC,
  where MKL ignores that branch. Only ``MKL_CBWR=COMPATIBLE`` (MKL's SSE2 code path, with
  deterministic reductions and static scheduling) gave the same bits on both; see
  ``benchmarks/kernel_pins.py`` for what it costs.
* oneDNN (bf16 / conv paths) JIT-compiles for the widest ISA it finds: ``ONEDNN_MAX_CPU_ISA``.
* Threads: the split of a reduction between threads changes its order, so the intra-op thread
  count is fixed (:data:`DEFAULT_NUM_THREADS`, not one per core) and MKL may not lower it on its
  own (``MKL_DYNAMIC=FALSE``).
* MKL's vector math (``torch.sqrt`` on CPU) follows none of these variables; the optimiser is the
  one place the pipeline used it, so every optimiser is :func:`adamw` (the fused kernel).

The mechanism: ``meteor/__init__.py`` calls :func:`pin_environment`, so importing any ``meteor``
module sets these variables, and every entry point (stage scripts, benchmarks, tests, each process
of ``accelerate launch``) imports ``meteor`` before it runs a tensor operation. PyTorch and MKL read
them lazily, at their first operation, so an ``import torch`` before ``import meteor`` is harmless
(``tests/test_reproducibility.py`` checks both orders give the same bits); the variables that are
read when a library *loads* (threads) are also applied through the library's API by
:func:`meteor.utils.configure_determinism`, which every stage calls first.

A variable already set in the environment wins, so a user can choose other kernels (e.g.
``MKL_CBWR=AUTO`` for speed); ``METEOR_PIN_KERNELS=0`` sets none of them. Either way
:func:`kernel_settings` records what was in force, and the stages write it into their metrics.
"""

from __future__ import annotations

import os
import platform
import re

# The intra-op thread count is fixed rather than "one per core", so machines with different core
# counts split reductions the same way; METEOR_NUM_THREADS (0 = the library's default) or
# OMP_NUM_THREADS override it.
DEFAULT_NUM_THREADS = 2

# x86-64 only: other architectures have other kernels (and no MKL), so nothing is pinned there.
X86_PINS = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_CBWR": "COMPATIBLE",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
}
# Read by MKL when it loads, so set here for processes that import meteor first; the API call in
# configure_determinism covers the others.
MKL_THREAD_PINS = {"MKL_DYNAMIC": "FALSE"}
# Every variable that decides kernels or threads; kernel_settings reports each one's value.
RECORDED = (*X86_PINS, *MKL_THREAD_PINS, "MKL_ENABLE_INSTRUCTIONS", "OMP_NUM_THREADS",
            "MKL_NUM_THREADS", "METEOR_NUM_THREADS", "METEOR_PIN_KERNELS")


def is_x86_64() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def pins_enabled() -> bool:
    return os.environ.get("METEOR_PIN_KERNELS", "1").strip().lower() not in ("0", "false", "no")


def thread_count() -> int:
    """Intra-op threads to use: METEOR_NUM_THREADS, else OMP_NUM_THREADS, else the default."""
    for var in ("METEOR_NUM_THREADS", "OMP_NUM_THREADS"):
        match = re.match(r"\s*(\d+)", os.environ.get(var, ""))
        if match:
            return int(match.group(1))
    return DEFAULT_NUM_THREADS


def pin_environment() -> None:
    """Set the kernel and thread variables that are not set yet (see the module docstring)."""
    threads = thread_count()
    if threads > 0:  # read by OpenMP and MKL when they load
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
        os.environ.setdefault("MKL_NUM_THREADS", str(threads))
    if not pins_enabled():
        return
    for name, value in MKL_THREAD_PINS.items():
        os.environ.setdefault(name, value)
    if is_x86_64():
        for name, value in X86_PINS.items():
            os.environ.setdefault(name, value)


def kernel_settings() -> dict[str, str | None]:
    """The value in force of every variable that decides kernels or threads (None: unset)."""
    return {name: os.environ.get(name) for name in RECORDED}


def adamw(param_groups, **kwargs):
    """``torch.optim.AdamW`` with the fused kernel wherever PyTorch has one (CPU, CUDA).

    The default (for-loop) AdamW takes ``torch.sqrt`` of the second moment, and on x86-64 that
    goes through MKL's vector math, whose bits differ between CPUs whatever ``MKL_CBWR`` says
    (measured: an AMD EPYC and an Intel Xeon disagree on ``torch.sqrt`` and on three AdamW steps,
    and agree on the fused kernel's). The fused kernel is PyTorch's own vectorised code, pinned by
    ``ATEN_CPU_CAPABILITY``, and faster."""
    import torch

    groups = list(param_groups)
    params = [p for g in groups for p in (g["params"] if isinstance(g, dict) else [g])]
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point()
                                 for p in params)
    return torch.optim.AdamW(groups, fused=fused or None, **kwargs)
