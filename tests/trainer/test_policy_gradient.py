"""GRPO, RLOO and PPO losses against their closed forms (TRL's definitions: trl/trainer/grpo_trainer.py and
rloo_trainer.py, ``_generate_and_score_completions`` and ``_compute_loss``; PPO's pieces against
trl/experimental/ppo/ppo_trainer.py at f2cd577, restated below with their line numbers)."""

from __future__ import annotations

import math

import pytest
import torch

from trainer.objectives.policy_gradient import (
    LossAggregation,
    gae,
    group_advantages,
    grpo_loss,
    k3_kl,
    kl_penalised,
    kl_shaped_rewards,
    leave_one_out_advantages,
    masked_whiten,
    ppo_loss,
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


# -- PPO -------------------------------------------------------------------------------------------------


def test_gae_on_a_hand_example():
    """δ = r + γ·V' - V with V after the last token 0; A_t = δ_t + γλ·A_{t+1}; R = A + V."""
    rewards, values, mask = torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.5, 0.5, 0.5]]), torch.ones(1, 3)
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert advantages.tolist() == [[0.5, 0.5, 0.5]] and returns.tolist() == [[1.0, 1.0, 1.0]]
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.5)  # δ = -0.05, -0.05, 0.5
    assert advantages[0].tolist() == pytest.approx([-0.05 + 0.45 * 0.175, -0.05 + 0.45 * 0.5, 0.5])
    assert returns[0].tolist() == pytest.approx([0.52875, 0.675, 1.0])


def trl_gae(rewards: torch.Tensor, values: torch.Tensor, gamma: float, lam: float) -> torch.Tensor:
    """ppo_trainer.py lines 787-795, as written there (values and rewards already 0 past each end)."""
    lastgaelam = 0
    advantages_reversed = []
    gen_length = rewards.shape[1]
    for t in reversed(range(gen_length)):
        nextvalues = values[:, t + 1] if t < gen_length - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    return torch.stack(advantages_reversed[::-1], axis=1)


@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 0.95), (0.9, 0.5), (0.99, 0.0), (0.0, 1.0)])
def test_gae_equals_a_reverse_loop_over_each_rows_own_length(gamma, lam):
    torch.manual_seed(0)
    rewards, values = torch.randn(3, 4), torch.randn(3, 4)
    advantages, returns = gae(rewards, values, MASK, gamma, lam)
    for row, length in enumerate(MASK.sum(1).long().tolist()):  # a plain loop over the row's tokens alone
        expected, running = [0.0] * 4, 0.0
        for t in reversed(range(length)):
            next_value = values[row, t + 1].item() if t + 1 < length else 0.0
            running = rewards[row, t].item() + gamma * next_value - values[row, t].item() + gamma * lam * running
            expected[t] = running
        assert advantages[row].tolist() == pytest.approx(expected, abs=1e-12)
        assert returns[row, :length].tolist() == pytest.approx((advantages[row] + values[row])[:length].tolist())
        assert returns[row, length:].abs().sum() == 0
    trl = trl_gae(rewards * MASK, values * MASK, gamma, lam) * MASK
    torch.testing.assert_close(advantages, trl, rtol=0, atol=1e-12)


def test_kl_shaped_rewards_put_the_score_on_the_last_token():
    """ppo_trainer.py lines 772-779 with kl_estimator k1, except that TRL adds the score one token after
    the stop token (``sequence_lengths + 1``); we, as OpenRLHF's ``compute_reward``, on the last one."""
    logps, ref_logps = -torch.rand(3, 4), -torch.rand(3, 4)
    scores = torch.tensor([1.0, -2.0, 0.5])
    rewards, kl = kl_shaped_rewards(scores, logps, ref_logps, MASK, beta=0.1)
    torch.testing.assert_close(kl, (logps - ref_logps) * MASK)  # k1, TRL's default estimator
    expected = -0.1 * (logps - ref_logps) * MASK
    expected[0, 2] += 1.0
    expected[1, 1] -= 2.0
    expected[2, 3] += 0.5
    torch.testing.assert_close(rewards, expected)
    no_reference, zero = kl_shaped_rewards(scores, logps, None, MASK, beta=0.1)
    assert zero.abs().sum() == 0 and no_reference.sum().item() == pytest.approx(-0.5)


