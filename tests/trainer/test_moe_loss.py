"""The MoE router losses reach the step's gradient in one place (Trainer.loss), weighted by units like
the loss, and their statistics come out as moe/* metrics."""

import copy

import pytest
import torch

from model import ModelConfig, build_model
from model.moe import moe_layers, pop_router_stats
from trainer.config import RunConfig
from trainer.distributed import DistEnv
from trainer.loop import ModelSpec, Trainer
from trainer.objectives.clm import CausalLM
from trainer.objectives.cross_entropy import IGNORE_INDEX, cross_entropy_sum
from trainer.strategy.single import Single

ENV = DistEnv(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cpu"))


def batches(vocab: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(3)
    out = []
    for targets in (3, 12):
        input_ids = torch.randint(0, vocab, (2, 8), generator=gen)
        labels = torch.randint(0, vocab, (2, 8), generator=gen)
        labels.view(-1)[targets:] = IGNORE_INDEX
        out.append({"input_ids": input_ids, "labels": labels})
    return out


def test_router_losses_join_the_gradient_weighted_by_tokens(tmp_path):
    model_cfg = ModelConfig.from_dict({"preset": "tiny-moe", "vocab_size": 48, "d_model": 16, "n_heads": 2,
                                       "n_kv_heads": 1, "moe_d_ff": 16, "router_aux_loss_coef": 0.5,
                                       "router_z_loss_coef": 0.1})
    cfg = RunConfig.from_dict({"train": {"micro_batch_size": 2, "global_batch_size": 4, "grad_clip": 0.0},
                               "log": {"dir": str(tmp_path)}})
    torch.manual_seed(0)
    net = build_model(model_cfg)
    reference = copy.deepcopy(net)
    micro = batches(48)
    strategy = Single(cfg.train, ENV, accumulation=2)
    strategy.wrap(net)
    trainer = Trainer(cfg, ENV, strategy, CausalLM("clm", 0), loader=None, model_spec=ModelSpec(model_cfg, "lm", None))
    metrics = trainer.train_step(iter(micro))

    layers = moe_layers(reference)
    total, ce_total, aux_total = 0.0, 0.0, 0.0
    count = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in micro)
    for b in micro:
        ce = cross_entropy_sum(reference(b["input_ids"]), b["labels"])
        stats = pop_router_stats(layers)
        units = int((b["labels"] != IGNORE_INDEX).sum())
        total = total + ce + stats.loss * units
        ce_total += ce.item()
        aux_total += stats.aux_loss.item() * units
    (total / count).backward()
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in reference.parameters()]))

    assert metrics["loss"] == pytest.approx(ce_total / count, rel=1e-6)  # the logged loss is the objective's
    assert metrics["grad_norm"] == pytest.approx(norm.item(), rel=1e-5)
    assert metrics["moe/aux_loss"] == pytest.approx(aux_total / count, rel=1e-6)
    assert metrics["moe/router_loss"] > 0.5 * 2  # two layers, each at least coefficient × 1
    loads = [metrics[f"moe/load/{e}"] for e in range(model_cfg.n_experts)]
    assert sum(loads) == pytest.approx(1.0)

    without = copy.deepcopy(reference)  # the same step without router losses has another gradient
    without.zero_grad()
    plain = sum(cross_entropy_sum(without(b["input_ids"]), b["labels"]) for b in micro) / count
    plain.backward()
    plain_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in without.parameters()]))
    assert abs(plain_norm.item() - norm.item()) > 1e-4



def test_aux_loss_free_balancing_moves_each_bias_against_its_load(tmp_path):
    model_cfg = ModelConfig.from_dict({"preset": "tiny-moe", "vocab_size": 48, "d_model": 16, "n_heads": 2,
                                       "n_kv_heads": 1, "moe_d_ff": 16, "router_bias_update_rate": 0.1})
    cfg = RunConfig.from_dict({"train": {"micro_batch_size": 2, "global_batch_size": 4}, "log": {"dir": str(tmp_path)}})
    torch.manual_seed(0)
    net = build_model(model_cfg)
    reference = copy.deepcopy(net)
    micro = batches(48)
    strategy = Single(cfg.train, ENV, accumulation=2)
    strategy.wrap(net)
    trainer = Trainer(cfg, ENV, strategy, CausalLM("clm", 0), loader=None, model_spec=ModelSpec(model_cfg, "lm", None))
    trainer.train_step(iter(micro))

    layers = moe_layers(reference)
    counts = 0
    for b in micro:  # the step's assignments, from the weights before the step
        reference(b["input_ids"])
        counts = counts + pop_router_stats(layers).counts
    for layer, layer_counts in zip(moe_layers(net), counts):
        expected = 0.1 * torch.sign(layer_counts.mean() - layer_counts)
        torch.testing.assert_close(layer.expert_bias, expected)
        assert layer.expert_bias.abs().sum() > 0
    assert "stack.layers.0.mlp.expert_bias" in net.state_dict()  # saved with the weights
