"""GRPO and RLOO losses against their closed forms (TRL's definitions: trl/trainer/grpo_trainer.py and
rloo_trainer.py, ``_generate_and_score_completions`` and ``_compute_loss``)."""

from __future__ import annotations

import math

import pytest
import torch

from trainer.objectives.policy_gradient import (
    LossAggregation,
    group_advantages,
    grpo_loss,
    k3_kl,
    kl_penalised,
    leave_one_out_advantages,
    rloo_loss,
)

MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.float64)


@pytest.fixture(autouse=True)
def float64():
    """Closed forms compare in float64 (restored after each test: the default dtype is global)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def test_group_advantages_standardise_within_each_prompt():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    std = math.sqrt(4 * 0.25 / 3)  # unbiased, as torch.std and TRL's nanstd
    expected = [0.5 / (std + 1e-4), -0.5 / (std + 1e-4)]
    advantages = group_advantages(rewards, 4)
    assert advantages[:4].tolist() == pytest.approx([expected[0], expected[1], expected[1], expected[0]])
    assert advantages[4:].tolist() == [0.0] * 4  # a group that all agree teaches nothing
    assert group_advantages(rewards, 4, scale=False).tolist() == [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(rewards, 3)


def test_leave_one_out_baseline_is_the_mean_of_the_others():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 3.0, 1.0])
    advantages = leave_one_out_advantages(rewards, 3)
    assert advantages.tolist() == pytest.approx([1 - 0.0, 0 - 0.5, 0 - 0.5, 1 - 2.0, 3 - 1.0, 1 - 2.0])
    normalised = leave_one_out_advantages(rewards, 3, normalize=True)
    assert normalised.mean().item() == pytest.approx(0.0, abs=1e-12)
    assert normalised.std().item() == pytest.approx(1.0, abs=1e-3)


def test_k3_is_schulmans_estimator():
    logps, ref = torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-1.0, -1.0, -1.5])
    expected = [math.exp(r - p) - (r - p) - 1 for p, r in zip(logps.tolist(), ref.tolist())]
    assert k3_kl(logps, ref).tolist() == pytest.approx(expected)
    assert k3_kl(logps, ref)[0] == 0 and (k3_kl(logps, ref) >= 0).all()


@pytest.fixture
def batch():
    torch.manual_seed(0)
    logps = (-torch.rand(3, 4) * 3).requires_grad_()
    return logps, torch.tensor([1.5, -0.5, 2.0])


def test_on_policy_aggregations_match_their_normalisers(batch):
    logps, advantages = batch
    lengths = MASK.sum(1)
    grpo = grpo_loss(logps, advantages, MASK, aggregation=LossAggregation.grpo)
    assert grpo.loss_sum.item() == pytest.approx(-advantages.sum().item())  # every ratio is 1
    assert grpo.units.item() == 3
    dr = grpo_loss(logps, advantages, MASK, aggregation=LossAggregation.dr_grpo, max_new_tokens=8)
    assert dr.loss_sum.item() == pytest.approx(-(advantages * lengths).sum().item() / 8)
    assert dr.units.item() == 3
    dapo = grpo_loss(logps, advantages, MASK, aggregation=LossAggregation.dapo)
    assert dapo.loss_sum.item() == pytest.approx(-(advantages * lengths).sum().item())
    assert dapo.units.item() == lengths.sum().item() == 9


def test_on_policy_gradient_is_the_advantage_weighted_score(batch):
    """∂ℓ/∂π_t = -A·m_t/|o| (grpo): the REINFORCE gradient with the group baseline."""
    logps, advantages = batch
    grpo_loss(logps, advantages, MASK).loss_sum.backward()
    expected = -advantages[:, None] * MASK / MASK.sum(1, keepdim=True)
    assert torch.allclose(logps.grad, expected)


def test_the_ratio_is_clipped_only_where_it_stops_the_gradient():
    logps = torch.log(torch.tensor([[1.5, 1.25, 0.75, 1.5]])).requires_grad_()
    old = torch.zeros(1, 4)
    ones = torch.ones(1, 4)

    def token_losses(advantage, epsilon_high=None):
        grads, values = [], []
        for t in range(4):
            mask = torch.zeros(1, 4)
            mask[0, t] = 1
            out = grpo_loss(logps, torch.tensor([advantage]), mask, old_logps=old, epsilon=0.2,
                            epsilon_high=epsilon_high, aggregation=LossAggregation.dapo)
            (grad,) = torch.autograd.grad(out.loss_sum, logps)
            values.append(out.loss_sum.item())
            grads.append(grad[0, t].item())
        return values, grads

    values, grads = token_losses(1.0)  # A > 0: ratios above 1.2 are clipped (no gradient)
    assert values == pytest.approx([-1.2, -1.2, -0.75, -1.2])
    assert grads == pytest.approx([0.0, 0.0, -0.75, 0.0])
    values, grads = token_losses(1.0, epsilon_high=0.28)  # DAPO's clip-higher lets 1.25 through
    assert values == pytest.approx([-1.28, -1.25, -0.75, -1.28])
    assert grads == pytest.approx([0.0, -1.25, -0.75, 0.0])
    values, grads = token_losses(-1.0)  # A < 0: only ratios below 0.8 are clipped
    assert values == pytest.approx([1.5, 1.25, 0.8, 1.5])
    assert grads == pytest.approx([1.5, 1.25, 0.0, 1.5])
    out = grpo_loss(logps, torch.tensor([-1.0]), ones, old_logps=old)
    low, count = out.ratios["clip_ratio/low_mean"]
    high, _ = out.ratios["clip_ratio/high_mean"]
    assert (low.item(), high.item(), count.item()) == (1, 0, 4)
    high, _ = grpo_loss(logps, torch.tensor([1.0]), ones, old_logps=old).ratios["clip_ratio/high_mean"]
    assert high.item() == 3


def test_kl_term_adds_beta_times_k3_and_logs_its_masked_mean(batch):
    logps, advantages = batch
    ref = logps.detach() - 0.3 * torch.arange(4.0)
    kl = k3_kl(logps.detach(), ref)
    plain = grpo_loss(logps, advantages, MASK, aggregation=LossAggregation.dapo)
    with_kl = grpo_loss(logps, advantages, MASK, ref_logps=ref, beta=0.04, aggregation=LossAggregation.dapo)
    assert (with_kl.loss_sum - plain.loss_sum).item() == pytest.approx(0.04 * (kl * MASK).sum().item())
    total, count = with_kl.ratios["kl"]
    assert total.item() / count.item() == pytest.approx(((kl * MASK).sum() / MASK.sum()).item())
    with pytest.raises(ValueError, match="needs the reference"):
        grpo_loss(logps, advantages, MASK, beta=0.1)


def test_loop_normalisation_equals_trls_over_accumulation_steps(batch):
    """Two micro-batches: Σ loss_sum / Σ units is TRL's grpo loss (mean of per-micro-batch means,
    equal sizes) and its dapo loss (token sum over the global token count)."""
    logps, advantages = batch
    ref = logps.detach() - 0.1
    second = logps.detach().flip(0), advantages.flip(0), MASK.flip(1)
    kwargs = {"ref_logps": ref, "beta": 0.1}
    per_token = [-a[:, None] + 0.1 * k3_kl(p, ref) for p, a in ((logps.detach(), advantages), second[:2])]
    masks = [MASK, second[2]]
    for aggregation in (LossAggregation.grpo, LossAggregation.dapo):
        outs = [grpo_loss(logps.detach(), advantages, MASK, aggregation=aggregation, **kwargs),
                grpo_loss(*second, aggregation=aggregation, **kwargs)]
        ours = sum(o.loss_sum for o in outs) / sum(o.units for o in outs)
        if aggregation is LossAggregation.grpo:
            trl = sum(((t * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean() / 2 for t, m in zip(per_token, masks))
        else:
            items = sum(m.sum() for m in masks)
            trl = sum((t * m).sum() / items for t, m in zip(per_token, masks))
        assert ours.item() == pytest.approx(trl.item())


def test_rloo_is_a_sequence_level_clipped_loss_with_the_kl_in_the_reward(batch):
    logps, advantages = batch
    on_policy = rloo_loss(logps, advantages, MASK)
    assert on_policy.loss_sum.item() == pytest.approx(-advantages.sum().item())
    assert on_policy.units.item() == 3
    (grad,) = torch.autograd.grad(on_policy.loss_sum, logps)
    assert torch.allclose(grad, -advantages[:, None] * MASK)  # ∂/∂π_t of -A·Σ_t m π_t
    old = logps.detach() - torch.log(torch.tensor(1.5)) / MASK.sum(1, keepdim=True)  # sequence ratio 1.5
    clipped = rloo_loss(logps, advantages, MASK, old_logps=old, epsilon=0.2)
    ratio = torch.tensor(1.5)
    expected = [-min(ratio * a, ratio.clamp(0.8, 1.2) * a).item() for a in advantages]
    assert clipped.loss_sum.item() == pytest.approx(sum(expected))
    rewards = torch.tensor([1.0, 0.0, 1.0])
    ref = logps.detach() - 0.5
    penalised, kl = kl_penalised(rewards, logps.detach(), ref, MASK, beta=0.1)
    assert kl.tolist() == pytest.approx((0.5 * MASK.sum(1)).tolist())
    assert penalised.tolist() == pytest.approx((rewards - 0.05 * MASK.sum(1)).tolist())
