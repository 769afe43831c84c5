"""What makes results bitwise on any x86-64 machine: the kernel pins of meteor.kernels, set by
importing meteor, fixed intra-op threads, and the record of what remains machine-dependent.

The strongest check is a golden value: a few training steps whose weights hash to the same value
on every x86-64 CPU (measured: an AMD EPYC with AVX2 only, torch 2.13, and an Intel Xeon with
AVX-512 and AMX, torch 2.11, gave this value). Without the pins the same steps give other bits on
both, so removing a pin fails the test on any machine, not only on one with AVX-512."""

from __future__ import annotations

import ast
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cpu_load import busy_cores
from meteor.kernels import DEFAULT_NUM_THREADS, X86_PINS, kernel_settings
from meteor.utils import configure_determinism, reproducibility_info

SRC = Path(__file__).resolve().parents[1] / "src"
PINNED_TORCH = "2.13.0"  # constraints.txt: the golden value holds for this build
# sha256 of the weights after GOLDEN_STEPS, with the pins, on any x86-64 CPU (see module docstring).
GOLDEN_WEIGHTS = "2f3072c525fc42ee4d719ffecc90bd3adf0515eec4ac259f2f991b017c4c6f32"


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


x86_avx2 = pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64") or "avx2" not in _cpu_flags(),
    reason="the pins target x86-64 CPUs with AVX2")


def test_reproducibility_info_names_what_determines_the_bits():
    info = reproducibility_info()
    assert info["torch"] == torch.__version__
    assert info["intra_op_threads"] == torch.get_num_threads()
    assert info["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert info["blas"]  # e.g. "mkl" or "open", as torch.__config__ reports it
    assert info["cpu"] and info["kernel_settings"] == kernel_settings()
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


def _clean_env(**extra: str) -> dict[str, str]:
    """This environment without any kernel or thread variable (a fresh shell), plus ``extra``."""
    drop = {*kernel_settings(), "METEOR_PIN_KERNELS"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(PYTHONPATH=f"{SRC}{os.pathsep}{env.get('PYTHONPATH', '')}", **extra)
    return env


def _python(code: str, **extra_env: str) -> str:
    return subprocess.run([sys.executable, "-c", code], env=_clean_env(**extra_env), check=True,
                          capture_output=True, text=True).stdout.strip()


PRINT_PINS = "import os, meteor; print(' '.join(k + '=' + str(os.environ.get(k)) for k in NAMES))"


def test_importing_meteor_pins_the_environment():
    names = sorted(X86_PINS)
    code = PRINT_PINS.replace("NAMES", repr(names))
    if platform.machine().lower() in ("x86_64", "amd64"):
        assert _python(code) == " ".join(f"{k}={X86_PINS[k]}" for k in names)
    # what the user set wins; METEOR_PIN_KERNELS=0 sets nothing
    assert "MKL_CBWR=AUTO" in _python(code, MKL_CBWR="AUTO")
    assert _python(code, METEOR_PIN_KERNELS="0") == " ".join(f"{k}=None" for k in names)


# A few training steps of a small attention model in plain torch (no transformers, so that the
# golden value depends on the pinned kernels and not on a library's modelling code); prints the
# CPU kernels used and a hash of the weights.
GOLDEN_STEPS = """
{before}
import hashlib, torch
from meteor.kernels import adamw
from meteor.utils import seed_everything
seed_everything(0)
V, D, T = 256, 96, 64
emb, qkv, out = torch.nn.Embedding(V, D), torch.nn.Linear(D, 3 * D), torch.nn.Linear(D, D)
mlp = torch.nn.Sequential(torch.nn.Linear(D, 4 * D), torch.nn.SiLU(), torch.nn.Linear(4 * D, D))
norm, head = torch.nn.LayerNorm(D), torch.nn.Linear(D, V)
params = [p for m in (emb, qkv, out, mlp, norm, head) for p in m.parameters()]
optimizer = adamw(params, lr=1e-3)  # the pipeline's optimizer
ids = torch.randint(0, V, (8, T + 1))
for _ in range(4):
    x = emb(ids[:, :-1])
    q, k, v = (t.unflatten(-1, (4, D // 4)).transpose(1, 2) for t in qkv(norm(x)).chunk(3, -1))
    att = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)  # as Llama
    x = x + out(att.transpose(1, 2).flatten(2))
    x = x + mlp(norm(x))
    loss = torch.nn.functional.cross_entropy(head(norm(x)).flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
weights = b"".join(p.detach().numpy().tobytes() for p in params)
print(torch.backends.cpu.get_cpu_capability(), hashlib.sha256(weights).hexdigest())
"""


def _golden_run(before: str = "", **extra_env: str) -> tuple[str, str]:
    capability, digest = _python(GOLDEN_STEPS.format(before=before), **extra_env).split()[-2:]
    return capability, digest


@pytest.mark.slow
@x86_avx2
def test_pinned_steps_give_the_golden_bits_on_any_x86_machine():
    """The same weights as on the reference machines, an AVX2-only AMD and an AVX-512+AMX Intel."""
    if not torch.__version__.startswith(PINNED_TORCH):
        pytest.skip(f"the golden value is for torch {PINNED_TORCH} (constraints.txt)")
    assert _golden_run() == ("AVX2", GOLDEN_WEIGHTS)


@pytest.mark.slow
@x86_avx2
def test_the_pins_decide_the_bits():
    """The control for the golden test: the machine's own kernels give other bits. If a pin does
    nothing (or is removed), this fails on every machine, AVX2-only ones included."""
    pinned = _golden_run()
    assert _golden_run(METEOR_PIN_KERNELS="0")[1] != pinned[1]


@pytest.mark.slow
@x86_avx2
def test_narrower_cpus_import_order_and_load_give_the_same_bits():
    """One pinned result, whatever the machine and the entry point: an AVX2-only CPU (emulated by
    limiting PyTorch's, MKL's and oneDNN's instruction sets before the process starts), torch
    imported before meteor (the pins are read at the first operation, not at import), and every
    core busy with other work (no thread count or code path may depend on load)."""
    pinned = _golden_run()
    assert pinned[0] == "AVX2"
    avx2_only = _golden_run(ATEN_CPU_CAPABILITY="avx2", MKL_ENABLE_INSTRUCTIONS="AVX2",
                            ONEDNN_MAX_CPU_ISA="AVX2")
    assert avx2_only == pinned
    assert _golden_run(before="import torch; import meteor") == pinned

    with busy_cores():
        assert _golden_run() == pinned


TENSOR_LIBRARIES = ("torch", "transformers", "peft", "accelerate")
ENTRY_POINTS = sorted(p for d in ("stages", "benchmarks", "scripts")
                      for p in (SRC.parent / d).glob("*.py"))


def _imports(tree) -> list[str]:
    names = []
    for node in tree:
        if isinstance(node, ast.Import):
            names += [a.name.split(".")[0] for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.append(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("script", ENTRY_POINTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_entry_point_imports_meteor_before_running_anything(script):
    """The pins are set when meteor is imported. meteor's own tensor code runs after that import by
    construction; a script that also uses a tensor library directly imports meteor at module
    level, so the pins are in place before its first line of work runs."""
    module = ast.parse(script.read_text())
    if not any(name in TENSOR_LIBRARIES for name in _imports(ast.walk(module))):
        return  # tensors only through meteor (or none: e.g. it runs stages as subprocesses)
    assert "meteor" in _imports(module.body), f"{script}: import meteor at module level"
