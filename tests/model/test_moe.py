"""The MoE MLP against a naive reference (a loop over tokens and their experts), its router losses,
and its place in the model (config validation, presets, parameter counts)."""

import math

import pytest
import torch
import torch.nn.functional as F

from common.errors import ConfigError
from model import ModelConfig, build_model
from model.flops import count_parameters, flops_per_token
from model.moe import MoE, moe_layers, pop_router_stats

BASE = {"vocab_size": 64, "d_model": 16, "n_layers": 2, "n_heads": 2, "d_ff": 24, "max_seq_len": 32,
        "n_experts": 4, "experts_per_token": 2, "moe_d_ff": 12, "router_aux_loss_coef": 0.1,
        "router_z_loss_coef": 0.01}
VARIANTS = {
    "mixtral": {"router_gating": "softmax", "router_norm_topk": True},
    "qwen2-moe": {"router_gating": "softmax", "router_norm_topk": False, "shared_expert_d_ff": 20,
                  "shared_expert_gate": True},
    "sigmoid-shared": {"router_gating": "sigmoid", "router_norm_topk": True, "shared_expert_d_ff": 8,
                       "experts_per_token": 3},
    "gelu-top1": {"mlp": "gelu", "experts_per_token": 1, "router_norm_topk": False},
    "capacity": {"moe_capacity_factor": 0.75, "shared_expert_d_ff": 8},
    "balancing-bias": {"router_bias_update_rate": 0.01, "router_gating": "sigmoid"},
}


def moe_layer(variant: str, seed: int = 0) -> tuple[MoE, ModelConfig]:
    cfg = ModelConfig.from_dict({**BASE, **VARIANTS[variant]})
    torch.manual_seed(seed)
    layer = MoE(cfg)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0.0, 0.5)
        if cfg.router_bias_update_rate:  # a bias big enough to change choices
            layer.expert_bias.copy_(torch.tensor([0.3, -0.3, 0.1, 0.0]))
    return layer, cfg


