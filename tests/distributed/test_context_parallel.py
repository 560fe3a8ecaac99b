"""Context parallel (parallel.cp): each sequence split over ranks (head-tail chunks), keys and values
all-gathered for attention. Gradients and the loss equal the single-process ones on packed documents;
runs through the trainer follow one process and their checkpoints resume without cp."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from spawn import spawn

from runs import assert_weights_follow, final_weights, tiny_config, train

LLAMA = {"preset": "tiny-llama", "d_model": 32, "n_heads": 4, "n_kv_heads": 2, "d_ff": 64, "max_seq_len": 64}
GPT2 = {"preset": "tiny-gpt2", "d_model": 32, "n_heads": 2, "d_ff": 64, "max_seq_len": 64}  # learned positions


def _packed() -> dict[str, torch.Tensor]:
    """Two packed rows of 16 tokens: documents of uneven length, some crossing the cp chunk edges."""
    from data.collate import collate_rows

    tokens = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(0)).numpy()
    starts = np.zeros((2, 17), dtype=bool)
    starts[0, [5, 6, 13]] = True
    starts[1, [9]] = True
    return collate_rows(tokens, starts)


def _padded() -> dict[str, torch.Tensor]:
    """Two unpacked SFT rows of 13 tokens (not a multiple of 2·cp), targets on a part; the second
    padded on the left (under a causal mask only left padding hides keys a query would see)."""
    from data.collate import collate_sft

    generator = torch.Generator().manual_seed(1)
    samples = [(torch.randint(0, 64, (n,), generator=generator).numpy(), (np.arange(n) >= n // 2).astype(np.int64))
               for n in (14, 9)]
    batch = collate_sft(samples, pad_id=0, seq_len=16)
    for value in batch.values():
        value[1] = value[1].roll(13 - 8)
    return batch


BATCHES = {"clm": _packed, "sft": _padded}


def _model(model: dict):
    from model import ModelConfig, build_model

    net = build_model(ModelConfig.from_dict({**model, "vocab_size": 64}))
    net.init_weights(0)
    return net


def _context_parallel_step(model: dict, train: dict, kind: str) -> tuple[dict, float]:
    """One micro-batch on 2 ranks (cp=2) through the strategy, scaled as the loop scales it: the
    synced gradients and the loss the loop would log."""
    from trainer.config import RunConfig
    from trainer.distributed import init_distributed
    from trainer.objectives.clm import CausalLM
    from trainer.strategy import context_parallel

    env = init_distributed(need_group=True)
    cp = context_parallel.build(RunConfig.from_dict({"train": train}).train, env, 1, size=2)
    wrapped = cp.wrap(_model(model))
    objective, batch = CausalLM(kind, 0), BATCHES[kind]()
    count = env.world_size * objective.count(batch)  # the loop's global count: every cp rank reads the batch
    sums = cp.forward_backward([batch], env.world_size / count, lambda b: (objective.loss(wrapped, b), 0.0),
                               objective)
    loss = sums.reduce(torch.tensor(float(count), dtype=torch.float64))["loss"]
    assert cp.mask is None  # outside a step, forwards run whole sequences
    grads = {name: p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
             for name, p in getattr(wrapped, "module", wrapped).named_parameters()}
    return {name: grad.numpy() for name, grad in grads.items()}, loss


@pytest.mark.parametrize(("model", "train", "kind"), [
    ({**LLAMA, "attn": "sdpa"}, {"strategy": "ddp"}, "clm"),
    ({**LLAMA, "attn": "eager", "sliding_window": 5}, {"strategy": "ddp", "activation_checkpointing": "full"}, "clm"),
    ({**GPT2, "attn": "auto"}, {"strategy": "ddp", "activation_checkpointing": "selective"}, "clm"),
    ({**LLAMA, "attn": "sdpa"}, {"strategy": "ddp"}, "sft"),
    ({**LLAMA, "attn": "sdpa"}, {"strategy": "fsdp"}, "clm"),
], ids=["rope-gqa-sdpa", "eager-window-full-ac", "gpt2-learned-selective-ac", "sft-padded", "fsdp"])
def test_context_parallel_gradients_equal_one_process(model, train, kind):
    """Document masking, causal order across the head-tail chunks, global positions, padding, the loss
    sum and DDP's average over the cp ranks: any one wrong moves the gradients."""
    from trainer.objectives.clm import CausalLM

    reference, objective, batch = _model(model), CausalLM(kind, 0), BATCHES[kind]()
    out = objective.loss(reference, batch)
    (out.loss_sum / out.count).backward()
    (grads, loss), _ = spawn(_context_parallel_step, 2, model, train, kind)
    assert loss == pytest.approx(float(out.loss_sum.detach() / out.count), rel=1e-6)
    for name, param in reference.named_parameters():
        torch.testing.assert_close(torch.from_numpy(grads[name]), param.grad, rtol=1e-4, atol=1e-7,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_slices_are_head_and_tail_chunks():
    from trainer.strategy.context_parallel import slice_indices

    assert slice_indices(8, 2, 0).tolist() == [0, 1, 6, 7]
    assert slice_indices(8, 2, 1).tolist() == [2, 3, 4, 5]
    assert sorted(torch.cat([slice_indices(24, 3, r) for r in range(3)]).tolist()) == list(range(24))


def _config(corpus, run_dir, *overrides):
    raw = tiny_config(corpus, run_dir, "data.seq_len=64", *overrides)
    raw["model"] = dict(LLAMA)
    return raw


def test_context_parallel_follows_one_process_and_resumes_without_cp(corpus, tmp_path):
    """cp=2 on 2 ranks through the trainer (rope, packed documents): 10 steps and the evaluations within
    1e-4 of one process; its step-5 checkpoint resumes at cp=1 (one process) with the uninterrupted run's losses,
    and the single-process run's at cp=2 with its own."""
    common = ("train.max_steps=10", "checkpoint.every=5", "checkpoint.save_final=true", "train.eval_every=5")
    [single] = spawn(train, 1, _config(corpus, tmp_path / "single", *common))
    cp = spawn(train, 2, _config(corpus, tmp_path / "cp", *common, "train.strategy=ddp", "parallel.cp=2"))
    assert cp[0].losses == cp[1].losses
    np.testing.assert_allclose(cp[0].losses, single.losses, rtol=1e-4)
    assert cp[0].tokens_seen == single.tokens_seen
    assert single.eval_loss is not None
    assert cp[0].eval_loss == pytest.approx(single.eval_loss, rel=1e-4)  # evaluation runs whole sequences
    weights = final_weights(cp[0])
    assert_weights_follow(weights, final_weights(single))

    for name, uninterrupted, world, overrides in (("cp2_to_cp1", cp[0], 1, ()),
                                                  ("cp1_to_cp2", single, 2, ("train.strategy=ddp", "parallel.cp=2"))):
        resumed = tmp_path / name
        shutil.copytree(uninterrupted.run_dir / "checkpoints" / "step_000005",
                        resumed / "checkpoints" / "step_000005")
        (resumed / "checkpoints" / "latest").write_text("step_000005")
        again = spawn(train, world, _config(corpus, resumed, *common, *overrides))
        np.testing.assert_allclose(again[0].losses, uninterrupted.losses[5:], rtol=1e-4, err_msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_context_parallel_with_data_parallel_follows_one_process(corpus, tmp_path, strategy):
    """cp=2 × dp=2 on 4 ranks, dp as ddp and as FSDP2 (sharded over all 4): 10 steps within 1e-4 of
    one process, tokens counted once."""
    common = ("train.micro_batch_size=4", "train.global_batch_size=8", "train.max_steps=10")
    [single] = spawn(train, 1, _config(corpus, tmp_path / "single", *common))
    ranks = spawn(train, 4, _config(corpus, tmp_path / "cp", *common, f"train.strategy={strategy}", "parallel.cp=2"))
    assert all(r.losses == ranks[0].losses for r in ranks)
    np.testing.assert_allclose(ranks[0].losses, single.losses, rtol=1e-4)
    assert ranks[0].tokens_seen == single.tokens_seen
