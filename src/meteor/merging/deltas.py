"""θ_self_train + Σ w_k·Δ_k as one peft model whose weights w_k change in memory.

One :class:`peft.PeftModel` on the base model holds the self-trained adapter (frozen, always on,
weight 1) and one LoRA adapter per delta. A delta is trained with the shared training loop while
the self-trained adapter is active, so Δ_k is learned on top of θ_self_train itself (not on the
base). Dropout is switched off in the self-trained adapter, so the function trained on is exactly
θ_self_train + Δ_k.

Weights are LoRA scalings: ``set_weights({k: w_k})`` sets adapter k's scaling to
``w_k · alpha_k / r_k`` in every LoRA layer and activates the adapters with ``w_k != 0``. That is
θ_self_train + Σ w_k·B_k A_k·(alpha_k / r_k) computed exactly as the trained model computes it:
one-hot weights give the forward pass the delta was trained with, zero weights the self-trained
model's. Switching costs a loop over the LoRA layers, nothing is reloaded.

The merged model is saved as ONE LoRA adapter on the base model with peft's
``add_weighted_adapter(..., combination_type="cat")``: A_cat stacks w_k·scaling_k·A_k and B_cat
stacks B_k, so B_cat A_cat = Σ w_k·scaling_k·B_k A_k exactly (rank = Σ r_k). peft's ``linear``
combination instead averages the A's and the B's separately, which adds cross terms B_j A_k.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from torch import nn

from meteor.io import atomic_path
from meteor.training.config import LoraParams
from meteor.training.lora import lora_config

log = logging.getLogger(__name__)

SELF_TRAIN = "self_train"  # adapter name of θ_self_train inside the merge model
MERGED = "merged"  # adapter name of the exported merge
_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


def delta_adapter_name(chunk: str) -> str:
    """The peft adapter name of a chunk's delta (peft adapter names become module keys)."""
    if not _NAME.match(chunk):
        raise ValueError(f"chunk name {chunk!r} must be letters, digits, '_' or '-'")
    return f"delta_{chunk}"


