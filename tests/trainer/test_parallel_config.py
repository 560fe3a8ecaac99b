"""The parallel section and the strategies behind it refuse what they cannot split, in one line."""

import pytest
import torch

from common.errors import ConfigError
from model import ModelConfig, build_model
from trainer.config import RunConfig
from trainer.distributed import DistEnv


@pytest.mark.parametrize(("overrides", "message"), [
    ({"parallel": {"cp": 2}}, "parallel.cp=2 runs with train.strategy=ddp or fsdp"),
    ({"parallel": {"cp": 2}, "train": {"strategy": "fsdp", "hsdp": True}}, "parallel.cp=2 with train.hsdp"),
    ({"parallel": {"cp": 2, "tp": 2}}, "parallel.tp and parallel.cp: one at a time"),
    ({"parallel": {"cp": 2, "pp": 2}}, "parallel.pp and parallel.cp: one at a time"),
    ({"parallel": {"cp": 2, "ep": 2}}, "parallel.cp and parallel.ep: one at a time"),
    ({"parallel": {"cp": 2}, "train": {"strategy": "ddp", "objective": "mlm"}},
     "parallel.cp=2 trains train.objective=clm or sft, not mlm"),
    ({"parallel": {"cp": 2}, "train": {"strategy": "ddp"}, "data": {"seq_len": 30}},
     "parallel.cp=2 cuts each sequence into 4 chunks: data.seq_len=30 must be a multiple of 4"),
    ({"parallel": {"cp": 2}, "train": {"strategy": "ddp", "compile": True}}, "parallel.cp=2 with train.compile"),
    ({"parallel": {"tp": 2, "ep": 2}}, "parallel.tp and parallel.ep: one at a time"),
    ({"parallel": {"tp": 2, "pp": 2}}, "parallel.tp and parallel.pp: one at a time"),
    ({"parallel": {"pp": 2}}, "parallel.pp=2 runs with train.strategy=ddp"),
    ({"parallel": {"pp": 2, "pp_schedule": "Chimera"}}, "parallel.pp_schedule: .*ZBVZeroBubble"),
    ({"parallel": {"pp": 2}, "train": {"strategy": "ddp", "objective": "mlm"}},
     "parallel.pp=2 trains train.objective=clm or sft, not mlm"),
    ({"parallel": {"tp": 2}}, "parallel.tp=2 runs with train.strategy=ddp"),
    ({"parallel": {"ep": 0}}, "parallel.ep: must be at least 1"),
    ({"parallel": {"ep": 2}, "train": {"strategy": "zero2"}}, "parallel.ep=2 runs with train.strategy=ddp or fsdp"),
    ({"parallel": {"ep": 2}, "train": {"strategy": "fsdp", "hsdp": True}}, "parallel.ep=2 with train.hsdp"),
    ({"parallel": {"tp": 2}, "train": {"strategy": "zero3"}}, "parallel.tp=2 runs with train.strategy=ddp or fsdp"),
    ({"parallel": {"tp": 2}, "train": {"strategy": "fsdp", "hsdp": True}}, "parallel.tp=2 with train.hsdp"),
    ({"parallel": {"sequence_parallel": True}}, "parallel.sequence_parallel splits .* set parallel.tp > 1"),
    ({"parallel": {"tp": 4, "sequence_parallel": True}, "train": {"strategy": "ddp"}, "data": {"seq_len": 30}},
     "data.seq_len=30 must be a multiple of it"),
])
def test_parallel_settings_are_checked_at_config_load(overrides, message):
    with pytest.raises(ConfigError, match=message) as error:
        RunConfig.from_dict(overrides)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(("model", "world", "message"), [
    ({"preset": "tiny-llama"}, 4, "the model's n_experts=0 must be a positive multiple"),
    ({"preset": "tiny-moe", "n_experts": 3}, 4, "n_experts=3 must be a positive multiple"),
    ({"preset": "tiny-moe"}, 3, "parallel.ep=2 does not divide the 3 ranks"),
])
def test_expert_parallel_refuses_what_it_cannot_shard(model, world, message):
    from trainer.strategy.expert_parallel import ExpertParallel

    env = DistEnv(rank=0, world_size=world, local_rank=0, local_world_size=world, device=torch.device("cpu"))
    strategy = ExpertParallel(RunConfig.from_dict({}).train, env, size=2)
    with pytest.raises(ConfigError, match=message):
        strategy.parallelize(build_model(ModelConfig.from_dict({**model, "vocab_size": 32})))


