"""The step's gradient is that of the mean over every target token of the global batch."""

import copy

import pytest
import torch

from model import ModelConfig, build_model
from trainer.config import RunConfig
from trainer.distributed import DistEnv
from trainer.loop import ModelSpec, Trainer
from trainer.objectives.clm import CausalLM
from trainer.objectives.cross_entropy import IGNORE_INDEX, cross_entropy_sum
from trainer.strategy.single import Single

ENV = DistEnv(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cpu"))


def uneven_batches(vocab: int) -> list[dict[str, torch.Tensor]]:
    """Four micro-batches of 2 rows × 8 positions with 1, 4, 9 and 16 target tokens."""
    gen = torch.Generator().manual_seed(1)
    batches = []
    for targets in (1, 4, 9, 16):
        input_ids = torch.randint(0, vocab, (2, 8), generator=gen)
        labels = torch.randint(0, vocab, (2, 8), generator=gen)
        flat = labels.view(-1)
        flat[targets:] = IGNORE_INDEX
        batches.append({"input_ids": input_ids, "labels": labels})
    return batches


@pytest.mark.parametrize("chunk_size", [0, 5])
def test_accumulated_gradient_is_the_global_token_mean(tmp_path, chunk_size):
    model_cfg = ModelConfig.from_dict({"preset": "tiny-llama", "vocab_size": 48, "d_model": 16, "n_heads": 2,
                                       "n_kv_heads": 1, "d_ff": 32})
    cfg = RunConfig.from_dict({
        "train": {"micro_batch_size": 2, "global_batch_size": 8, "grad_clip": 0.0, "loss_chunk_size": chunk_size},
        "log": {"dir": str(tmp_path)},
    })
    torch.manual_seed(0)
    net = build_model(model_cfg)
    reference = copy.deepcopy(net)
    batches = uneven_batches(48)

    strategy = Single(cfg.train, ENV, accumulation=4)
    strategy.wrap(net)
    trainer = Trainer(cfg, ENV, strategy, CausalLM("clm", chunk_size), loader=None,
                      model_spec=ModelSpec(model_cfg, "lm", None))
    metrics = trainer.train_step(iter(batches))

    total = sum(cross_entropy_sum(reference(b["input_ids"]), b["labels"]) for b in batches)
    mean = total / sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches)
    mean.backward()
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in reference.parameters()]))

    assert metrics["loss"] == pytest.approx(mean.item(), rel=1e-6)
    assert metrics["grad_norm"] == pytest.approx(norm.item(), rel=1e-5)
    per_micro_mean = sum(cross_entropy_sum(reference(b["input_ids"]), b["labels"]).item() / n
                         for b, n in zip(batches, (1, 4, 9, 16))) / 4
    assert abs(per_micro_mean - mean.item()) > 0.01  # the naive average of micro-batch means would differ
