"""The trainer on a real GPU (skipped without CUDA; bench/gpu_check.sh runs it): bf16 with compiled
blocks, Liger kernels and selective checkpointing learns and reports MFU; fsdp and zero2 on one
nccl rank follow the single-process run."""

import json

import numpy as np
import pytest
import torch
from runs import tiny_config, train
from spawn import spawn

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

GPU = ("train.precision=bf16", "train.max_steps=12", "checkpoint.save_final=false", "log.every=1")


def train_rows(result) -> list[dict]:
    lines = (result.run_dir / "metrics.jsonl").read_text().splitlines()
    return [row for row in map(json.loads, lines) if "mfu" in row]


@pytest.fixture(scope="module")
def single(corpus, tmp_path_factory):
    [result] = spawn(train, 1, tiny_config(corpus, tmp_path_factory.mktemp("single"), *GPU), start="spawn")
    return result


def test_single_gpu_bf16_learns_and_reports_mfu(single):
    assert single.losses[-1] < single.losses[0] - 0.3, single.losses
    rows = train_rows(single)
    assert len(rows) == 12 and all(row["mfu"] > 0 for row in rows), rows[-1]  # the GPU's peak was found


@pytest.mark.parametrize("strategy", ["fsdp", "zero2"])
def test_one_nccl_rank_follows_single(corpus, tmp_path, single, strategy):
    if strategy == "zero2":
        pytest.importorskip("deepspeed")
    [result] = spawn(train, 1, tiny_config(corpus, tmp_path, *GPU, f"train.strategy={strategy}"), start="spawn")
    np.testing.assert_allclose(result.losses, single.losses, rtol=2e-2)


def test_compiled_liger_selective_run_follows_the_plain_one(corpus, tmp_path, single):
    pytest.importorskip("liger_kernel")
    raw = tiny_config(corpus, tmp_path, *GPU, "train.compile=true", "model.kernels=liger",
                      "train.activation_checkpointing=selective")
    [result] = spawn(train, 1, raw, start="spawn")
    np.testing.assert_allclose(result.losses, single.losses, rtol=2e-2)
