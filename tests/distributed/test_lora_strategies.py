"""LoRA under every strategy on 2 ranks: the single-process loss curve and adapter (fp32); ZeRO-3 with
every parameter partitioned, frozen base included; FSDP2 with frozen and trained parameters in one block."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from spawn import spawn

from runs import TINY_MODELS, assert_weights_follow, partition_everything, tiny_config, train

LORA = ("lora.rank=4", "lora.alpha=8", "lora.targets=[all-linear]", "train.global_batch_size=8", "train.max_steps=6",
        "train.lr=1e-2")


@pytest.fixture(scope="module")
def base(corpus, tmp_path_factory) -> Path:
    from data.tokenizer import load_tokenizer
    from model import ModelConfig, build_model, save_pretrained

    vocab = load_tokenizer(corpus.tokenizer).vocab_size
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_dict({**TINY_MODELS["decoder"], "vocab_size": vocab, "init_std": 0.2}))
    return save_pretrained(model, tmp_path_factory.mktemp("lora_base"))


def adapter(result) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(result.checkpoint / "model" / "adapter.safetensors"))


@pytest.fixture(scope="module")
def single(corpus, base, tmp_path_factory):
    raw = tiny_config(corpus, tmp_path_factory.mktemp("lora_single"), f"model.init={base}", *LORA)
    [result] = spawn(train, 1, raw)
    assert result.losses[-1] < result.losses[0]
    return result


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "zero3"])
def test_two_rank_lora_follows_single_process(corpus, base, single, tmp_path, strategy):
    extra = (partition_everything(tmp_path),) if strategy == "zero3" else ()
    raw = tiny_config(corpus, tmp_path, f"model.init={base}", f"train.strategy={strategy}", *LORA, *extra)
    rank0, rank1 = spawn(train, 2, raw)
    assert rank0.losses == rank1.losses
    np.testing.assert_allclose(rank0.losses, single.losses, rtol=1e-4)
    expected, got = adapter(single), adapter(rank0)
    assert expected.keys() == got.keys()
    assert_weights_follow(got, expected)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["zero3"])  # DCP (single, ddp, fsdp) resume: tests/align/test_lora_runs.py
def test_two_rank_lora_resumes_exactly(corpus, base, single, tmp_path, strategy):
    from runs import StopAt

    extra = (partition_everything(tmp_path),) if strategy == "zero3" else ()
    raw = tiny_config(corpus, tmp_path / "run", f"model.init={base}", f"train.strategy={strategy}", *LORA, *extra)
    first = spawn(train, 2, raw, "pretrain", (StopAt(3),))[0]
    assert first.steps == 3
    resumed = spawn(train, 2, raw)[0]
    assert resumed.steps == 6 and len(resumed.losses) == 3
    np.testing.assert_allclose(resumed.losses, single.losses[3:], rtol=1e-4)


@pytest.mark.slow
def test_two_rank_qlora_under_ddp_follows_single_process(corpus, base, tmp_path):
    pytest.importorskip("torchao")
    common = (f"model.init={base}", *LORA, "lora.quantize=nf4")
    [single] = spawn(train, 1, tiny_config(corpus, tmp_path / "single", *common))
    rank0, rank1 = spawn(train, 2, tiny_config(corpus, tmp_path / "ddp", "train.strategy=ddp", *common))
    assert rank0.losses == rank1.losses and single.losses[-1] < single.losses[0]
    np.testing.assert_allclose(rank0.losses, single.losses, rtol=1e-4)
