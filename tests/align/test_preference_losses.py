"""Each preference loss on a fixed batch equals its closed form, computed here in plain floats."""

from __future__ import annotations

import math

import pytest
import torch

from trainer.objectives.preference import PairLogps, pair_logps, pair_metrics, preference_losses

# four pairs: summed log-probs of chosen/rejected under policy and reference, and token counts
POLICY_CHOSEN = [-12.0, -30.5, -7.25, -28.0]
POLICY_REJECTED = [-15.0, -28.0, -9.5, -40.0]
REF_CHOSEN = [-13.0, -29.0, -8.0, -25.0]
REF_REJECTED = [-14.0, -29.5, -9.0, -35.0]
CHOSEN_TOKENS = [6, 11, 4, 9]
REJECTED_TOKENS = [7, 10, 5, 16]
BETA, SMOOTHING, GAMMA, ALPHA = 0.2, 0.15, 0.4, 0.8


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def closed_form(loss: str, i: int) -> tuple[float, float, float]:
    """(loss, chosen reward, rejected reward) of pair i from the papers' formulas."""
    pc, pr, rc, rr = POLICY_CHOSEN[i], POLICY_REJECTED[i], REF_CHOSEN[i], REF_REJECTED[i]
    nc, nr = CHOSEN_TOKENS[i], REJECTED_TOKENS[i]
    if loss in ("dpo", "cdpo"):
        h = (pc - rc) - (pr - rr)
        eps = SMOOTHING if loss == "cdpo" else 0.0
        return -(1 - eps) * log_sigmoid(BETA * h) - eps * log_sigmoid(-BETA * h), BETA * (pc - rc), BETA * (pr - rr)
    if loss == "ipo":
        h = (pc / nc - rc / nc) - (pr / nr - rr / nr)
        return (h - 1 / (2 * BETA)) ** 2, BETA * (pc - rc) / nc, BETA * (pr - rr) / nr
    ac, ar = pc / nc, pr / nr
    if loss == "simpo":
        return -log_sigmoid(BETA * (ac - ar) - GAMMA), BETA * ac, BETA * ar
    odds_c = math.log(math.exp(ac) / (1 - math.exp(ac)))
    odds_r = math.log(math.exp(ar) / (1 - math.exp(ar)))
    return -ALPHA * ac - BETA * log_sigmoid(odds_c - odds_r), BETA * ac, BETA * ar


def logps(chosen, rejected) -> PairLogps:
    t = lambda values: torch.tensor(values, dtype=torch.float64)  # noqa: E731
    return PairLogps(t(chosen), t(rejected), torch.tensor(CHOSEN_TOKENS), torch.tensor(REJECTED_TOKENS))


@pytest.mark.parametrize("loss", ["dpo", "cdpo", "ipo", "simpo", "orpo"])
def test_loss_equals_closed_form(loss):
    out = preference_losses(
        logps(POLICY_CHOSEN, POLICY_REJECTED),
        logps(REF_CHOSEN, REF_REJECTED),
        loss=loss,
        beta=BETA,
        label_smoothing=SMOOTHING,
        simpo_gamma=GAMMA,
        orpo_alpha=ALPHA,
    )
    expected = [closed_form(loss, i) for i in range(4)]
    assert out.losses.tolist() == pytest.approx([e[0] for e in expected], rel=1e-12)
    assert out.chosen_rewards.tolist() == pytest.approx([e[1] for e in expected], rel=1e-12)
    assert out.rejected_rewards.tolist() == pytest.approx([e[2] for e in expected], rel=1e-12)
    metrics = pair_metrics(out)
    accuracies = sum(e[1] > e[2] for e in expected)
    assert 0 < accuracies < 4  # the fixed batch has both kinds of pairs
    assert metrics["rewards/accuracies"].item() == accuracies
    assert metrics["rewards/margins"].item() == pytest.approx(sum(e[1] - e[2] for e in expected))


def test_reference_free_losses_ignore_the_reference():
    policy = logps(POLICY_CHOSEN, POLICY_REJECTED)
    for loss in ("simpo", "orpo"):
        with_ref = preference_losses(policy, logps(REF_CHOSEN, REF_REJECTED), loss=loss, beta=BETA)
        without = preference_losses(policy, None, loss=loss, beta=BETA)
        assert torch.equal(with_ref.losses, without.losses)
    with pytest.raises(ValueError, match="reference"):
        preference_losses(policy, None, loss="dpo", beta=BETA)


def test_dpo_gradient_raises_chosen_and_lowers_rejected():
    chosen = torch.tensor(POLICY_CHOSEN, requires_grad=True)
    rejected = torch.tensor(POLICY_REJECTED, requires_grad=True)
    policy = PairLogps(chosen, rejected, torch.tensor(CHOSEN_TOKENS), torch.tensor(REJECTED_TOKENS))
    ref = PairLogps(torch.tensor(REF_CHOSEN), torch.tensor(REF_REJECTED), policy.chosen_tokens, policy.rejected_tokens)
    preference_losses(policy, ref, loss="dpo", beta=BETA).losses.sum().backward()
    assert (chosen.grad < 0).all() and (rejected.grad > 0).all()


def test_pair_logps_sums_labelled_token_logprobs():
    torch.manual_seed(0)
    vocab = 11
    table = torch.randn(vocab, vocab)

    def bigram_model(input_ids, attention_mask=None):
        return table[input_ids]

    batch = {
        "chosen_input_ids": torch.tensor([[1, 2, 3, 4], [5, 6, 7, 0]]),
        "chosen_labels": torch.tensor([[-100, 3, 4, 9], [-100, 7, 8, -100]]),
        "rejected_input_ids": torch.tensor([[1, 2, 5], [5, 6, 9]]),
        "rejected_labels": torch.tensor([[-100, 5, 10], [-100, 9, 2]]),
    }
    out = pair_logps(bigram_model, batch)
    log_probs = table.log_softmax(-1)
    expected_chosen = [log_probs[2, 3] + log_probs[3, 4] + log_probs[4, 9], log_probs[6, 7] + log_probs[7, 8]]
    expected_rejected = [log_probs[2, 5] + log_probs[5, 10], log_probs[6, 9] + log_probs[9, 2]]
    assert out.chosen.tolist() == pytest.approx([float(x) for x in expected_chosen], rel=1e-6)
    assert out.rejected.tolist() == pytest.approx([float(x) for x in expected_rejected], rel=1e-6)
    assert out.chosen_tokens.tolist() == [3, 2] and out.rejected_tokens.tolist() == [2, 2]
