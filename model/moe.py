"""Mixture-of-Experts MLP: a top-k router, dispatch to stacked experts (dropless or with a capacity),
an optional shared expert.

Every token goes to its ``experts_per_token`` best experts; none is dropped unless
``moe_capacity_factor`` caps what an expert takes (``capacity_factor · assignments / n_experts``).
Assignments are sorted by expert so each expert runs one matmul over its tokens. The router's
load-balancing loss (Switch Transformer, Fedus et al. 2021: ``E · Σ_e f_e · P_e`` with ``f_e`` the
share of assignments and ``P_e`` the mean routing probability of expert e; 1.0 when balanced) and
z-loss (ST-MoE, Zoph et al. 2022: mean squared logsumexp of the logits) are recorded on the layer at
each forward; the trainer collects them with :func:`pop_router_stats` and adds them to the loss.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from model.config import Mlp, ModelConfig, RouterGating
from model.mlp import MLP, activation


@dataclasses.dataclass
class RouterStats:
    """What MoE layers recorded since the last pop. ``loss``: the coefficient-weighted aux and z
    losses summed over layers (differentiable); ``aux_loss``, ``z_loss``, ``load`` (share of
    assignments per expert, [E], before any is dropped) and ``dropped`` are detached means over layers."""

    loss: torch.Tensor
    aux_loss: torch.Tensor
    z_loss: torch.Tensor
    load: torch.Tensor
    dropped: torch.Tensor  # share of assignments over the experts' capacity (0 when dropless)
    counts: torch.Tensor  # assignments per expert, [E] per layer or [layers, E] once popped (summed over forwards)


def route(logits: torch.Tensor, gating: RouterGating, k: int, norm_topk: bool, bias: torch.Tensor | None = None
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Router logits [N, E] (fp32) → (weights [N, k], chosen experts [N, k], routing probabilities
    [N, E] summing to 1 per token, for the load-balancing loss). A balancing ``bias`` [E] moves the
    choice only; the weights stay the chosen experts' scores (DeepSeek-V3)."""
    if gating == RouterGating.softmax:
        scores = probs = logits.softmax(dim=-1)
    else:
        scores = logits.sigmoid()
        probs = scores / scores.sum(dim=-1, keepdim=True)
    if bias is None:
        weights, chosen = scores.topk(k, dim=-1)
    else:
        chosen = (scores + bias).topk(k, dim=-1).indices
        weights = scores.gather(-1, chosen)
    if norm_topk:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, chosen, probs


class Experts(nn.Module):
    """``n_experts`` feed-forward networks as stacked weights: ``up`` [E, F (×2 gated: gate first), D]
    and ``down`` [E, D, F], so one parameter holds every expert (an expert that got no token this
    step still has a (zero) gradient, and a data-parallel reducer finds nothing unused)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gated = cfg.mlp != Mlp.gelu
        self.act = activation(cfg)
        d_ff = cfg.expert_d_ff
        self.up = nn.Parameter(torch.empty(cfg.n_experts, d_ff * (2 if self.gated else 1), cfg.d_model))
        self.down = nn.Parameter(torch.empty(cfg.n_experts, cfg.d_model, d_ff))

    def forward(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """``x`` [M, D]: rows sorted by expert, ``counts[e]`` of them for expert e. A trainer may put a
        module with this interface in its place (expert parallelism: the experts on other ranks)."""
        return run_experts(x, counts, self.up, self.down, self.act, self.gated)


def run_experts(x: torch.Tensor, counts: list[int], up: torch.Tensor, down: torch.Tensor, act, gated: bool
                ) -> torch.Tensor:
    """Each expert's feed-forward over its rows of ``x`` (sorted by expert, ``counts[e]`` for expert e)."""
    outs = []
    for e, rows in enumerate(x.split(counts)):
        if not counts[e]:
            continue
        h = rows @ up[e].t()
        if gated:
            gate, value = h.chunk(2, dim=-1)
            h = act(gate) * value
        else:
            h = act(h)
        outs.append(h @ down[e].t())
    return torch.cat(outs) if outs else x.new_zeros(x.shape)


