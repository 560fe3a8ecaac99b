"""Preference and reward objectives on a real tiny model: padding, pooling and the reference paths."""

from __future__ import annotations

import math

import pytest
import torch

from model import ModelConfig, build_model
from trainer.config import AlignConfig
from trainer.objectives.preference import PreferenceObjective
from trainer.objectives.reward import RewardObjective

VOCAB = 50


def pair_batch() -> dict[str, torch.Tensor]:
    """Two pairs of different lengths, right-padded, labels shifted with -100 on prompt and padding."""
    g = torch.Generator().manual_seed(0)
    rows = {"chosen": [(3, 5), (4, 2)], "rejected": [(3, 3), (4, 6)]}  # (prompt, response) lengths
    batch: dict[str, torch.Tensor] = {}
    for side, shapes in rows.items():
        width = max(p + r for p, r in shapes)
        ids = torch.zeros(len(shapes), width, dtype=torch.long)
        labels = torch.full_like(ids, -100)
        mask = torch.zeros_like(ids)
        for i, (p, r) in enumerate(shapes):
            ids[i, : p + r] = torch.randint(1, VOCAB, (p + r,), generator=g)
            labels[i, p - 1 : p + r - 1] = ids[i, p : p + r]
            mask[i, : p + r] = 1
        batch |= {f"{side}_input_ids": ids, f"{side}_labels": labels, f"{side}_attention_mask": mask}
    return batch


def tiny(head: str = "lm", seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = ModelConfig.from_dict({"preset": "tiny-llama", "vocab_size": VOCAB, "d_model": 32, "n_layers": 1})
    return build_model(cfg, head=head).eval()


def unpadded_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor], side: str) -> list[float]:
    """Each sequence alone, without padding: the sum of its labelled tokens' log-probs."""
    out = []
    for ids, labels, mask in zip(batch[f"{side}_input_ids"], batch[f"{side}_labels"], batch[f"{side}_attention_mask"]):
        n = int(mask.sum())
        with torch.no_grad():
            logp = model(ids[None, :n])[0].log_softmax(-1)
        out.append(sum(float(logp[t, labels[t]]) for t in range(n) if labels[t] != -100))
    return out


@pytest.mark.parametrize("chunk_size", [0, 3])
def test_dpo_objective_with_live_reference_matches_per_sequence_forwards(chunk_size):
    batch = pair_batch()
    policy, reference = tiny(seed=0), tiny(seed=1)
    objective = PreferenceObjective(AlignConfig(loss="dpo", beta=0.5), reference, chunk_size)
    assert objective.count(batch) == 2
    with torch.no_grad():
        out = objective.loss(policy, batch)
    pc, pr = unpadded_logps(policy, batch, "chosen"), unpadded_logps(policy, batch, "rejected")
    rc, rr = unpadded_logps(reference, batch, "chosen"), unpadded_logps(reference, batch, "rejected")
    expected = [math.log1p(math.exp(-0.5 * ((pc[i] - rc[i]) - (pr[i] - rr[i])))) for i in range(2)]
    assert out.loss_sum.item() == pytest.approx(sum(expected), rel=1e-4)
    assert int(out.count) == 2
    assert out.metrics["logps/chosen"].item() == pytest.approx(sum(pc), rel=1e-4)
    precomputed = batch | {"ref_chosen_logps": torch.tensor(rc), "ref_rejected_logps": torch.tensor(rr)}
    with torch.no_grad():
        again = PreferenceObjective(AlignConfig(loss="dpo", beta=0.5), None, chunk_size).loss(policy, precomputed)
    assert again.loss_sum.item() == pytest.approx(out.loss_sum.item(), rel=1e-5)


def test_chunked_log_probs_have_the_plain_gradient():
    batch = pair_batch()
    grads = []
    for chunk_size in (0, 2):
        policy = tiny(seed=0)
        out = PreferenceObjective(AlignConfig(loss="simpo", beta=2.0), None, chunk_size).loss(policy, batch)
        out.loss_sum.backward()
        grads.append(torch.cat([p.grad.flatten() for p in policy.parameters()]))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)


def test_precomputed_reference_missing_is_a_clear_error():
    with pytest.raises(Exception, match="precompute"):
        PreferenceObjective(AlignConfig(loss="ipo"), None).loss(tiny(), pair_batch())


def test_reward_objective_is_bradley_terry_on_last_token_scores():
    batch = pair_batch()
    model = tiny("classifier")
    out = RewardObjective().loss(model, batch)
    scores = {}
    for side in ("chosen", "rejected"):
        scores[side] = [
            model(ids[None, : int(mask.sum())])[0, 0].item()
            for ids, mask in zip(batch[f"{side}_input_ids"], batch[f"{side}_attention_mask"])
        ]
    margins = [c - r for c, r in zip(scores["chosen"], scores["rejected"])]
    assert out.loss_sum.item() == pytest.approx(sum(math.log1p(math.exp(-m)) for m in margins), rel=1e-4)
    assert out.metrics["rewards/accuracies"].item() == sum(m > 0 for m in margins)
    out.loss_sum.backward()
    assert model.score.weight.grad is not None and model.score.weight.grad.abs().sum() > 0


def test_sft_objective_reports_all_masked_micro_batches(caplog):
    from trainer.objectives.sft import SupervisedFineTuning

    objective = SupervisedFineTuning(chunk_size=0)
    masked = {"input_ids": torch.ones(2, 5, dtype=torch.long), "labels": torch.full((2, 5), -100)}
    trained = masked | {"labels": torch.tensor([[-100, -100, 3, 4, -100], [-100] * 5])}
    assert objective.count(trained) == 2 and objective.all_masked_batches == 0
    with caplog.at_level("WARNING", logger="tessera.trainer"):
        assert objective.count(masked) == 0
    assert objective.all_masked_batches == 1 and "every label masked" in caplog.text


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"beta": 0.0}, "align.beta must be > 0"),
        ({"loss": "cdpo"}, "label_smoothing must be in"),
        ({"loss": "dpo", "label_smoothing": 0.1}, "applies to loss cdpo only"),
    ],
)
def test_align_hyperparameters_are_checked(overrides, message):
    from common.errors import ConfigError
    from trainer.objectives.preference import check_align

    with pytest.raises(ConfigError, match=message):
        check_align(AlignConfig.from_dict(overrides, "align"))
