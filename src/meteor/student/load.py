"""Load any student: a local ``save_pretrained`` dir, a hub id, or a PEFT adapter dir (sft and later).

``load_student`` puts the model on the accelerator the stage trains on (:func:`default_device`),
once, so generation runs there too. It never downloads unless asked (``allow_download``, param
``student.allow_download``): a hub id must already be in the local Hugging Face cache.

``resolve_revision`` pins what was loaded, so a run can be reproduced: the commit hash for a hub id
(read from the local hub cache, never fetched), a content hash for a local directory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _torch_dtype(dtype: str | torch.dtype) -> str | torch.dtype:
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected 'auto' or one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def default_device() -> torch.device:
    """The device accelerate trains on in this process: ``cuda:<LOCAL_RANK>`` when CUDA is
    available, else Apple's ``mps``, else the CPU; ``ACCELERATE_USE_CPU`` (``accelerate launch --cpu``) forces
    the CPU. Loading the student there means generation before, between and after training runs
    on the same device as training, and ``Accelerator.prepare`` has nothing left to move."""
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def prepare_tokenizer_for_generation(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Decoder-only batches are padded on the left; a model without a pad token pads with eos."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def _load_plain(name_or_path: str, revision: str | None, dtype: str, trust_remote_code: bool,
                allow_download: bool, tokenizer_source: str | None = None
                ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    try:
        model = AutoModelForCausalLM.from_pretrained(
            name_or_path,
            revision=revision,
            dtype=_torch_dtype(dtype),
            trust_remote_code=trust_remote_code,
            use_safetensors=True,
            local_files_only=not allow_download,
        )
        tokenizer = AutoTokenizer.from_pretrained(
            tokenizer_source or name_or_path,
            revision=None if tokenizer_source else revision,
            trust_remote_code=trust_remote_code,
            local_files_only=not allow_download,
        )
    except OSError as e:
        if allow_download or Path(name_or_path).is_dir():
            raise
        raise OSError(f"{name_or_path!r} is neither a local directory nor in the local Hugging Face "
                      "cache, and downloads are off: download it first (`hf download "
                      f"{name_or_path}`) or set student.allow_download: true ({e})") from e
    prepare_tokenizer_for_generation(tokenizer)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def context_length(model, tokenizer=None) -> int | None:
    """The model's context window in tokens: its config's ``max_position_embeddings``, else (given
    ``tokenizer``) the tokenizer's ``model_max_length`` when that states a real limit (tokenizers
    without one report a huge placeholder); None when neither says."""
    n = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if n is None and tokenizer is not None and getattr(tokenizer, "model_max_length", 0) < 10**9:
        n = tokenizer.model_max_length
    return n


def load_student(
    name_or_path: str | Path,
    *,
    revision: str | None = None,
    dtype: str | torch.dtype = "auto",
    trust_remote_code: bool = False,
    adapter_trainable: bool = False,
    allow_download: bool = False,
    device: str | torch.device | None = "auto",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``(model, tokenizer)`` ready for generation (eval mode, pad token set, left padding).

    The model is moved to ``device``: ``"auto"`` is :func:`default_device` (the accelerator, as
    training uses it), ``None`` leaves it where ``from_pretrained`` put it (the CPU). Nothing is
    downloaded unless ``allow_download`` (files come from local dirs or the local hub cache).

    ``name_or_path`` is a local ``save_pretrained`` directory or a hub id. A directory holding an
    ``adapter_config.json`` (a PEFT adapter, as sft saves it) loads the base model named in that
    config plus the adapter, and the tokenizer saved next to the adapter when there is one.
    ``adapter_trainable`` keeps the adapter weights trainable (to continue training it).
    """
    name_or_path = str(name_or_path)
    adapter_dir = Path(name_or_path)
    target = default_device() if device == "auto" else device
    if not (adapter_dir / ADAPTER_CONFIG).is_file():
        model, tokenizer = _load_plain(name_or_path, revision, dtype, trust_remote_code,
                                       allow_download)
        if target is not None:
            model.to(target)
        model.eval()
        return model, tokenizer

    from peft import PeftModel  # imported here: plain loads never need peft

    adapter_config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    base = adapter_config.get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{adapter_dir / ADAPTER_CONFIG} names no base_model_name_or_path")
    has_tokenizer = any((adapter_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
    log.info("loading adapter %s on base model %s", adapter_dir, base)
    model, tokenizer = _load_plain(base, adapter_config.get("revision"), dtype, trust_remote_code,
                                   allow_download,
                                   tokenizer_source=name_or_path if has_tokenizer else None)
    model = PeftModel.from_pretrained(model, name_or_path, is_trainable=adapter_trainable)
    if target is not None:
        model.to(target)
    if not adapter_trainable:
        model.eval()
    return model, tokenizer


def directory_hash(path: str | Path) -> str:
    """sha256 over every file's relative path and bytes, in sorted order (hidden files skipped)."""
    root = Path(path)
    digest = hashlib.sha256()
    files = sorted(p for p in root.rglob("*")
                   if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts))
    for file in files:
        digest.update(file.relative_to(root).as_posix().encode() + b"\0")
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()


def _cached_hub_commit(repo_id: str, revision: str | None) -> str | None:
    """The commit a hub id + revision resolves to in the local hub cache; no network access."""
    from huggingface_hub import snapshot_download

    try:
        snapshot = snapshot_download(repo_id, revision=revision, local_files_only=True)
    except Exception as e:  # not cached (or not a valid repo id): nothing to record offline
        log.debug("no cached snapshot of %s@%s: %s", repo_id, revision, e)
        return None
    return Path(snapshot).name  # snapshots/<commit hash>


def resolve_revision(name_or_path: str | Path, revision: str | None = None) -> dict[str, Any]:
    """Record exactly what ``name_or_path`` is: ``{"source", "kind", "revision"}``.

    A local directory gets ``kind="local"`` and ``revision="sha256:<content hash>"``; a hub id gets
    ``kind="hub"`` and the commit hash found in the local hub cache (``None`` with a warning when it
    is not cached: this function never downloads).
    """
    source = str(name_or_path)
    if Path(source).is_dir():
        return {"source": source, "kind": "local", "revision": f"sha256:{directory_hash(source)}"}
    commit = _cached_hub_commit(source, revision)
    if commit is None:
        log.warning("could not resolve %s@%s to a commit offline; revision not recorded",
                    source, revision or "main")
    return {"source": source, "kind": "hub", "revision": commit, "requested_revision": revision}