class MoE(nn.Module):
    """The MoE MLP of a block: ``Σ_k w_k · expert_k(x)`` (+ the shared expert, optionally gated)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_experts, self.top_k = cfg.n_experts, cfg.experts_per_token
        self.gating, self.norm_topk = cfg.router_gating, cfg.router_norm_topk
        self.aux_loss_coef, self.z_loss_coef = cfg.router_aux_loss_coef, cfg.router_z_loss_coef
        self.capacity_factor = cfg.moe_capacity_factor
        self.bias_update_rate = cfg.router_bias_update_rate
        if self.bias_update_rate:  # learnt by counting, not by gradients: a buffer, saved with the weights
            self.register_buffer("expert_bias", torch.zeros(cfg.n_experts))
        self.router = nn.Linear(cfg.d_model, cfg.n_experts, bias=False)
        self.experts = Experts(cfg)
        self.shared = MLP(cfg, cfg.shared_expert_d_ff) if cfg.shared_expert_d_ff else None
        self.shared_gate = nn.Linear(cfg.d_model, 1, bias=False) if cfg.shared_expert_gate else None
        self.recorded: list[RouterStats] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits = self.router(x).float()
        weights, chosen, probs = route(logits, self.gating, self.top_k, self.norm_topk,
                                       self.expert_bias if self.bias_update_rate else None)
        order, counts, kept = self.dispatch(chosen, weights)
        tokens = order // self.top_k  # the token of each sorted assignment
        out = self.experts(x[tokens], kept.tolist())
        out = out * weights.reshape(-1)[order, None].to(out.dtype)
        y = out.new_zeros(x.shape[0], out.shape[1]).index_add_(0, tokens, out)  # out's dtype: bf16 under autocast
        if self.shared is not None:
            shared = self.shared(x)
            y = y + (torch.sigmoid(self.shared_gate(x)) * shared if self.shared_gate is not None else shared)
        if torch.is_grad_enabled():  # a training forward (not evaluation or decoding)
            self._record(logits, probs, counts, kept)
        return y.view(shape)

    def dispatch(self, chosen: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(flat assignment indices sorted by expert, assignments per expert, those kept per expert).
        Dropless keeps all; with a capacity each expert keeps its ``capacity`` highest-weighted
        assignments (Megatron's "probs" drop policy), the others add nothing (the residual passes)."""
        flat = chosen.reshape(-1)
        counts = torch.bincount(flat, minlength=self.n_experts)
        if self.capacity_factor is None:
            return flat.argsort(stable=True), counts, counts
        by_weight = weights.reshape(-1).argsort(descending=True, stable=True)
        order = by_weight[flat[by_weight].argsort(stable=True)]  # by expert, then by weight
        starts = torch.cumsum(counts, 0) - counts
        rank_in_expert = torch.arange(order.numel(), device=order.device) - starts[flat[order]]
        capacity = math.ceil(self.capacity_factor * flat.numel() / self.n_experts)
        return order[rank_in_expert < capacity], counts, counts.clamp(max=capacity)

    def _record(self, logits: torch.Tensor, probs: torch.Tensor, counts: torch.Tensor, kept: torch.Tensor) -> None:
        assignments = max(int(logits.shape[0]) * self.top_k, 1)
        load = counts.float() / assignments
        aux = self.n_experts * (load * probs.mean(dim=0)).sum()
        z = torch.logsumexp(logits, dim=-1).square().mean()
        dropped = (counts - kept).sum().float() / assignments
        self.recorded.append(RouterStats(self.aux_loss_coef * aux + self.z_loss_coef * z, aux.detach(), z.detach(),
                                         load, dropped, counts.float()))

    def reset_buffers(self) -> None:
        if self.bias_update_rate:
            self.expert_bias.zero_()

    @torch.no_grad()
    def balance(self, counts: torch.Tensor) -> None:
        """Aux-loss-free balancing (DeepSeek-V3): raise the bias of experts that got fewer than the mean
        assignments over ``counts`` [E] (a step's, summed over ranks), lower the others'."""
        self.expert_bias += self.bias_update_rate * torch.sign(counts.mean() - counts).to(self.expert_bias.dtype)


def moe_layers(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


def pop_router_stats(layers: list[MoE]) -> RouterStats | None:
    """Collect and clear what ``layers`` recorded (None if nothing): the loss sums over layers of
    each layer's mean over its forwards since the last pop (an objective may run several, e.g.
    chosen and rejected); the statistics are means over every recorded forward."""
    per_layer = [layer.recorded for layer in layers if layer.recorded]
    if not per_layer:
        return None
    counts = torch.stack([sum(r.counts for r in layer.recorded) if layer.recorded
                          else torch.zeros(layer.n_experts, device=per_layer[0][0].counts.device)
                          for layer in layers])
    for layer in layers:
        layer.recorded = []
    every = [r for records in per_layer for r in records]
    return RouterStats(loss=sum(torch.stack([r.loss for r in records]).mean() for records in per_layer),
                       aux_loss=torch.stack([r.aux_loss for r in every]).mean(),
                       z_loss=torch.stack([r.z_loss for r in every]).mean(),
                       load=torch.stack([r.load for r in every]).mean(dim=0),
                       dropped=torch.stack([r.dropped for r in every]).mean(), counts=counts)
