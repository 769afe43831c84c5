"""Small helpers every stage uses: logging set-up, seeding, and what makes results bitwise.

Bitwise results depend on more than the seed. Within one machine, seeding, deterministic
algorithms and a fixed intra-op thread count make two runs identical. Across machines, the
floating-point order of the CPU kernels also matters; :mod:`meteor.kernels` pins it (PyTorch's,
MKL's and oneDNN's code paths, threads) before any tensor work, and :func:`reproducibility_info`
records what remains machine-dependent.
"""

from __future__ import annotations

import logging
import os
import platform
import random
import re

from meteor import kernels


def setup_logging(level: str | int = "INFO") -> None:
    logging.basicConfig(
        level=os.environ.get("METEOR_LOG_LEVEL", level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # The HTTP clients log every request URL at INFO; keep stage logs readable.
    for name in ("httpx", "httpx2", "openai"):
        logging.getLogger(name).setLevel(logging.WARNING)


_warned_capability = False


def _mkl_fixed_threads() -> None:
    """Turn off MKL's dynamic thread count through its API (``MKL_DYNAMIC`` is read only when MKL
    loads, which may have happened before meteor was imported). MKL is linked into libtorch_cpu;
    builds without it have nothing to turn off."""
    import ctypes

    import torch

    lib = os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")
    try:
        ctypes.CDLL(lib).MKL_Set_Dynamic(ctypes.c_int(0))
    except (OSError, AttributeError):
        pass


def configure_determinism() -> None:
    """Fix what makes kernels round differently between runs and machines (meteor.kernels): the
    intra-op thread count, MKL's dynamic threads, the x86-64 kernel set (checked: it is read at
    PyTorch's first operation, so a stage that ran one before importing meteor gets a warning)
    and cuBLAS's workspace (needed by deterministic algorithms on GPU)."""
    import torch  # here, not at the top: stages that only log (judge, report) skip torch

    global _warned_capability
    kernels.pin_environment()  # already done by `import meteor`; a no-op unless a var was unset
    threads = kernels.thread_count()
    if threads > 0:
        torch.set_num_threads(threads)
    if kernels.pins_enabled():
        _mkl_fixed_threads()
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    wanted = os.environ.get("ATEN_CPU_CAPABILITY", "default")
    used = torch.backends.cpu.get_cpu_capability()
    if (kernels.is_x86_64() and wanted.lower() != "default" and used.lower() != wanted.lower()
            and not _warned_capability):
        _warned_capability = True
        logging.getLogger(__name__).warning(
            "CPU kernels are %s, not ATEN_CPU_CAPABILITY=%s (PyTorch had already run an "
            "operation, or the CPU lacks it): results may differ from other machines'",
            used, wanted)


def _cpu_model() -> str:
    """The CPU's model name (Linux), else what ``platform`` knows: which machine made the run."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def reproducibility_info() -> dict:
    """What determines bitwise results besides code, data, params and seed: library versions,
    intra-op threads, the CPU and the kernel settings in force, the BLAS PyTorch uses, and the GPU
    when there is one.
    Stages that train write it into their metrics, so ``dvc metrics diff`` shows when two runs
    are not comparable bit for bit."""
    import accelerate
    import peft
    import torch
    import transformers

    config = torch.__config__.show()
    blas = re.search(r"BLAS_INFO=([^,\s]+)", config)
    info = {
        "cpu": _cpu_model(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "accelerate": accelerate.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "intra_op_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "blas": blas.group(1) if blas else None,
        "kernel_settings": kernels.kernel_settings(),
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
