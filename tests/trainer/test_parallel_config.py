"""The parallel section and the strategies behind it refuse what they cannot split, in one line."""

import pytest
import torch

from common.errors import ConfigError
from model import ModelConfig, build_model
from trainer.config import RunConfig
from trainer.distributed import DistEnv


@pytest.mark.parametrize(("overrides", "message"), [  # beyond the README's list (below)
    ({"parallel": {"cp": 2}}, "parallel.cp=2 runs with train.strategy=ddp or fsdp"),
    ({"parallel": {"pp": 2}}, "parallel.pp=2 runs with train.strategy=ddp"),
    ({"parallel": {"tp": 2}}, "parallel.tp=2 runs with train.strategy=ddp"),
    ({"parallel": {"pp": 2, "pp_schedule": "Chimera"}}, "parallel.pp_schedule: .*ZBVZeroBubble"),
    ({"parallel": {"pp": 2}, "train": {"strategy": "ddp", "objective": "mlm"}},
     "parallel.pp=2 trains train.objective=clm or sft, not mlm; set parallel.pp=1 to train it$"),
    ({"parallel": {"ep": 0}}, "parallel.ep: must be at least 1"),
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


DDP = {"strategy": "ddp", "global_batch_size": 16}
PP = {"train": DDP, "parallel": {"pp": 2}}
CP = {"train": DDP, "parallel": {"cp": 2}}
TP = {"train": DDP, "parallel": {"tp": 2}}
LLAMA, BERT, T5, MOE = ({"preset": p} for p in ("tiny-llama", "tiny-bert", "tiny-t5", "tiny-moe"))

# README, "Refused in one line for now", in its order: (the command or None for any, the config, the refusal)
README_REFUSALS = [
    *((None, {"parallel": {a: 2, b: 2}}, f"parallel.{a} and parallel.{b}: one at a time")
      for a, b in (("tp", "pp"), ("tp", "cp"), ("tp", "ep"), ("pp", "cp"), ("pp", "ep"), ("cp", "ep"))),
    *((None, {"parallel": {key: 2}, "train": DDP, "lora": {"rank": 4}}, f"parallel.{key}=2 with lora is not supported")
      for key in ("tp", "pp", "cp", "ep")),
    *((None, {"parallel": {key: 2}, "train": {"strategy": zero}},
       f"parallel.{key}=2 runs with train.strategy=ddp or fsdp")
      for key, zero in (("tp", "zero1"), ("cp", "zero2"), ("ep", "zero3"))),
    *((None, {"parallel": {key: 2}, "train": {"strategy": "fsdp", "hsdp": True}}, f"parallel.{key}=2 with train.hsdp")
      for key in ("tp", "cp", "ep")),
    *((None, {"parallel": {"pp": 2}, "train": {"strategy": s}}, "parallel.pp=2 runs with train.strategy=ddp over")
      for s in ("fsdp", "zero1", "zero3")),
    (None, {**TP, "model": MOE}, "parallel.tp splits attention heads and dense MLPs: not for MoE models"),
    (None, {**TP, "model": {**LLAMA, "pos": "alibi"}}, r"per-head score biases \(model.pos=alibi\)"),
    (None, {**TP, "model": {**LLAMA, "pos": "t5_bias"}}, r"per-head score biases \(model.pos=t5_bias\)"),
    (None, {"parallel": {"sequence_parallel": True}}, "parallel.sequence_parallel splits .* set parallel.tp > 1"),
    (None, {**TP, "parallel": {"tp": 4, "sequence_parallel": True}, "data": {"seq_len": 30}},
     "data.seq_len=30 must be a multiple of it"),
    (None, {**PP, "model": BERT}, r"parallel.pp cuts a decoder \(model.arch=decoder, an LM head\) into stages"),
    (None, {**PP, "model": T5}, "parallel.pp cuts a decoder"),
    (None, {**PP, "model": {**MOE, "router_bias_update_rate": 0.001}}, "model.router_bias_update_rate > 0 is not"),
    (None, {**PP, "train": {**DDP, "objective": "reward"}},
     "parallel.pp=2 trains train.objective=clm or sft, not reward"),
    ("align", PP, r"parallel.pp=2 trains .*, not preference \(the objective of align.loss=dpo\)"),
    ("align", {**PP, "align": {"loss": "grpo", "reward": ["exact_match"]}}, "not online"),
    (None, {**PP, "model": {**LLAMA, "n_layers": 2}, "parallel": {"pp": 2, "pp_schedule": "Interleaved1F1B"}},
     "parallel.pp=2 with Interleaved1F1B makes 4 stages, more than model.n_layers=2"),
    (None, {"parallel": {"pp": 2}, "train": {"strategy": "ddp"}},
     "parallel.pp=2 needs at least 2 micro-batches per step"),
    (None, {"parallel": {"pp": 4}, "train": {"strategy": "ddp", "micro_batch_size": 4, "global_batch_size": 8}},
     r"set train.global_batch_size to at least 4 × micro_batch_size × data-parallel ranks \(micro_batch_size=4\)"),
    (None, {**CP, "model": BERT}, "parallel.cp splits the sequences of a dense decoder, not model.arch=encoder$"),
    (None, {**CP, "model": T5}, "not model.arch=encoder_decoder$"),
    (None, {**CP, "model": MOE}, "not model.arch=decoder with experts"),
    (None, {**CP, "model": {**LLAMA, "pos": "alibi"}}, "parallel.cp masks eager or SDPA attention .* model.pos=alibi"),
    (None, {**CP, "model": {**LLAMA, "pos": "t5_bias"}}, "model.pos=t5_bias"),
    (None, {**CP, "model": {**LLAMA, "attn": "flex"}}, "not model.attn=flex"),
    (None, {**CP, "train": {**DDP, "objective": "mlm"}}, "parallel.cp=2 trains train.objective=clm or sft, not mlm"),
    ("align", CP, r"parallel.cp=2 trains .*, not preference \(the objective of align.loss=dpo\)"),
    (None, {**CP, "train": {**DDP, "compile": True}}, "parallel.cp=2 with train.compile"),
    (None, {**CP, "data": {"seq_len": 30}}, "parallel.cp=2 cuts each sequence into 4 chunks: data.seq_len=30 must"),
    (None, {"train": DDP, "parallel": {"ep": 2}, "model": LLAMA}, "parallel.ep=2 shards the experts: the model's "
                                                                  "n_experts=0 must be a positive multiple of it"),
    (None, {"train": DDP, "parallel": {"ep": 2}, "model": {**MOE, "n_experts": 3}}, "n_experts=3 must be a positive"),
]


@pytest.mark.parametrize(("task", "raw", "message"), README_REFUSALS, ids=[m for _, _, m in README_REFUSALS])
def test_the_readme_list_of_refused_combinations_is_refused_at_load(task, raw, message):
    """Each is refused as the config loads (for a fresh model: its section is the model), or, where the
    command decides the objective, by its check as the command starts; one line, naming the field."""
    with pytest.raises(ConfigError, match=message) as error:
        cfg = RunConfig.from_dict(raw)
        assert task is not None, "loaded"
        cfg.check_task(task)
    assert "\n" not in str(error.value)


def test_what_the_strategies_split_loads():
    for raw in ({**TP, "model": LLAMA}, {**PP, "model": {**LLAMA, "n_layers": 4}}, {**CP, "model": LLAMA},
                {"train": DDP, "parallel": {"ep": 2}, "model": MOE}):
        RunConfig.from_dict(raw).check_task("pretrain")
