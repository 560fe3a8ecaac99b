"""Tensor- and expert-parallel checkpoints: each rank writes only its own pieces of a split tensor, the
checkpoint holds the whole tensors under the plain model's names (one process reads them back), and
another mesh (or plain ddp/fsdp) loads its own pieces of them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
from spawn import spawn
from torch.distributed.checkpoint import FileSystemReader

DENSE = {"preset": "tiny-llama", "d_model": 32, "n_heads": 8, "n_kv_heads": 4, "d_ff": 64, "max_seq_len": 64,
         "vocab_size": 64}
MOE = {"preset": "tiny-moe", "d_model": 32, "n_heads": 2, "n_kv_heads": 1, "moe_d_ff": 32, "max_seq_len": 64,
       "vocab_size": 64}


def _strategy(model: dict, strategy: str, tp: int, ep: int, seed: int):
    """A wrapped model and its strategy on this rank, after one optimizer step (so there are Adam moments)."""
    from model import ModelConfig, build_model
    from trainer.config import RunConfig
    from trainer.distributed import init_distributed
    from trainer.strategy.ddp import DDP
    from trainer.strategy.expert_parallel import ExpertParallel
    from trainer.strategy.fsdp import FSDP
    from trainer.strategy.tensor_parallel import TensorParallel

    env = init_distributed(need_group=True)
    net = build_model(ModelConfig.from_dict(model))
    net.init_weights(seed)
    cfg = RunConfig.from_dict({"train": {"strategy": strategy}}).train
    parallel = (TensorParallel(cfg, env, size=tp) if tp > 1 else ExpertParallel(cfg, env, size=ep) if ep > 1
                else {"ddp": DDP, "fsdp": FSDP}[strategy](cfg, env))
    wrapped = parallel.wrap(net)
    tokens = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(seed + env.rank))
    logits = wrapped(tokens[:, :-1])
    parallel.backward(torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()))
    parallel.step(1e-2)
    return parallel


def _whole(parallel) -> dict[str, np.ndarray]:
    """Every trained tensor and Adam moment, gathered whole (numpy: tensors would die with the rank)."""
    from trainer.strategy.partitioned import Partitioned

    if isinstance(parallel, Partitioned):
        state, gather = parallel._state(), parallel._gather
    else:  # plain ddp/fsdp: the same names, gathered by DCP's full state dict
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        model, optim = get_state_dict(parallel.model, parallel.optimizer,
                                      options=StateDictOptions(full_state_dict=True, ignore_frozen_params=True))
        state, gather = {"model": model, "optim": optim}, lambda name, tensor: tensor
    whole = {}
    for name, holder, key in Partitioned._tensors(state):
        whole[f"{name}/{key}"] = gather(name, holder[key]).detach().cpu().numpy()
    return whole


def _save(model: dict, strategy: str, tp: int, ep: int, path) -> dict[str, np.ndarray]:
    parallel = _strategy(model, strategy, tp, ep, seed=0)
    parallel.save(path)
    return _whole(parallel)


def _load(model: dict, strategy: str, tp: int, ep: int, path) -> dict[str, np.ndarray]:
    parallel = _strategy(model, strategy, tp, ep, seed=1)  # other weights and moments: the load replaces them all
    parallel.load(path)
    return _whole(parallel)


def _read_whole(path) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors read back whole in this (single) process, by name."""
    metadata = FileSystemReader(path).read_metadata()
    state = {name: torch.empty(md.size, dtype=md.properties.dtype) for name, md in metadata.state_dict_metadata.items()
             if hasattr(md, "size") and len(md.size)}
    dcp.load(state, storage_reader=FileSystemReader(path), no_dist=True)
    return state


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # read in one process, as meant
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_each_rank_writes_only_its_pieces_of_the_split_tensors(tmp_path, strategy):
    """tp=2 × dp=2: the fused [q|k|v] weight and its Adam moments are saved as several blocks, none of
    them the whole tensor, written by the ranks that hold them; read back whole in one process they equal
    the gathered tensors, under the plain names."""
    saved = spawn(_save, 4, DENSE, strategy, 2, 1, tmp_path)[0]
    path = tmp_path / "dcp"
    metadata = FileSystemReader(path).read_metadata()
    for key in ("model.stack.layers.0.attn.qkv.weight", "optim.state.stack.layers.0.attn.qkv.weight.exp_avg",
                "model.stack.layers.0.mlp.up.weight", "model.stack.layers.0.attn.out.weight"):
        md = metadata.state_dict_metadata[key]
        whole = md.size.numel()
        assert len(md.chunks) > 1 and all(chunk.sizes.numel() < whole for chunk in md.chunks), key
        files = {metadata.storage_data[index].relative_path for index in metadata.storage_data if index.fqn == key}
        assert len(files) == 4 if strategy == "fsdp" else len(files) >= 2, (key, files)  # ddp: one of 2 replicas
    # [q|k|v] rows: q_r, k_r, v_r per tp rank, so at least 6 blocks (FSDP2 cuts them further over dp)
    assert len(metadata.state_dict_metadata["model.stack.layers.0.attn.qkv.weight"].chunks) >= 6
    read = _read_whole(path)
    for name, tensor in saved.items():
        param, key = name.split("/")
        stored = f"model.{param}" if param == key else f"optim.state.{param}.{key}"
        np.testing.assert_array_equal(read[stored].numpy(), tensor, err_msg=name)


@pytest.mark.slow
@pytest.mark.parametrize(("saved_as", "loaded_as"), [
    (("fsdp", 2, 1), ("ddp", 4, 1)), (("ddp", 2, 1), ("fsdp", 1, 1)), (("ddp", 2, 1), ("fsdp", 2, 1)),
    (("fsdp", 1, 1), ("fsdp", 2, 1))])
def test_tensor_parallel_checkpoints_load_on_other_meshes(tmp_path, saved_as, loaded_as):
    """Every tensor and moment a tp=2 × dp=2 rank saved is what another mesh loads (and back)."""
    saved = spawn(_save, 4, DENSE, *saved_as, tmp_path)[0]
    loaded = spawn(_load, 4, DENSE, *loaded_as, tmp_path)[0]
    assert loaded.keys() == saved.keys()
    for name, tensor in saved.items():
        np.testing.assert_array_equal(loaded[name], tensor, err_msg=name)


@pytest.mark.parametrize(("saved_as", "loaded_as"), [(("fsdp", 1, 2), ("ddp", 1, 1)), (("ddp", 1, 1), ("fsdp", 1, 2)),
                                                     (("ddp", 1, 2), ("fsdp", 1, 2))])
def test_expert_parallel_checkpoints_load_on_other_meshes(tmp_path, saved_as, loaded_as):
    """ep=2 × dp=2: each rank writes its experts (with FSDP2, its dp shard of them); plain ddp reads them
    whole, and back; ep with ddp loads under ep with FSDP2."""
    saved = spawn(_save, 4, MOE, *saved_as, tmp_path)[0]
    if saved_as[2] > 1:
        md = FileSystemReader(tmp_path / "dcp").read_metadata().state_dict_metadata
        experts = [key for key in md if key.endswith("experts.up") or key.endswith("experts.up.exp_avg")]
        blocks = 4 if saved_as[0] == "fsdp" else 2  # FSDP2 shards each rank's experts over dp=2
        assert experts and all(len(md[key].chunks) == blocks for key in experts), experts
    loaded = spawn(_load, 4, MOE, *loaded_as, tmp_path)[0]
    assert loaded.keys() == saved.keys()
    for name, tensor in saved.items():
        np.testing.assert_array_equal(loaded[name], tensor, err_msg=name)
