"""DeepSpeed ZeRO stage 1, 2 or 3 (train.strategy zero1/zero2/zero3), our torch AdamW as client optimizer.

Gradient accumulation is driven by us: the boundary is set explicitly before each micro-batch,
``backward`` does not rescale by the accumulation steps (the loop already normalised the loss by
the global token count), and ``engine.step()`` runs once per optimizer step. Clipping is
DeepSpeed's own (``gradient_clipping``). A skipped step runs at learning rate 0 (the weights do not
move; non-finite gradients are already discarded by ZeRO's own overflow check).

Checkpoints are DeepSpeed's own (one partition per rank, under ``<step>/deepspeed``). Resuming on
another number of ranks goes through DeepSpeed's universal checkpoint: rank 0 converts the step once
with ``ds_to_universal`` into ``<step>/deepspeed_universal`` (kept for later resumes, with its own
manifest) and every rank loads that with ``load_universal``, optimizer moments included. DeepSpeed
unpickles its files: each is loaded only after its sha256 matched the manifest (the step's, checked
before resuming, or the conversion's).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from common.errors import UserError
from common.manifest import MANIFEST, write_manifest
from trainer.checkpoint import read_state, verify
from trainer.config import StrategyName, TrainConfig
from trainer.distributed import DistEnv, barrier, release_at_teardown
from trainer.strategy import Strategy, materialize
from trainer.strategy.ds_config import build_ds_config
from trainer.strategy.optim import build_adamw, set_lr
from trainer.strategy.prepare import prepare

TAG = "deepspeed"
UNIVERSAL = "deepspeed_universal"  # <step>/deepspeed_universal/deepspeed: the step converted by ds_to_universal

log = logging.getLogger("tessera.trainer")


def import_deepspeed() -> Any:
    """Import deepspeed without the shared-memory comm op it compiles on CPU (~60 s, inference only)."""
    import deepspeed  # noqa: F401  (registers deepspeed.comm.torch in sys.modules)

    backend = sys.modules["deepspeed.comm.torch"]
    backend.build_shm_op = lambda: None
    # barrier and monitored_barrier take group=GroupMember.WORLD as a default, evaluated at import: imported
    # after the process group started (as here), they would hold it past teardown. None means WORLD to them too.
    for method in (backend.TorchBackend.barrier, backend.TorchBackend.monitored_barrier):
        method.__defaults__ = tuple(None if isinstance(value, dist.ProcessGroup) else value
                                    for value in method.__defaults__)
    return sys.modules["deepspeed"]


def release_engine(engine: Any) -> None:
    """Let go of what keeps a DeepSpeed engine, and the process groups it holds, alive past teardown: its
    gradient hooks, in autograd's C++ nodes out of Python's garbage collector's reach (``destroy``); under
    ZeRO-3 what ``destroy`` leaves (deepspeed 0.19.8, private names, guarded): the model on a module-level
    stack, and a class-wide ``lru_cache`` keyed by the engine's parameter coordinator and its modules."""
    engine.destroy()
    stack = getattr(sys.modules.get("deepspeed.runtime.zero.parameter_offload"), "FWD_MODULE_STACK", None)
    if isinstance(stack, list):
        stack[:] = [module for module in stack if module is not engine.module]
    coordinator = getattr(sys.modules.get("deepspeed.runtime.zero.partitioned_param_coordinator"),
                          "PartitionedParameterCoordinator", None)
    wrapper = getattr(coordinator, "_PartitionedParameterCoordinator__params_to_release", None)
    for cell in getattr(wrapper, "__closure__", None) or ():  # the lru_cache sits under an NVTX wrapper
        if hasattr(cell.cell_contents, "cache_clear"):
            cell.cell_contents.cache_clear()


