"""PPO's value function: a scalar head on the policy's final hidden states (a shared trunk, as TRL's
``AutoModelForCausalLMWithValueHead`` in trl/experimental/ppo/modeling_value_head.py), with its own
small AdamW.

TRL's PPOTrainer and OpenRLHF train a separate critic, a second model initialised from the reward
model. A head on the shared trunk costs one forward instead of two and no second model to shard,
optimise and checkpoint through the strategy; what it gives up: the critic starts at V = 0 rather
than from the reward model's features, and the value loss shares the trunk's gradients with the
policy loss (``align.vf_coef`` weighs it).

The head (d_model + 1 weights, zero at the start: V = 0) is replicated on every rank and lives
outside the strategy's model, so the policy's checkpoints, ``model/`` directory and ``tessera export``
never see it; its weights, optimizer state and step count are the objective's checkpointed state
(every rank's file), so a resumed run continues it exactly. The value loss reaches the trunk through
the hidden states and is stepped there by the strategy's optimizer with the policy loss; the head's
own gradients (scaled by the loop like every gradient) are averaged over ranks and stepped by
:meth:`ValueFunction.step` once a step's micro-batches are all back-propagated: at the next rollout,
or before a checkpoint is written.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from trainer.config import TrainConfig
from trainer.distributed import all_reduce
from trainer.schedule import lr_at


class ValueHead(nn.Module):
    """Hidden states [..., D] (any dtype) → values [...] in fp32."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.score = nn.Linear(d_model, 1)
        nn.init.zeros_(self.score.weight)
        nn.init.zeros_(self.score.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        with torch.autocast(hidden.device.type, enabled=False):  # a regression target: no bf16 rounding
            return self.score(hidden.float()).squeeze(-1)


class ValueFunction:
    """The value head, its AdamW (``lr`` on the run's schedule, no weight decay) and gradient clip."""

    def __init__(self, d_model: int, train: TrainConfig, lr: float, device: torch.device, world_size: int) -> None:
        self.head = ValueHead(d_model).to(device)
        self.train, self.lr, self.world_size = train, lr, world_size
        self.optimizer = torch.optim.AdamW(self.head.parameters(), lr=lr, weight_decay=0.0)
        self.steps = 0  # optimizer steps taken (the schedule's position)
        self.pending = False  # gradients back-propagated but not yet stepped

    def step(self) -> None:
        """Apply the accumulated gradients (averaged over ranks; every rank calls it together)."""
        if not self.pending:
            return
        params = list(self.head.parameters())
        grads = torch.cat([p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), device=p.device)
                           for p in params])
        all_reduce(grads).div_(self.world_size)
        offset = 0
        for p in params:
            p.grad = grads[offset: offset + p.numel()].view_as(p).clone()
            offset += p.numel()
        limit = self.train.grad_clip if self.train.grad_clip > 0 else math.inf
        norm = float(torch.nn.utils.clip_grad_norm_(params, limit))
        if math.isfinite(norm):  # a diverged step is skipped here as the loop's guard skips the policy's
            for group in self.optimizer.param_groups:
                group["lr"] = lr_at(self.steps, self.train) * self.lr / self.train.lr if self.train.lr else self.lr
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        self.pending = False

    def state_dict(self) -> dict[str, Any]:
        self.step()
        return {"head": {k: v.cpu() for k, v in self.head.state_dict().items()},
                "optimizer": self.optimizer.state_dict(), "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.head.load_state_dict(state["head"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.steps = state["steps"]
        self.pending = False
