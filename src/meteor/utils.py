"""Small helpers every stage uses: logging set-up, seeding, and what makes results bitwise.

Bitwise results depend on more than the seed. Within one machine, seeding, deterministic
algorithms and a fixed intra-op thread count make two runs identical. Across machines, the
floating-point order of the CPU kernels also matters: PyTorch picks vectorised kernels for the
widest instruction set the CPU has (AVX2 or AVX-512 on x86-64), and they round differently, so by
default we pin the kernels to AVX2 (``ATEN_CPU_CAPABILITY``), which every x86-64 CPU of the last
decade has. What remains machine-dependent is recorded by :func:`reproducibility_info`.
"""

from __future__ import annotations

import logging
import os
import platform
import random
import re


def setup_logging(level: str | int = "INFO") -> None:
    logging.basicConfig(
        level=os.environ.get("METEOR_LOG_LEVEL", level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # The HTTP clients log every request URL at INFO; keep stage logs readable.
    for name in ("httpx", "httpx2", "openai"):
        logging.getLogger(name).setLevel(logging.WARNING)


# The intra-op thread count is fixed rather than "one per core", so machines with different core
# counts run the same kernels' splits; 2 is the reference machine's count. METEOR_NUM_THREADS
# (0 = PyTorch's default) or OMP_NUM_THREADS override it, and metrics record what was used.
DEFAULT_NUM_THREADS = 2
# x86-64 CPU kernels pinned to AVX2 (ATEN_CPU_CAPABILITY set beforehand overrides, e.g. "default").
DEFAULT_CPU_CAPABILITY = "avx2"
_warned_capability = False


def _thread_count() -> int:
    for var in ("METEOR_NUM_THREADS", "OMP_NUM_THREADS"):
        match = re.match(r"\s*(\d+)", os.environ.get(var, ""))
        if match:
            return int(match.group(1))
    return DEFAULT_NUM_THREADS


def configure_determinism() -> None:
    """Fix what makes kernels round differently between runs and machines: the intra-op thread
    count, the x86-64 CPU kernel set (AVX2) and cuBLAS's workspace (needed by deterministic
    algorithms on GPU). The kernel set is read at PyTorch's first operation, so this must run
    before any tensor work; otherwise a warning says the machine's own kernels are used."""
    import torch  # here, not at the top: stages that only log (judge, report) skip torch

    global _warned_capability
    threads = _thread_count()
    if threads > 0:
        torch.set_num_threads(threads)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if platform.machine().lower() in ("x86_64", "amd64"):
        wanted = os.environ.setdefault("ATEN_CPU_CAPABILITY", DEFAULT_CPU_CAPABILITY)
        used = torch.backends.cpu.get_cpu_capability()
        if wanted.lower() != "default" and used.lower() != wanted.lower() and not _warned_capability:
            _warned_capability = True
            logging.getLogger(__name__).warning(
                "CPU kernels are %s, not ATEN_CPU_CAPABILITY=%s (PyTorch had already run an "
                "operation, or the CPU lacks it): results may differ from other machines'",
                used, wanted)


def reproducibility_info() -> dict:
    """What determines bitwise results besides code, data, params and seed: library versions,
    intra-op threads, the CPU kernel set and BLAS PyTorch uses, and the GPU when there is one.
    Stages that train write it into their metrics, so ``dvc metrics diff`` shows when two runs
    are not comparable bit for bit."""
    import accelerate
    import peft
    import torch
    import transformers

    config = torch.__config__.show()
    blas = re.search(r"BLAS_INFO=([^,\s]+)", config)
    info = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "accelerate": accelerate.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "intra_op_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "blas": blas.group(1) if blas else None,
        "device": "cpu",
    }
    if torch.cuda.is_available():
        info.update(device=torch.cuda.get_device_name(), cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version())
    return info


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch so runs are bit-for-bit repeatable
    (:func:`configure_determinism` fixes threads and kernels first).

    The string-hash seed cannot be set from inside a running process, so nothing saved may depend
    on the iteration order of a set of strings (see ``meteor.training.lora._sort_target_modules``)."""
    import numpy as np  # here, not at the top: stages that only log (judge, report) skip torch
    import torch

    configure_determinism()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
