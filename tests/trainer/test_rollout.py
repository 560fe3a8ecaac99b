"""Rollouts and the online-alignment config: completion masks, seeded sampling that a saved
generator state replays, log-probs that agree with unpadded forwards, one-line config errors."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from common.config import parse_overrides
from common.errors import ConfigError
from model import build_model
from model.config import ModelConfig
from trainer.config import AlignLoss, RunConfig
from trainer.objectives import ObjectiveName, objective_name
from trainer.rollout import completion_logps, sample_completions, stop_mask

PAD, STOP = 0, 3


def test_online_dpo_pairs_the_better_completion_as_chosen():
    from trainer.objectives.online import pair_by_reward

    chosen, rejected = pair_by_reward(torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5]))
    assert chosen.tolist() == [0, 3, 4] and rejected.tolist() == [1, 2, 5]  # a tie keeps the first, as TRL


def test_stop_mask_keeps_tokens_up_to_the_first_stop():
    completions = torch.tensor([[5, 3, 0, 0], [5, 6, 7, 8], [3, 9, 3, 0], [4, 2, 5, 3]])
    mask, truncated = stop_mask(completions, [STOP, 2])
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0]]
    assert truncated.tolist() == [False, True, False, False]


@pytest.fixture(scope="module")
def tiny_lm():
    torch.manual_seed(0)
    cfg = ModelConfig(arch="decoder", vocab_size=32, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=32,
                      pos="rope", norm="rmsnorm", mlp="swiglu")
    return build_model(cfg).eval()


def prompts():
    ids = torch.tensor([[PAD, PAD, 7, 8, 9], [4, 5, 6, 7, 8]])  # left-padded
    return ids, (ids != PAD).long()


def sample(model, generator, **kwargs):
    ids, mask = prompts()
    return sample_completions(model, ids, mask, num_generations=3, max_new_tokens=6, temperature=1.0, top_p=1.0,
                              stop_ids=[STOP], pad_id=PAD, generator=generator, **kwargs)


def test_sampling_is_grouped_and_replays_from_a_saved_generator_state(tiny_lm):
    generator = torch.Generator().manual_seed(1)
    saved = generator.get_state()
    first = sample(tiny_lm, generator)
    assert first.input_ids.shape[0] == 6 and first.prompt_length == 5
    assert (first.input_ids[:3, :5] == prompts()[0][0]).all() and (first.input_ids[3:, :5] == prompts()[0][1]).all()
    assert not torch.equal(first.completion_ids[0], first.completion_ids[1])  # sampled, not copied
    again = torch.Generator().manual_seed(99)
    again.set_state(saved)
    replay = sample(tiny_lm, again)
    assert torch.equal(first.input_ids, replay.input_ids)
    second = sample(tiny_lm, generator)  # the generator moved on
    assert not torch.equal(first.input_ids, second.input_ids)
    fixed = sample(tiny_lm, torch.Generator().manual_seed(1), stop_when_done=False)
    assert fixed.completion_ids.shape[1] == 6  # every step run, as sharded ranks need


def test_completion_logps_match_unpadded_forwards(tiny_lm):
    rollout = sample(tiny_lm, torch.Generator().manual_seed(2))
    logps, entropy = completion_logps(tiny_lm, rollout.input_ids, rollout.attention_mask, rollout.prompt_length,
                                      temperature=0.7, with_entropy=True)
    assert logps.shape == entropy.shape == rollout.completion_mask.shape
    for row in range(rollout.input_ids.shape[0]):
        sequence = rollout.input_ids[row][rollout.attention_mask[row].bool()]
        start = int(rollout.attention_mask[row, : rollout.prompt_length].sum())
        with torch.no_grad():
            reference = torch.log_softmax(tiny_lm(sequence[None])[0].float() / 0.7, -1)
        n = int(rollout.completion_mask[row].sum())
        expected = [reference[start - 1 + t, sequence[start + t]].item() for t in range(n)]
        assert logps[row, :n].tolist() == pytest.approx(expected, abs=1e-5)


def online_config(*overrides: str) -> RunConfig:
    raw = parse_overrides(["align.loss=grpo", "align.reward=exact_match", *overrides])
    return RunConfig.from_dict(raw)


def test_online_config_routes_align_to_the_online_objective():
    cfg = online_config("align.reward_weights=[2.0]")
    assert cfg.align.reward == ["exact_match"] and cfg.align.loss.online
    assert objective_name(cfg, "align") is ObjectiveName.online
    assert objective_name(RunConfig.from_dict({}), "align") is ObjectiveName.preference
    assert not AlignLoss.dpo.online and AlignLoss.rloo.objective is ObjectiveName.online


@pytest.mark.parametrize(("override", "message"), [
    ("align.num_generations=1", r"align\.num_generations: must be at least 2 .* \(align\.loss=grpo\)"),
    ("align.temperature=0", r"align\.temperature: must be > 0"),
    ("align.top_p=0", r"align\.top_p: must be in \(0, 1\]"),
    ("align.max_new_tokens=0", r"align\.max_new_tokens: must be at least 1"),
    ("align.epsilon=1.5", r"align\.epsilon: need 0 < epsilon < 1"),
    ("align.beta=-1", r"align\.beta: must be >= 0 \(the KL coefficient"),
    ("align.reward=[]", r"align\.reward: name at least one reward"),
    ("align.reward_weights=[1,2]", r"align\.reward_weights: 2 weights for 1 rewards"),
    ("align.reference=precomputed", r"align\.reference: .* the reference must be live"),
    ("align.loss=online_dpo", r"align\.num_generations: online_dpo samples one pair per prompt: 2, not 8"),
    ("align.loss_aggregation=bnpo", r"align\.loss_aggregation: 'bnpo' is not one of grpo, dr_grpo, dapo"),
])
def test_bad_online_settings_are_one_line(override, message):
    with pytest.raises(ConfigError, match=message) as caught:
        online_config(override)
    assert "\n" not in str(caught.value)
    rloo = dataclasses.replace(online_config().align, loss=AlignLoss.rloo, num_generations=1)
    with pytest.raises(ConfigError, match=r"num_generations: must be at least 2 .*rloo"):
        rloo.validate("align")


def test_offline_losses_ignore_the_online_keys():
    assert RunConfig.from_dict(parse_overrides(["align.num_generations=1"])).align.loss is AlignLoss.dpo