@pytest.mark.parametrize(("model", "world", "message"), [
    ({"preset": "tiny-llama", "n_heads": 4, "n_kv_heads": 1}, 4, "parallel.tp=2 must divide model.n_heads=4, the kv"),
    ({"preset": "tiny-moe"}, 4, "not for MoE models"),
    ({"preset": "tiny-llama", "pos": "alibi"}, 4, "per-head score biases"),
    ({"preset": "tiny-llama"}, 3, "parallel.tp=2 must divide the 3 ranks"),
])
def test_tensor_parallel_refuses_what_it_cannot_split(model, world, message):
    from trainer.strategy.tensor_parallel import TensorParallel

    env = DistEnv(rank=0, world_size=world, local_rank=0, local_world_size=world, device=torch.device("cpu"))
    strategy = TensorParallel(RunConfig.from_dict({}).train, env, size=2)
    with pytest.raises(ConfigError, match=message):
        strategy.parallelize(build_model(ModelConfig.from_dict({**model, "vocab_size": 32})))


@pytest.mark.parametrize(("model", "world", "schedule", "accumulation", "message"), [
    ({"preset": "tiny-bert"}, 2, "1F1B", 2, "cuts a decoder"),
    ({"preset": "tiny-moe", "router_bias_update_rate": 0.001}, 2, "1F1B", 2, "router_bias_update_rate > 0 is not"),
    ({"preset": "tiny-llama", "tie_embeddings": False}, 2, "Interleaved1F1B", 2,
     "makes 4 stages, more than model.n_layers=2"),
    ({"preset": "tiny-llama", "tie_embeddings": False}, 2, "1F1B", 1, "at least 2 micro-batches per step"),
    ({"preset": "tiny-llama", "tie_embeddings": False}, 3, "1F1B", 2, "parallel.pp=2 must divide the 3 ranks"),
])
def test_pipeline_parallel_refuses_what_it_cannot_stage(model, world, schedule, accumulation, message):
    from trainer.strategy.pipeline_parallel import PipelineParallel

    env = DistEnv(rank=0, world_size=world, local_rank=0, local_world_size=world, device=torch.device("cpu"))
    strategy = PipelineParallel(RunConfig.from_dict({}).train, env, accumulation, size=2, schedule=schedule)
    with pytest.raises(ConfigError, match=message) as error:
        strategy.wrap(build_model(ModelConfig.from_dict({**model, "vocab_size": 32})))
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(("model", "world", "message"), [
    ({"preset": "tiny-bert"}, 2, "dense decoder, not model.arch=encoder"),
    ({"preset": "tiny-t5"}, 2, "dense decoder, not model.arch=encoder_decoder"),
    ({"preset": "tiny-moe"}, 2, "dense decoder, not model.arch=decoder with experts"),
    ({"preset": "tiny-llama", "attn": "flex"}, 2, "not model.attn=flex"),
    ({"preset": "tiny-llama", "pos": "alibi"}, 2, "model.pos=alibi"),
    ({"preset": "tiny-llama"}, 3, "parallel.cp=2 must divide the 3 ranks"),
])
def test_context_parallel_refuses_what_it_cannot_split(model, world, message):
    from trainer.strategy.context_parallel import ContextParallelDDP

    env = DistEnv(rank=0, world_size=world, local_rank=0, local_world_size=world, device=torch.device("cpu"))
    strategy = ContextParallelDDP(RunConfig.from_dict({}).train, env, size=2)
    with pytest.raises(ConfigError, match=message) as error:
        strategy.parallelize(build_model(ModelConfig.from_dict({**model, "vocab_size": 32})))
    assert "\n" not in str(error.value)