def trl_masked_whiten(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """ppo_trainer.py lines 237-270 (masked_mean, masked_var unbiased, masked_whiten), as written there."""
    mean = (values * mask).sum() / mask.sum()
    variance = ((values - mean) ** 2 * mask).sum() / mask.sum()
    variance = variance * mask.sum() / (mask.sum() - 1)
    return (values - mean) * torch.rsqrt(variance + 1e-8)


def test_whitening_equals_trls_and_adds_partial_sums_like_one_batch():
    torch.manual_seed(1)
    values = torch.randn(3, 4) * 3 + 2
    whitened = masked_whiten(values, MASK)
    torch.testing.assert_close(whitened, trl_masked_whiten(values, MASK) * MASK)
    kept = whitened[MASK.bool()]
    assert kept.mean().item() == pytest.approx(0, abs=1e-12) and kept.std().item() == pytest.approx(1, abs=1e-7)
    # two parts (as on two ranks) whose partial sums are added whiten as the whole
    parts = values[MASK.bool()].split([4, 5])
    mean = values[MASK.bool()].mean()
    partials = [{1: torch.stack([torch.tensor(float(p.numel())), p.sum()]), 0: ((p - mean) ** 2).sum()} for p in parts]

    def sums_over_both(x: torch.Tensor) -> torch.Tensor:
        return sum(partial[x.ndim] for partial in partials)

    halves = torch.cat([masked_whiten(p, torch.ones_like(p), sums_over_both) for p in parts])
    torch.testing.assert_close(halves, kept)


def trl_ppo_loss(new_logprobs, vpred, mb_logprobs, mb_values, mb_advantage, mb_return, mask, cliprange,
                 cliprange_value, vf_coef):
    """ppo_trainer.py lines 829-847 (and 852-854 for the clip fraction), as written there."""
    def masked_mean(x, m):
        return (x * m).sum() / m.sum()

    vpredclipped = torch.clamp(vpred, mb_values - cliprange_value, mb_values + cliprange_value)
    vf_losses1 = torch.square(vpred - mb_return)
    vf_losses2 = torch.square(vpredclipped - mb_return)
    vf_loss = 0.5 * masked_mean(torch.max(vf_losses1, vf_losses2), mask)
    vf_clipfrac = masked_mean((vf_losses2 > vf_losses1).float(), mask)
    ratio = torch.exp(new_logprobs - mb_logprobs)
    pg_losses = -mb_advantage * ratio
    pg_losses2 = -mb_advantage * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    pg_loss = masked_mean(torch.max(pg_losses, pg_losses2), mask)
    pg_clipfrac = masked_mean((pg_losses2 > pg_losses).float(), mask)
    return pg_loss + vf_coef * vf_loss, pg_loss, vf_loss, pg_clipfrac, vf_clipfrac


def test_ppo_loss_equals_trls_formulas_in_value_gradient_and_metrics():
    torch.manual_seed(2)
    old_logps, old_values = -torch.rand(3, 4), torch.randn(3, 4)
    logps = (old_logps + 0.4 * torch.randn(3, 4)).requires_grad_()  # ratios both inside and outside the clip
    values = (old_values + 0.5 * torch.randn(3, 4)).requires_grad_()
    advantages, returns = torch.randn(3, 4), torch.randn(3, 4)
    out = ppo_loss(logps, values, MASK, old_logps=old_logps, old_values=old_values, advantages=advantages,
                   returns=returns, epsilon=0.2, cliprange_value=0.2, vf_coef=0.1)
    expected, pg_loss, vf_loss, pg_clipfrac, vf_clipfrac = trl_ppo_loss(
        logps, values, old_logps, old_values, advantages, returns, MASK, 0.2, 0.2, 0.1)
    assert out.units.item() == 9
    assert (out.loss_sum / out.units).item() == pytest.approx(expected.item())
    ours = torch.autograd.grad(out.loss_sum / out.units, (logps, values))
    theirs = torch.autograd.grad(expected, (logps, values))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    means = {k: (num / den).item() for k, (num, den) in out.ratios.items()}
    assert means["loss/policy_avg"] == pytest.approx(pg_loss.item())
    assert means["loss/value_avg"] == pytest.approx(vf_loss.item())
    assert means["policy/clipfrac_avg"] == pytest.approx(pg_clipfrac.item())
    assert means["val/clipfrac_avg"] == pytest.approx(vf_clipfrac.item())
    assert 0 < means["policy/clipfrac_avg"] < 1 and 0 < means["val/clipfrac_avg"] < 1  # both branches taken
    assert means["clip_ratio/region_mean"] == pytest.approx(pg_clipfrac.item())


def test_ppo_on_policy_with_exact_values_is_minus_the_mean_advantage():
    """ρ = 1 and V = R: the loss is -mean(A) over tokens, and its gradient in π is -A/tokens."""
    logps, values = (-torch.rand(3, 4)).requires_grad_(), torch.randn(3, 4).requires_grad_()
    advantages = torch.randn(3, 4)
    out = ppo_loss(logps, values, MASK, old_logps=logps.detach(), old_values=values.detach(),
                   advantages=advantages, returns=values.detach(), vf_coef=0.5)
    assert out.loss_sum.item() == pytest.approx(-(advantages * MASK).sum().item())
    grad, value_grad = torch.autograd.grad(out.loss_sum, (logps, values))
    torch.testing.assert_close(grad, -advantages * MASK)
    assert value_grad.abs().sum() == 0