def naive(layer: MoE, cfg: ModelConfig, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token on its own: score every expert, take the k best, sum their weighted outputs.
    Returns the output and the router loss (Switch load balancing + z-loss), written out plainly."""
    def act(h):
        return F.silu(h) if cfg.mlp == "swiglu" else F.gelu(h)

    def expert(e, v):
        h = layer.experts.up[e] @ v
        if cfg.mlp != "gelu":
            gate, up = h.chunk(2)
            return layer.experts.down[e] @ (act(gate) * up)
        return layer.experts.down[e] @ act(h)

    tokens = x.reshape(-1, cfg.d_model)
    n, k, e_count = tokens.shape[0], cfg.experts_per_token, cfg.n_experts
    routed = []  # per token: its logits, routing probabilities and {expert: weight}
    for v in tokens:
        logits = layer.router.weight @ v
        if cfg.router_gating == "softmax":
            scores = torch.exp(logits) / torch.exp(logits).sum()
            probs = scores
        else:
            scores = 1 / (1 + torch.exp(-logits))
            probs = scores / scores.sum()
        bias = layer.expert_bias if cfg.router_bias_update_rate else torch.zeros(e_count)
        best = sorted(range(e_count), key=lambda e: -(scores[e] + bias[e]).item())[:k]  # the bias moves the choice
        total = sum(scores[e] for e in best)
        routed.append((logits, probs, {e: scores[e] / total if cfg.router_norm_topk else scores[e] for e in best}))
    kept = {(t, e) for t, (_, _, chosen) in enumerate(routed) for e in chosen}
    if cfg.moe_capacity_factor is not None:  # each expert keeps its highest-weighted assignments
        capacity = math.ceil(cfg.moe_capacity_factor * n * k / e_count)
        kept = set()
        for e in range(e_count):
            mine = sorted((t for t in range(n) if e in routed[t][2]), key=lambda t: -routed[t][2][e].item())
            kept |= {(t, e) for t in mine[:capacity]}
    outs, assigned, prob_sum, z_sum = [], torch.zeros(e_count), torch.zeros(e_count), 0.0
    for t, (v, (logits, probs, chosen)) in enumerate(zip(tokens, routed)):
        out = torch.zeros(cfg.d_model)
        for e, weight in chosen.items():
            if (t, e) in kept:
                out = out + weight * expert(e, v)
            assigned[e] += 1
        if cfg.shared_expert_d_ff:
            shared = layer.shared(v)
            if cfg.shared_expert_gate:
                shared = shared * torch.sigmoid(layer.shared_gate.weight @ v)
            out = out + shared
        outs.append(out)
        prob_sum = prob_sum + probs
        z_sum = z_sum + torch.log(torch.exp(logits).sum()) ** 2
    balance = e_count * sum((assigned[e] / (n * k)) * (prob_sum[e] / n) for e in range(e_count))
    loss = cfg.router_aux_loss_coef * balance + cfg.router_z_loss_coef * z_sum / n
    return torch.stack(outs).view(x.shape), loss


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_moe_equals_the_naive_reference_in_forward_and_gradients(variant):
    layer, cfg = moe_layer(variant)
    x = torch.randn(3, 5, cfg.d_model, generator=torch.Generator().manual_seed(1), requires_grad=True)
    out = layer(x)
    stats = pop_router_stats([layer])
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    ((out * weights).sum() + stats.loss).backward()
    grads = {name: p.grad.clone() for name, p in layer.named_parameters()}
    grad_x = x.grad.clone()

    layer.zero_grad()
    x.grad = None
    ref_out, ref_loss = naive(layer, cfg, x)
    ((ref_out * weights).sum() + ref_loss).backward()

    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stats.loss, ref_loss, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grad_x, x.grad, atol=1e-5, rtol=1e-5)
    for name, p in layer.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, atol=1e-5, rtol=1e-5, msg=name)
    assert grads["router.weight"].abs().sum() > 0  # the router learns (through the weights and its losses)
    assert stats.load.sum().item() == pytest.approx(1.0)
    if cfg.moe_capacity_factor is None:
        assert stats.dropped.item() == 0
    else:  # 30 assignments, at most ceil(0.75 · 30 / 4) = 6 kept per expert
        over = (stats.load * 30 - 6).clamp(min=0).sum() / 30
        assert stats.dropped.item() == pytest.approx(over.item()) and over > 0


def test_balanced_routing_has_unit_balance_loss_and_its_gradient_pushes_towards_balance():
    cfg = ModelConfig.from_dict({**BASE, "router_z_loss_coef": 0.0})
    layer = MoE(cfg)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.experts.up.normal_()
        layer.experts.down.normal_()
    layer(torch.randn(8, cfg.d_model))
    stats = pop_router_stats([layer])
    assert stats.aux_loss.item() == pytest.approx(1.0)  # uniform probabilities: E · Σ f_e / E = 1 whatever f is

    with torch.no_grad():  # every token prefers expert 0: the loss is above 1 and its gradient lowers expert 0
        layer.router.weight.copy_(torch.zeros(cfg.n_experts, cfg.d_model))
        layer.router.weight[0, 0] = 5.0
    x = torch.randn(64, cfg.d_model).abs()
    layer(x)
    stats = pop_router_stats([layer])
    assert stats.aux_loss.item() > 1.2 and stats.load[0].item() == pytest.approx(0.5)
    stats.loss.backward()
    assert layer.router.weight.grad[0, 0] > 0
    assert pop_router_stats([layer]) is None  # popped: nothing left


def test_router_stats_are_recorded_only_with_grad_summed_over_layers_and_averaged_over_forwards():
    cfg = ModelConfig.from_dict({**BASE, "preset": None})
    model = build_model(cfg)
    layers = moe_layers(model)
    assert len(layers) == cfg.n_layers
    with torch.no_grad():
        model(torch.randint(0, cfg.vocab_size, (2, 6)))
    assert pop_router_stats(layers) is None  # evaluation and decoding record nothing

    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(2, 4, cfg.d_model, generator=gen) for _ in range(2))
    alone = {}
    for name, x in (("a", a), ("b", b)):
        for layer in layers:
            layer(x)
        alone[name] = [pop_router_stats([layer]).loss for layer in layers]
    for x in (a, b):  # two forwards of every layer (an objective's chosen and rejected, say)
        for layer in layers:
            layer(x)
    both = pop_router_stats(layers)
    assert [layer.recorded for layer in layers] == [[], []]
    expected = sum((alone["a"][i] + alone["b"][i]) / 2 for i in range(len(layers)))
    torch.testing.assert_close(both.loss, expected)
    assert alone["a"][0].item() != pytest.approx(alone["b"][0].item())  # the inputs route differently


def test_tiny_moe_preset_builds_trains_and_counts_its_parameters():
    cfg = ModelConfig.from_dict({"preset": "tiny-moe"})
    assert cfg.n_experts > 1 and cfg.experts_per_token > 1
    model = build_model(cfg)
    assert len(moe_layers(model)) == cfg.n_layers
    assert count_parameters(cfg) == sum(p.numel() for p in model.parameters())
    dense_mlp = 3 * cfg.d_model * cfg.expert_d_ff
    total, active = count_parameters(cfg), count_parameters(cfg, active=True)
    assert total - active == cfg.n_layers * (cfg.n_experts - cfg.experts_per_token) * dense_mlp
    every_expert = ModelConfig.from_dict({"preset": "tiny-moe", "experts_per_token": 4})
    assert flops_per_token(cfg, 128) < flops_per_token(every_expert, 128)
    logits = model(torch.randint(0, cfg.vocab_size, (2, 7)))
    assert logits.shape == (2, 7, cfg.vocab_size) and torch.isfinite(logits).all()
    # init as the dense MLP: residual projections scaled down
    std_down = model.stack.layers[0].mlp.experts.down.std().item()
    assert std_down == pytest.approx(cfg.init_std / math.sqrt(2 * cfg.n_layers), rel=0.1)


@pytest.mark.parametrize(("overrides", "key"), [
    ({"experts_per_token": 5}, "model.experts_per_token"),
    ({"experts_per_token": 0}, "model.experts_per_token"),
    ({"n_experts": -1}, "model.n_experts"),
    ({"bias": True}, "model.n_experts"),
    ({"moe_d_ff": 0}, "model.moe_d_ff"),
    ({"shared_expert_gate": True}, "model.shared_expert_gate"),
    ({"router_aux_loss_coef": -0.1}, "model.router_aux_loss_coef"),
    ({"router_gating": "relu"}, "model.router_gating"),
    ({"moe_capacity_factor": 0.0}, "model.moe_capacity_factor"),
])
def test_bad_moe_settings_are_refused_in_one_line(overrides, key):
    with pytest.raises(ConfigError, match=key) as error:
        ModelConfig.from_dict({**BASE, **overrides}, where="model")
    assert "\n" not in str(error.value)


def test_mixtral_and_qwen_moe_presets_have_their_published_sizes():
    mixtral = ModelConfig.from_dict({"preset": "mixtral-8x7b"})
    assert round(count_parameters(mixtral) / 1e9, 1) == 46.7  # "47B total, 13B active"
    assert round(count_parameters(mixtral, active=True) / 1e9, 1) == 12.9
    qwen = ModelConfig.from_dict({"preset": "qwen1.5-moe-a2.7b"})
    assert round(count_parameters(qwen) / 1e9, 1) == 14.3  # "14.3B total, 2.7B activated"
    assert round(count_parameters(qwen, active=True) / 1e9, 1) == 2.7


def test_bf16_autocast_runs_and_stays_near_fp32():
    cfg = ModelConfig.from_dict({**BASE, **VARIANTS["qwen2-moe"], "init_std": 0.2})
    torch.manual_seed(0)
    model = build_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 8))
    full = model(ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = model(ids)
    half.sum().backward()
    assert torch.isfinite(half).all() and (half - full).abs().max() < 0.05 * full.abs().max()
