"""The reference model of DPO-style losses: live (a frozen copy held by the strategy) or precomputed.

Live: the starting model (``model.init``, or the seeded initialisation) is built a second time and
given to ``strategy.wrap_frozen``, so under fsdp/zero3 it is sharded like the policy and every
reference forward costs gathers, not a full copy per rank. A LoRA run starting from its base needs
no copy at all: the reference is the policy with its adapters switched off.

Precomputed: one pass of that frozen model over every preference shard directory of the run
(``data.train`` and ``data.valid``) writes ``reference_logps.npy`` ([samples, (chosen, rejected)]
summed log-probs, in manifest order) beside the shards, and the data loader attaches the values to
each batch as ``ref_chosen_logps``/``ref_rejected_logps``; training then holds no reference model.
A ``reference_logps.json`` next to it records what produced the values; when it no longer matches
(another starting model, seq_len or tokenizer) the pass runs again.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.errors import UserError
from trainer.build import starting_model
from trainer.distributed import all_gather_object, barrier
from trainer.objectives import ObjectiveContext
from trainer.objectives.pairs import pair_logps

log = logging.getLogger("tessera.trainer")
SIDECAR = "reference_logps.json"


class AdaptersOff:
    """The policy with its LoRA adapters switched off: the base model it adapts, with no second copy
    (the inner module is called, so DDP does not sync; FSDP2 and ZeRO-3 gather as for the policy)."""

    def __init__(self, policy: torch.nn.Module) -> None:
        from trainer.distributed import unwrap

        self.module = unwrap(policy)

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        from model.lora import adapters_disabled

        training = self.module.training
        self.module.eval()  # as the frozen copy is: no dropout in the reference
        try:
            with adapters_disabled(self.module):
                return self.module(*args, **kwargs)
        finally:
            self.module.train(training)


def reference_is_the_base(ctx: ObjectiveContext) -> bool:
    """A LoRA run whose adapters start at zero (not from an adapter checkpoint): its starting model is
    the base, which the policy itself computes with its adapters off."""
    from model.io import ADAPTER_CONFIG, resolve_checkpoint

    cfg = ctx.cfg
    return cfg.lora.enabled and not (resolve_checkpoint(cfg.model.init) / ADAPTER_CONFIG).is_file()


def live_reference(ctx: ObjectiveContext) -> torch.nn.Module | AdaptersOff:
    """The frozen reference: a LoRA policy's base (its adapters off), else a copy of the starting
    model placed and sharded by the run's strategy."""
    if reference_is_the_base(ctx):
        return AdaptersOff(ctx.model)
    return ctx.strategy.wrap_frozen(starting_model(ctx.cfg, ctx.tokenizer.vocab_size))


def reference_identity(ctx: ObjectiveContext) -> dict[str, Any]:
    """What the stored log-probs depend on; a mismatch means they must be computed again."""
    from model.io import ADAPTER_WEIGHTS, WEIGHTS, resolve_checkpoint

    cfg = ctx.cfg
    init = None
    if cfg.model.init is not None:  # the concrete directory: a run's checkpoints/ moves on as it trains
        directory = resolve_checkpoint(cfg.model.init).resolve()
        weights = (directory / (ADAPTER_WEIGHTS if (directory / ADAPTER_WEIGHTS).is_file() else WEIGHTS)).stat()
        init = {"path": str(directory), "bytes": weights.st_size, "mtime_ns": weights.st_mtime_ns}
    return {
        "model_init": init,
        "model": None if init else {**cfg.model.model_config().to_dict(), "seed": cfg.train.seed},
        "seq_len": cfg.data.seq_len,
        "tokenizer_sha256": getattr(ctx.tokenizer, "sha256", None),
    }


def preference_dirs(ctx: ObjectiveContext) -> list[Path]:
    data = ctx.cfg.data
    dirs = [Path(d.path) for d in data.datasets()]
    return dirs + ([Path(data.valid)] if data.valid else [])


def precompute_reference(ctx: ObjectiveContext) -> list[Path]:
    """Write the reference log-probs of every preference shard directory that lacks current ones.
    Every rank calls it; returns the files (re)written."""
    from data.shards import REFERENCE_LOGPS

    identity = reference_identity(ctx)
    stale = [d for d in preference_dirs(ctx) if not _is_current(d / REFERENCE_LOGPS, d / SIDECAR, identity)]
    if not stale:
        return []
    for shard_dir in stale:  # every rank sees the same file system: all fail together, none hangs
        if not os.access(shard_dir, os.W_OK):
            raise UserError(
                f"align.reference=precomputed writes {REFERENCE_LOGPS} beside the shards, but {shard_dir} is not "
                "writable; copy the shards somewhere writable or use align.reference=live"
            )
    reference = live_reference(ctx)
    written = []
    for shard_dir in stale:
        values = shard_logps(ctx, reference, shard_dir)
        if ctx.strategy.env.is_main:
            _save(shard_dir / REFERENCE_LOGPS, values)
            (shard_dir / SIDECAR).write_text(json.dumps(identity, indent=1) + "\n")
            log.info("reference log-probs of %d pairs written to %s", len(values), shard_dir / REFERENCE_LOGPS)
        written.append(shard_dir / REFERENCE_LOGPS)
        barrier()
    del reference
    return written


@torch.no_grad()
def shard_logps(ctx: ObjectiveContext, reference: torch.nn.Module, shard_dir: Path) -> np.ndarray:
    """[samples, 2] summed log-probs of chosen and rejected under ``reference``, in manifest order.
    Rank r scores samples r, r+W, ...; every rank runs the same number of forwards (sharded models
    gather parameters together), the last batches padded with repeats that are dropped."""
    from data.collate import collate_preference
    from data.shard_set import ShardSet, Source

    env, cfg = ctx.strategy.env, ctx.cfg
    chunk_size = ctx.cfg.train.loss_chunk_size
    shards = ShardSet([Source(str(shard_dir))], verify_checksums=cfg.data.verify_checksums)
    mine = np.arange(env.rank, shards.num_samples, env.world_size)
    batch_size = cfg.train.micro_batch_size
    per_rank = -(-shards.num_samples // env.world_size)
    batches = -(-per_rank // batch_size)
    values = np.zeros((len(mine), 2), np.float64)
    for b in range(batches):
        index = np.arange(b * batch_size, (b + 1) * batch_size)
        real = index[index < len(mine)]
        samples = mine[np.minimum(index, max(len(mine) - 1, 0))] if len(mine) else np.zeros(batch_size, np.int64)
        arrays = [tuple(shards.read(int(s), f) for f in range(3)) for s in samples]
        batch = collate_preference(arrays, pad_id=ctx.tokenizer.pad_id, seq_len=cfg.data.seq_len)
        batch = {k: v.to(env.device) for k, v in batch.items()}
        with ctx.strategy.autocast():
            logps = pair_logps(reference, batch, chunk_size)
        values[real] = torch.stack([logps.chosen, logps.rejected], 1)[: len(real)].double().cpu().numpy()
    out = np.zeros((shards.num_samples, 2), np.float32)
    for rank, part in enumerate(all_gather_object(values)):
        out[rank :: env.world_size] = part
    return out


def _is_current(values: Path, sidecar: Path, identity: dict[str, Any]) -> bool:
    if not (values.is_file() and sidecar.is_file()):
        return False
    try:
        return json.loads(sidecar.read_text()) == identity
    except json.JSONDecodeError:
        return False


def _save(path: Path, values: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp.npy")
    np.save(tmp, values)
    tmp.replace(path)
