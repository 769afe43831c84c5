"""LoRA via peft (the default) or full fine-tuning, and saving/reloading what was trained.

A LoRA run saves only the adapter (``adapter_config.json`` + ``adapter_model.safetensors``) and
the tokenizer; a full fine-tuning run saves the whole model with ``save_pretrained``. Either
directory reloads with :func:`meteor.student.load.load_student` (``adapter_trainable=True`` to
keep training the adapter), or with plain ``PeftModel.from_pretrained(base, path)``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model

from meteor.training.config import LoraParams

log = logging.getLogger(__name__)


def lora_config(params: LoraParams) -> LoraConfig:
    return LoraConfig(
        r=params.r,
        lora_alpha=params.alpha,
        lora_dropout=params.dropout,
        target_modules=list(params.target_modules),
        task_type="CAUSAL_LM",
    )


def check_adapter_matches(model: PeftModel, params: LoraParams, key: str) -> None:
    """Refuse LoRA params that differ from the adapter ``model`` already carries: that adapter is
    trained on as it is, so a different value would silently do nothing. ``key`` names the
    params block in the message (e.g. ``refine.train.lora``)."""
    config = model.peft_config[model.active_adapter]
    loaded = {"enabled": True, "r": config.r, "alpha": config.lora_alpha,
              "dropout": config.lora_dropout, "target_modules": sorted(config.target_modules)}
    wanted = {"enabled": params.enabled, "r": params.r, "alpha": params.alpha,
              "dropout": params.dropout, "target_modules": sorted(params.target_modules)}
    wrong = [f"{key}.{name}={wanted[name]!r} but the loaded adapter has {loaded[name]!r}"
             for name in loaded if wanted[name] != loaded[name]]
    if wrong:
        raise ValueError("; ".join(wrong) + ". The loaded adapter keeps training as it was made: "
                         f"set {key} to its values (or change the stage that made it)")


def require_adapter(model, params: LoraParams, key: str) -> None:
    """For a stage that only continues an adapter (self_train): ``model`` must carry one, and
    ``params`` must describe it (:func:`check_adapter_matches`)."""
    if not isinstance(model, PeftModel):
        raise ValueError(f"{key}: this stage continues a LoRA adapter, but the loaded student has "
                         "none (full fine-tuning is not supported here)")
    check_adapter_matches(model, params, key)


def make_trainable(model, params: LoraParams, *, seed: int = 0, key: str = "lora"):
    """Return the model to train: with a fresh LoRA adapter, or with every weight trainable.

    A model that already is a :class:`PeftModel` is returned as is, so repeated updates (refine's
    in-loop fine-tuning) keep training the same adapter instead of stacking new ones; ``params``
    must then describe that adapter (:func:`check_adapter_matches`, ``key`` names the block).
    """
    if isinstance(model, PeftModel):
        check_adapter_matches(model, params, key)
        return model
    if not params.enabled:
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    available = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [m for m in params.target_modules if m not in available]
    if missing:
        raise ValueError(f"lora.target_modules {missing} are not modules of "
                         f"{type(model).__name__}; it has e.g. {sorted(available)[:12]}")
    torch.manual_seed(seed)  # LoRA A matrices are randomly initialised
    peft_model = get_peft_model(model, lora_config(params))
    trainable, total = peft_model.get_nb_trainable_parameters()
    log.info("LoRA r=%d alpha=%d on %s: %d of %d parameters trainable (%.2f%%)",
             params.r, params.alpha, ",".join(params.target_modules), trainable, total,
             100 * trainable / total)
    return peft_model


def save_trained(model, tokenizer, out_dir: str | Path) -> None:
    """Save the adapter (LoRA) or the full model (full fine-tuning), plus the tokenizer."""
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    _sort_target_modules(out_dir / "adapter_config.json")


def _sort_target_modules(config_path: Path) -> None:
    """peft keeps ``target_modules`` as a set and writes it in hash order, which changes from one
    process to the next; write it sorted so two runs save byte-identical adapters."""
    if not config_path.exists():
        return
    config = json.loads(config_path.read_text())
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True))
