"""One accelerate set-up per stage: an :class:`~accelerate.Accelerator` and the prepared model,
reused by every :func:`meteor.training.train` call of the stage.

Refine updates the student every few rows; creating an Accelerator and preparing (placing,
DDP-wrapping, autocasting) the model again for each update costs time on a GPU and re-wraps the
model each time. A :class:`TrainSession` prepares the model once; each update only prepares its
own optimizer and data loader, and has the Accelerator forget them when it ends
(``Accelerator.free_memory``), so the optimizer states of earlier updates are not kept alive.
The mixed-precision default and the DeepSpeed values the loop must fill in live here too.

DeepSpeed is the exception: its engine owns the optimizer, so each update with a fresh optimizer
builds a fresh engine (the previous one is destroyed first).
"""

from __future__ import annotations

import logging
import os

import torch

from accelerate import Accelerator
from accelerate.utils import DistributedType

from meteor.training.config import TrainParams

log = logging.getLogger(__name__)


def default_mixed_precision() -> str | None:
    """bf16 (fp16 on GPUs without it) when a GPU is present, else fp32 ("no").

    None defers to ``accelerate launch`` when its config chose a mode.
    """
    if os.environ.get("ACCELERATE_MIXED_PRECISION"):
        return None
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


def _configure_deepspeed(accelerator: Accelerator, params: TrainParams) -> None:
    """Fill the DeepSpeed values accelerate cannot infer from a batch-sampler DataLoader."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        return
    config = plugin.deepspeed_config
    if config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        config["train_micro_batch_size_per_gpu"] = params.batch_size
    if config.get("gradient_clipping", "auto") == "auto":
        config["gradient_clipping"] = params.max_grad_norm


class TrainSession:
    """The Accelerator and the prepared ``model`` shared by every training call of one stage.

    Create it once (``TrainSession(model, train_params)``) and pass it to each
    ``train(..., session=session)``; ``close()`` when done (drops the wrappers; the model passed in
    is the one trained). Every call must use the same ``grad_accum`` (it is fixed when the
    Accelerator is made).
    """

    def __init__(self, model, params: TrainParams):
        self.model = model
        self.grad_accum = params.grad_accum
        self.accelerator = Accelerator(gradient_accumulation_steps=params.grad_accum,
                                       mixed_precision=default_mixed_precision())
        if self.accelerator.distributed_type == DistributedType.FSDP:
            raise ValueError("FSDP is not supported by the training loop: use "
                             "configs/accelerate/ddp.yaml or deepspeed_zero2.yaml")
        _configure_deepspeed(self.accelerator, params)
        self._prepared = None  # the prepared model (DDP wrapper, autocast forward), made once
        self.prepare_count = 0  # how often the model was prepared (1 unless DeepSpeed)

    @property
    def deepspeed(self) -> bool:
        return self.accelerator.distributed_type == DistributedType.DEEPSPEED

    def check(self, model, params: TrainParams) -> None:
        if model is not self.model:
            raise ValueError("this TrainSession was made for another model; make one per model")
        if params.grad_accum != self.grad_accum:
            raise ValueError(f"grad_accum={params.grad_accum} differs from this TrainSession's "
                             f"({self.grad_accum}); it is fixed when the session is made")

    def prepare(self, optimizer, loader):
        """``(prepared_model, optimizer, loader)`` for one training call."""
        accelerator = self.accelerator
        if self.deepspeed:
            if self._prepared is not None:
                accelerator.free_memory()  # destroys the previous engine
            self._prepared, optimizer, loader = accelerator.prepare(self.model, optimizer, loader)
            self.prepare_count += 1
            return self._prepared, optimizer, loader
        if self._prepared is None:
            self._prepared = accelerator.prepare(self.model)
            self.prepare_count += 1
        optimizer, loader = accelerator.prepare(optimizer, loader)
        return self._prepared, optimizer, loader

    def release(self, optimizer, loader) -> None:
        """Forget one call's optimizer and loader (the Accelerator keeps a list of everything it
        prepared; without this, every update's optimizer state would stay in memory)."""
        if self.deepspeed:
            return  # the engine holds them until the next prepare or close()
        # The Accelerator's public way to forget what it prepared forgets the model too; the
        # prepared model stays usable (we hold it), and nothing of this loop needs the
        # Accelerator's list of models (FSDP's clipping would, hence the check in __init__).
        self.accelerator.free_memory()

    def close(self) -> None:
        """Drop every wrapper (DDP, DeepSpeed engine); the model passed in stays trained."""
        self.accelerator.free_memory()
        self._prepared = None
