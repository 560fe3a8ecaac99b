"""Activation checkpointing none / full / selective: same gradients, less kept, the right ops recomputed."""

import collections
import gc
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from common.errors import ConfigError
from model import build_model
from model.config import ModelConfig
from trainer.config import TrainConfig
from trainer.strategy.prepare import prepare

MODES = ("none", "full", "selective")


class KeptAfterForward(TorchDispatchMode):
    """Bytes of the tensors made during forward that are still alive afterwards (what autograd keeps)."""

    def __init__(self) -> None:
        super().__init__()
        self.made: list[weakref.ref] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.made.append(weakref.ref(t))
        return out

    def kept_bytes(self) -> int:
        gc.collect()
        storages = {}
        for ref in self.made:
            if (t := ref()) is not None:
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return sum(storages.values())


class OpCounts(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def run(mode: str) -> dict:
    cfg = ModelConfig.from_dict({"preset": "tiny-llama", "vocab_size": 256, "n_layers": 2})
    torch.manual_seed(0)
    model = prepare(build_model(cfg), mode, compile=False)
    ids = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(1))
    with KeptAfterForward() as kept:
        loss = model(ids).logsumexp(-1).mean()
    kept_bytes = kept.kept_bytes()
    with OpCounts() as ops:
        loss.backward()
    return {"loss": loss.item(), "kept": kept_bytes, "backward_ops": ops.counts,
            "grads": {n: p.grad.clone() for n, p in model.named_parameters()}}


@pytest.fixture(scope="module")
def results():
    return {mode: run(mode) for mode in MODES}


def test_every_mode_gives_the_same_loss_and_gradients(results):
    reference = results["none"]
    for mode in ("full", "selective"):
        assert results[mode]["loss"] == reference["loss"]
        for name, grad in reference["grads"].items():
            torch.testing.assert_close(results[mode]["grads"][name], grad, rtol=1e-6, atol=1e-7, msg=name)


def test_selective_keeps_less_than_none_and_more_than_full(results):
    kept = {mode: results[mode]["kept"] for mode in MODES}
    assert kept["none"] > 1.5 * kept["selective"] > 1.5 * kept["full"], kept


def test_selective_recomputes_elementwise_ops_but_no_matmul_or_attention(results):
    none, full, selective = (results[m]["backward_ops"] for m in MODES)
    attention = "_scaled_dot_product_flash_attention_for_cpu"
    assert none["silu"] == 0 and none[attention] == 0
    assert selective["silu"] == full["silu"] == 2  # one per block's MLP
    assert selective["mm"] == none["mm"] < full["mm"]  # full runs the blocks' matmuls again
    assert selective[attention] == 0 < full[attention]


@pytest.mark.parametrize(("given", "expected"), [(True, "full"), (False, "none"), ("selective", "selective")])
def test_config_takes_the_mode_or_the_older_boolean(given, expected):
    assert TrainConfig.from_dict({"activation_checkpointing": given}).activation_checkpointing == expected


def test_config_refuses_an_unknown_mode_in_one_line():
    with pytest.raises(ConfigError, match=r"activation_checkpointing.*full.*selective") as info:
        TrainConfig.from_dict({"activation_checkpointing": "some"}, "train")
    assert "\n" not in str(info.value)