class DeepSpeed(Strategy):
    def __init__(self, cfg: TrainConfig, env: DistEnv, accumulation: int = 1) -> None:
        super().__init__(cfg, env, accumulation)
        self.stage = StrategyName(cfg.strategy).zero_stage
        self.checkpoint_format = f"deepspeed-zero{self.stage}"

    def config(self) -> dict[str, Any]:
        return build_ds_config(self.cfg, self.stage, self.accumulation, self.env.world_size)

    def wrap(self, model: nn.Module) -> nn.Module:
        deepspeed = import_deepspeed()
        config = self.config()
        model = prepare(self.place(model, config), self.cfg.activation_checkpointing, self.cfg.compile)
        offloaded = "offload_optimizer" in config["zero_optimization"]  # ours or the user's ds_config
        # Offloaded states live on the CPU, where torch's fused AdamW needs no C++ build (DeepSpeedCPUAdam does).
        optimizer = build_adamw(model, self.cfg, torch.device("cpu") if offloaded else self.env.device)
        self.model, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        release_at_teardown(self.model, release_engine)
        return self.model

    def place(self, model: nn.Module, config: dict[str, Any]) -> nn.Module:
        """The model on the device. Under ZeRO-3 partitioned one parameter at a time, after a bf16 cast
        where it is (``deepspeed.initialize`` would move the whole fp32 model to the device and cast it
        there), and a fresh model block by block as it is materialised: the whole model never exists
        on the device, nor (fresh) on the host."""
        if self.stage < 3:
            materialize(model, self.cfg.seed)
            return model.to(self.env.device)
        deepspeed = import_deepspeed()
        deepspeed.init_distributed()  # wraps our process group (initialize would, later)
        dtype = torch.bfloat16 if config.get("bf16", {}).get("enabled") else torch.float32

        def partition(module: nn.Module) -> None:
            for param in module.parameters():
                if not hasattr(param, "ds_id"):  # not partitioned yet
                    param.data = param.data.to(dtype)
            # offloaded parameters go straight to the config's offload_param device
            deepspeed.zero.Init(module=module, config_dict_or_path=config, dtype=dtype)

        materialize(model, self.cfg.seed, on_block=partition)
        for module in model.modules():  # buffers are never partitioned
            for name, buffer in module._buffers.items():
                if buffer is not None:
                    module._buffers[name] = buffer.to(self.env.device)
        partition(model)
        return model

    def wrap_frozen(self, model: nn.Module) -> nn.Module:
        model.requires_grad_(False)
        config = {k: v for k, v in self.config().items() if k not in ("gradient_clipping",)}
        model = self.place(model, config).eval()
        if self.stage < 3:
            return model  # ZeRO-1/2 shard optimizer state and gradients only: a frozen model stays whole
        engine, *_ = import_deepspeed().initialize(model=model, config=config)
        release_at_teardown(engine, release_engine)
        engine.eval()  # DeepSpeedEngine.eval() returns None, not the engine
        return engine

    @contextlib.contextmanager
    def accumulate(self, last: bool) -> Iterator[None]:
        self.model.set_gradient_accumulation_boundary(last)
        yield

    def backward(self, loss: torch.Tensor) -> None:
        self.model.backward(loss, scale_wrt_gas=False)

    def step(self, lr: float, skip: bool = False) -> float:
        set_lr(self.optimizer, 0.0 if skip else lr)
        self.model.step()
        norm = self.model.get_global_grad_norm()
        return float("nan") if norm is None else float(norm)

    def save(self, path: Path) -> None:
        from deepspeed.checkpoint.constants import (
            UNIVERSAL_CHECKPOINT_INFO,
            UNIVERSAL_CHECKPOINT_VERSION_KEY,
            UNIVERSAL_CHECKPOINT_VERSION_VALUE,
        )

        # ds_to_universal refuses (ZeRO-1/2) a checkpoint whose client state lacks this entry
        info = {UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}}
        self.model.save_checkpoint(str(path), tag=TAG, client_state=info, save_latest=False,
                                   exclude_frozen_parameters=True)

    def load(self, path: Path) -> None:
        saved_world = read_state(path)["world_size"]
        if saved_world == self.env.world_size:  # a LoRA run's checkpoint lacks its frozen base: not strict
            strict = all(p.requires_grad for p in self.model.module.parameters())
            loaded, _ = self.model.load_checkpoint(str(path), tag=TAG, load_lr_scheduler_states=False,
                                                   load_module_strict=strict)
        else:
            self.check_reshardable(path, saved_world)
            loaded = self.load_universal(path)
        if loaded is None:
            raise RuntimeError(f"DeepSpeed could not load {path / TAG}")

    def check_reshardable(self, path: Path, saved_world: int) -> None:
        """Optimizer state offloaded to NVMe lives in per-rank swap files that universal checkpoints do not carry."""
        offload = self.config()["zero_optimization"].get("offload_optimizer", {})
        if offload.get("device") == "nvme" or (path / TAG / "offloaded_tensors").is_dir():
            raise UserError(
                f"checkpoint {path} was saved on {saved_world} ranks; {self.cfg.strategy} with the optimizer state "
                f"offloaded to NVMe cannot resume it on {self.env.world_size} (DeepSpeed's universal checkpoints do "
                f"not carry NVMe-offloaded state): resume on {saved_world} ranks, or start from its weights with "
                "model.init and checkpoint.resume=never"
            )

    def load_universal(self, path: Path) -> str | None:
        """Load step ``path`` saved on another number of ranks: rank 0 converts it (once), all ranks load."""
        if self.env.is_main:
            convert_to_universal(path)
        barrier()
        verify(path / UNIVERSAL, self.env)  # DeepSpeed unpickles these files: only once their hashes check out
        # load_universal is read only by load_checkpoint: switch it on for this load, not for the whole run
        config = self.model._config
        config.load_universal_checkpoint = True
        try:
            loaded, _ = self.model.load_checkpoint(str(path / UNIVERSAL), tag=TAG, load_lr_scheduler_states=False)
        finally:
            config.load_universal_checkpoint = False
        if self.stage == 3:
            self.repair_zero3_universal_load(path / UNIVERSAL)
        return loaded

    def repair_zero3_universal_load(self, universal: Path) -> None:
        """Undo two slips of DeepSpeed 0.19.8's ZeRO-3 universal load with several parameter groups.

        It gives every group the first group's hyperparameters (weight decay would reach the biases
        and norms), and one shared ``step`` tensor, which AdamW then advances once per group and step.
        """
        # a pickle DeepSpeed wrote, loaded like DeepSpeed does, after load_universal verified its sha256
        saved = torch.load(universal / TAG / "zero" / "optimizer_state.pt", map_location="cpu", weights_only=False)
        for group, saved_group in zip(self.optimizer.param_groups, saved["param_groups"], strict=True):
            group.update({k: v for k, v in saved_group.items() if k != "params"})
        for state in self.optimizer.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()

    def local_weights(self) -> Iterator[torch.Tensor]:
        """ZeRO-3 keeps each rank's partition of a parameter in ``ds_tensor``."""
        for param in self.model.module.parameters():
            if param.requires_grad:
                yield getattr(param, "ds_tensor", param)

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The optimizer's fp32 master weights, as fsdp and ddp save (the module's own copy is bf16
        under train.precision=bf16, and partitioned under ZeRO-3); every rank gathers, one at a time."""
        from deepspeed.utils import safe_get_full_fp32_param

        state = {}
        for name, param in self.model.module.named_parameters():
            if not param.requires_grad:  # a LoRA run's frozen base: the base model's, not this run's
                continue
            master = safe_get_full_fp32_param(param)
            if master is None:
                raise RuntimeError(f"DeepSpeed's optimizer holds no fp32 copy of {name} (a frozen parameter?)")
            if self.env.is_main:
                state[name] = master.detach().float().cpu()
        return state if self.env.is_main else None


def convert_to_universal(step_dir: Path) -> Path:
    """``step_dir/deepspeed`` → ``step_dir/deepspeed_universal/deepspeed`` with DeepSpeed's ds_to_universal.

    Written under a temporary name with its own manifest (the step's does not list it: it is derived,
    added after the save) and renamed when complete. An existing conversion is reused (and verified
    before it is loaded); one without a manifest, from an older Tessera, is made again.
    """
    final = step_dir / UNIVERSAL
    if (final / MANIFEST).is_file():
        return final
    shutil.rmtree(final, ignore_errors=True)
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    tmp = step_dir / f".tmp_{UNIVERSAL}"
    shutil.rmtree(tmp, ignore_errors=True)  # left by a conversion that crashed
    args = argparse.Namespace(
        input_folder=str(step_dir / TAG), output_folder=str(tmp / TAG),
        num_extract_workers=1, num_merge_workers=1,  # in-process: no process pools forked from a rank
        keep_temp_folder=False, strict=True, inject_missing_state=False,
    )
    started = time.perf_counter()
    chatter = io.StringIO()  # the converter prints progress: keep it out of the run's output
    with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
        ds_to_universal(args)
    write_manifest(tmp)
    os.rename(tmp, final)
    log.info("converted %s to a universal checkpoint in %.1f s", step_dir / TAG, time.perf_counter() - started)
    return final
