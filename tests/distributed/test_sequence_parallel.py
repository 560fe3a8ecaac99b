"""Sequence parallel (parallel.sequence_parallel) and tensor parallel with FSDP2 through the real trainer
follow the single-process run; their checkpoints resume on other meshes (dp only, another tp)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from spawn import spawn

from runs import assert_weights_follow, final_weights, tiny_config, train

MODELS = {
    # GQA, q/k norms (shared by the heads, so partial gradients on each tp rank even without sp)
    "llama": {"preset": "tiny-llama", "d_model": 32, "n_heads": 4, "n_kv_heads": 2, "d_ff": 64, "max_seq_len": 64,
              "qk_norm": True},
    "gpt2": {"preset": "tiny-gpt2", "d_model": 32, "n_heads": 2, "d_ff": 64, "max_seq_len": 64},  # biases, LayerNorm
    "encoder_decoder": {"preset": "tiny-t5", "pos": "sinusoidal", "d_model": 32, "n_heads": 2, "d_ff": 64,
                        "max_seq_len": 64},  # two stacks, cross-attention
}


def _grad_norms(result) -> list[float]:
    return [json.loads(line)["grad_norm"] for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]


def _config(corpus, run_dir, model, *overrides):
    raw = tiny_config(corpus, run_dir, *overrides)
    raw["model"] = dict(model)
    return raw


def _batch() -> torch.Tensor:
    return torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(0))


def _loss(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens[:, :-1])
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())


def _tensor_parallel_gradients(model: dict, train: dict, sequence_parallel: bool) -> tuple[dict, float, np.ndarray]:
    """One backward on 2 ranks (tp=2, dp=1, the same batch): every gradient, synced and gathered
    whole; the weight norm; logits without gradients for an odd length (sequence parallel steps aside)."""
    from model import ModelConfig, build_model
    from trainer.config import RunConfig
    from trainer.distributed import init_distributed
    from trainer.strategy.tensor_parallel import TensorParallel

    env = init_distributed(need_group=True)
    net = build_model(ModelConfig.from_dict({**model, "vocab_size": 64}))
    net.init_weights(0)
    tp = TensorParallel(RunConfig.from_dict({"train": train}).train, env, size=2,
                        sequence_parallel=sequence_parallel)
    wrapped = tp.wrap(net)
    with tp.accumulate(last=True):
        _loss(wrapped, _batch()).backward()
    tp._reduce_gradients()
    # numpy: a tensor would travel to the parent as shared memory that dies with this process
    grads = {name: tp._gather(name, p.grad).numpy() for name, p in wrapped.named_parameters()}
    with torch.no_grad():
        return grads, tp.weight_norm(), wrapped(_batch()[:, :15]).numpy()


@pytest.mark.parametrize(("arch", "train", "sequence_parallel"), [
    ("llama", {"strategy": "ddp"}, False), ("llama", {"strategy": "ddp"}, True), ("gpt2", {"strategy": "ddp"}, True),
    ("llama", {"strategy": "fsdp"}, True), ("llama", {"strategy": "ddp", "activation_checkpointing": "full"}, True),
    ("llama", {"strategy": "fsdp", "activation_checkpointing": "selective"}, True)],
    ids=["qk-norm-tp", "sp", "gpt2-sp", "fsdp-sp", "sp-full-ac", "fsdp-sp-selective-ac"])
def test_tensor_parallel_gradients_equal_one_process(arch, train, sequence_parallel):
    """The sharpest check of which gradients are split, whole or partial (sequence-parallel norms,
    row-parallel biases, q/k norms shared by split heads): Adam hides a gradient off by a factor.
    Without gradients (evaluation, generation) sequence parallel steps aside: any length runs."""
    from model import ModelConfig, build_model

    reference = build_model(ModelConfig.from_dict({**MODELS[arch], "vocab_size": 64}))
    reference.init_weights(0)
    _loss(reference, _batch()).backward()
    (grads, weight_norm, logits), _ = spawn(_tensor_parallel_gradients, 2, MODELS[arch], train, sequence_parallel)
    for name, param in reference.named_parameters():
        torch.testing.assert_close(torch.from_numpy(grads[name]), param.grad, rtol=1e-4, atol=1e-7,
                                   msg=lambda m, name=name: f"{name}: {m}")
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(logits), reference(_batch()[:, :15]), rtol=1e-4, atol=1e-5)
    whole = torch.cat([p.detach().flatten() for p in reference.parameters()])
    assert weight_norm == pytest.approx(float(whole.norm()), rel=1e-6)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "encoder_decoder"])
def test_sequence_parallel_follows_one_process(corpus, tmp_path, arch):
    """tp=2 on 2 ranks (dp=1) through the trainer: each rank's norms, residuals and row-parallel
    biases see half of each sequence."""
    common = ("train.max_steps=4", "checkpoint.save_final=true")
    [single] = spawn(train, 1, _config(corpus, tmp_path / "single", MODELS[arch], *common))
    tp, _ = spawn(train, 2, _config(corpus, tmp_path / "tp", MODELS[arch], *common, "train.strategy=ddp",
                                    "parallel.tp=2", "parallel.sequence_parallel=true"))
    np.testing.assert_allclose(tp.losses, single.losses, rtol=1e-5)
    np.testing.assert_allclose(_grad_norms(tp), _grad_norms(single), rtol=1e-5)
    tp_weights = final_weights(tp)
    assert_weights_follow(tp_weights, final_weights(single))  # the norms' too: their gradients summed right


@pytest.mark.slow
def test_sequence_parallel_with_ddp_and_fsdp_follows_one_process_and_reshards(corpus, tmp_path):
    """tp=2 × dp=2 with sequence parallel on 4 ranks (2 "nodes"), dp as ddp and as FSDP2: 10 steps
    within 1e-4 of one process. The fsdp run's step-5 checkpoint resumes at dp=4 (ddp and fsdp, no tp),
    at tp=2 × dp=2 under ddp and at tp=4 (sequence parallel, fsdp over dp=1) with the uninterrupted run's
    losses; the single-process run's resumes at tp=2 × dp=2 (fsdp) with its own."""
    model = {"preset": "tiny-llama", "d_model": 32, "n_heads": 4, "n_kv_heads": 4, "d_ff": 64, "max_seq_len": 64}
    common = ("train.micro_batch_size=4", "train.global_batch_size=8", "train.max_steps=10",
              "checkpoint.save_final=true")
    tp_sp = ("parallel.tp=2", "parallel.sequence_parallel=true", "checkpoint.every=5")

    [single] = spawn(train, 1, _config(corpus, tmp_path / "single", model, *common, "checkpoint.every=5"))
    runs = {}
    for strategy in ("ddp", "fsdp"):
        raw = _config(corpus, tmp_path / strategy, model, *common, f"train.strategy={strategy}", *tp_sp)
        runs[strategy] = spawn(train, 4, raw, env={"LOCAL_WORLD_SIZE": "2"})
        assert all(r.losses == runs[strategy][0].losses for r in runs[strategy])
        np.testing.assert_allclose(runs[strategy][0].losses, single.losses, rtol=1e-4)
        np.testing.assert_allclose(_grad_norms(runs[strategy][0]), _grad_norms(single), rtol=1e-4)
        assert runs[strategy][0].tokens_seen == single.tokens_seen
    single_weights = final_weights(single)
    for strategy, ranks in runs.items():  # whole tensors, plain layout
        weights = final_weights(ranks[0])
        assert weights.keys() == single_weights.keys()
        assert_weights_follow(weights, single_weights, f"{strategy}: ")

    resumes = (("dp4", runs["fsdp"][0], ("train.strategy=ddp", "train.micro_batch_size=2")),
               ("dp4_fsdp", runs["fsdp"][0], ("train.strategy=fsdp", "train.micro_batch_size=2")),
               ("tp2_ddp", runs["fsdp"][0], ("train.strategy=ddp", *tp_sp)),
               ("tp4", runs["fsdp"][0], ("train.strategy=fsdp", "parallel.tp=4", "parallel.sequence_parallel=true",
                                         "train.micro_batch_size=8")),
               ("from_single", single, ("train.strategy=fsdp", *tp_sp)))
    for name, uninterrupted, overrides in resumes:
        resumed = tmp_path / name
        shutil.copytree(uninterrupted.run_dir / "checkpoints" / "step_000005",
                        resumed / "checkpoints" / "step_000005")
        (resumed / "checkpoints" / "latest").write_text("step_000005")
        again = spawn(train, 4, _config(corpus, resumed, model, *common, *overrides))
        np.testing.assert_allclose(again[0].losses, uninterrupted.losses[5:], rtol=1e-4, err_msg=name)
