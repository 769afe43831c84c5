"""Shared fixtures: tiny models built in milliseconds, nothing downloaded."""

from __future__ import annotations

import os
import tempfile

import pytest

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