class DeltaModel:
    """A peft model holding θ_self_train and the delta adapters, with in-memory weights."""

    def __init__(self, model: PeftModel):
        if SELF_TRAIN not in model.peft_config:
            raise ValueError(f"the model has no {SELF_TRAIN!r} adapter")
        self.model = model
        self.deltas: list[str] = []  # adapter names, in the order they were added
        self._layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
        # The self-trained adapter is part of the starting point, not a trained perturbation:
        # no dropout on it, so training sees exactly θ_self_train.
        for layer in self._layers:
            if SELF_TRAIN in layer.lora_dropout:
                layer.lora_dropout[SELF_TRAIN] = nn.Identity()
        self.set_weights({})

    @classmethod
    def from_self_train(cls, base_model, self_train_dir: str | Path) -> DeltaModel:
        """Wrap a loaded base model with the self-trained adapter saved in ``self_train_dir``."""
        self_train_dir = Path(self_train_dir)
        if not (self_train_dir / "adapter_config.json").is_file():
            raise ValueError(f"{self_train_dir} is not a LoRA adapter directory (no "
                             "adapter_config.json); merge needs self_train to be a LoRA adapter")
        model = PeftModel.from_pretrained(base_model, str(self_train_dir), adapter_name=SELF_TRAIN)
        model.eval()
        return cls(model)

    # -------------------------------------------------------------------------------- deltas
    def add_delta(self, name: str, lora: LoraParams, *, seed: int = 0) -> None:
        """Add a freshly initialised delta adapter (LoRA A is random, B is zero)."""
        if not lora.enabled:
            raise ValueError("merge deltas are LoRA adapters: merge.train.lora.enabled must be true")
        torch.manual_seed(seed)  # the init of A depends only on the seed, not on what came before
        self.model.add_adapter(name, lora_config(lora))
        self._register(name)

    def load_delta(self, name: str, path: str | Path) -> None:
        """Add a delta saved by :meth:`save_delta`."""
        self.model.load_adapter(str(path), adapter_name=name)
        self._register(name)

    def _register(self, name: str) -> None:
        self.deltas.append(name)
        self._layers = [m for m in self.model.modules() if isinstance(m, LoraLayer)]
        self.set_weights({})
        # peft creates the new adapter's modules (its dropout) in training mode
        self.model.eval()

    def save_delta(self, name: str, out_dir: str | Path) -> None:
        """Save one delta adapter (adapter_config.json + adapter_model.safetensors) atomically."""
        with atomic_path(out_dir, is_dir=True) as tmp:
            self.model.save_pretrained(tmp, selected_adapters=[name], safe_serialization=True)
            for f in (Path(tmp) / name).iterdir():  # peft puts a non-default adapter in a subdir
                f.rename(Path(tmp) / f.name)
            (Path(tmp) / name).rmdir()

    def training_mode(self, name: str) -> None:
        """Activate θ_self_train + delta ``name`` at weight 1 with only that delta trainable."""
        self.set_weights({name: 1.0})
        for param_name, p in self.model.named_parameters():
            p.requires_grad_(f".{name}." in param_name)

    # -------------------------------------------------------------------------------- weights
    def set_weights(self, weights: dict[str, float]) -> None:
        """Make the model θ_self_train + Σ w_k·Δ_k (deltas not named get weight 0)."""
        unknown = set(weights) - set(self.deltas)
        if unknown:
            raise KeyError(f"unknown deltas {sorted(unknown)}; known: {self.deltas}")
        for name in self.deltas:
            scale = float(weights.get(name, 0.0))
            for layer in self._layers:
                layer.set_scale(name, scale)
        for layer in self._layers:
            layer.set_scale(SELF_TRAIN, 1.0)
        # Adapters at weight 0 are left out of the forward pass: adding 0·Δ changes nothing,
        # and skipping it saves its compute. The order is fixed: self_train, then the deltas.
        active = [SELF_TRAIN] + [n for n in self.deltas if weights.get(n, 0.0) != 0.0]
        self.model.base_model.set_adapter(active, inference_mode=True)

    # -------------------------------------------------------------------------------- export
    def merged_adapter(self, weights: dict[str, float], adapter_name: str = MERGED,
                       combination_type: str = "cat") -> str:
        """Add adapter ``adapter_name`` = self_train (weight 1) + Σ w_k·Δ_k as one LoRA adapter.

        ``combination_type="cat"`` is exact; other peft combinations are accepted only so that
        tests can show they are not.
        """
        names = [n for n in self.deltas if weights.get(n, 0.0) != 0.0]
        if adapter_name in self.model.peft_config:
            self.model.delete_adapter(adapter_name)
        # add_weighted_adapter multiplies by each adapter's *current* scaling: reset them first.
        self.set_weights({})
        for layer in self._layers:
            for name in self.deltas:
                layer.set_scale(name, 1.0)
        self.model.add_weighted_adapter(
            adapters=[SELF_TRAIN, *names], weights=[1.0, *(float(weights[n]) for n in names)],
            adapter_name=adapter_name, combination_type=combination_type)
        self._layers = [m for m in self.model.modules() if isinstance(m, LoraLayer)]
        self.set_weights(weights)
        self.model.eval()  # the new adapter's dropout is built in training mode
        return adapter_name

    def use_only(self, adapter_name: str) -> None:
        """Activate one adapter alone (e.g. the exported merge) at its own scaling."""
        self.model.base_model.set_adapter([adapter_name], inference_mode=True)

    def save_merged(self, weights: dict[str, float], out_dir: str | Path, tokenizer,
                    base_model_name_or_path: str | None = None) -> None:
        """Save θ_self_train + Σ w_k·Δ_k as ONE LoRA adapter (+ tokenizer), atomically.

        The directory loads with plain ``PeftModel.from_pretrained(base, out_dir)``.
        """
        name = self.merged_adapter(weights)
        try:
            with atomic_path(out_dir, is_dir=True) as tmp:
                tmp = Path(tmp)
                self.model.save_pretrained(tmp, selected_adapters=[name], safe_serialization=True)
                for f in (tmp / name).iterdir():  # peft puts a non-default adapter in a subdir
                    f.rename(tmp / f.name)
                (tmp / name).rmdir()
                tokenizer.save_pretrained(tmp)
                _normalise_config(tmp / "adapter_config.json", base_model_name_or_path)
        finally:
            self.model.delete_adapter(name)
            self._layers = [m for m in self.model.modules() if isinstance(m, LoraLayer)]
            self.set_weights(weights)


def _normalise_config(path: Path, base_model_name_or_path: str | None) -> None:
    """Sorted target_modules (peft writes a set in hash order, which changes per process), the
    base model it applies to, and inference mode (the merge is not meant to be trained further)."""
    config = json.loads(path.read_text())
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    if base_model_name_or_path is not None:
        config["base_model_name_or_path"] = base_model_name_or_path
    config["inference_mode"] = True
    path.write_text(json.dumps(config, indent=2, sort_keys=True))
