"""One process: the plain model and AdamW. Also the base of the torch-native ddp and fsdp.

Checkpoints use torch.distributed.checkpoint (DCP) with ``get_state_dict``/``set_state_dict``,
which key the model and optimizer state by parameter name whatever the wrapping, so a
checkpoint from any torch-native strategy and world size loads into any other. Frozen parameters
(a LoRA run's base) are left out of checkpoints and of ``full_state_dict``: they are the base's.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from trainer.strategy import Strategy, materialize
from trainer.strategy.optim import build_adamw, set_lr
from trainer.strategy.prepare import prepare

# a LoRA run's frozen base is not the checkpoint's (not strict: dcp.load already refuses a missing trained key)
TRAINED = StateDictOptions(ignore_frozen_params=True, strict=False)


class Single(Strategy):
    def wrap(self, model: nn.Module) -> nn.Module:
        self.model = self.parallelize(prepare(self.place(model), self.cfg.activation_checkpointing, self.cfg.compile))
        self.optimizer = build_adamw(self.model, self.cfg, self.env.device)
        return self.model

    def place(self, model: nn.Module) -> nn.Module:
        """Hook for subclasses: the model on the device, before :meth:`parallelize`; a QLoRA model's
        frozen base quantised to NF4 there (``model.lora.quantize_base``)."""
        from model.lora import quantize_base

        materialize(model, self.cfg.seed)
        model = model.to(self.env.device)
        quantize_base(model)
        return model

    def parallelize(self, model: nn.Module) -> nn.Module:
        """Hook for subclasses: wrap the prepared model for data parallelism."""
        return model

    def wrap_frozen(self, model: nn.Module) -> nn.Module:
        model.requires_grad_(False)
        return self.place(model).eval()

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.cfg.precision == "bf16":
            return torch.autocast(self.env.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, lr: float, skip: bool = False) -> float:
        limit = self.cfg.grad_clip if self.cfg.grad_clip > 0 else math.inf
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), limit, foreach=True)
        norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        if not skip and math.isfinite(norm):
            set_lr(self.optimizer, lr)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def save(self, path: Path) -> None:
        model_state, optim_state = get_state_dict(self.model, self.optimizer, options=TRAINED)
        with _single_process_dcp():
            dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=path / "dcp")

    def load(self, path: Path) -> None:
        model_state, optim_state = get_state_dict(self.model, self.optimizer, options=TRAINED)
        state = {"model": model_state, "optim": optim_state}
        with _single_process_dcp():
            dcp.load(state, checkpoint_id=path / "dcp")
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=TRAINED)

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
        state = get_model_state_dict(self.model, options=options)
        return state if self.env.is_main else None


@contextlib.contextmanager
def _single_process_dcp():
    """DCP without a process group warns that it assumes one process: that is exactly the intent here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield
