"""Vocab parallel (the default under parallel.tp): the embedding and LM head split by vocabulary rows,
the chunked cross-entropy computed from vocab-sharded logits, follow one process; no rank makes
full-vocabulary logits in training."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from runs import final_weights, tiny_config, train
from spawn import spawn
from torch.utils._python_dispatch import TorchDispatchMode

VOCAB = 96  # no other dimension of the model is 96 (or 48)
MODEL = {"preset": "tiny-llama", "d_model": 32, "n_heads": 4, "n_kv_heads": 2, "d_ff": 64, "max_seq_len": 64,
         "vocab_size": VOCAB}


class _WidestLastDim(TorchDispatchMode):
    """Records every last dimension an op's float output has."""

    def __init__(self) -> None:
        super().__init__()
        self.last_dims: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.ndim:
                self.last_dims.add(t.shape[-1])
        return out


def _batch() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(0))


def _loss(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    from trainer.objectives.cross_entropy import head_cross_entropy

    labels = tokens[:, 1:].clone()
    labels[0, :3] = -100  # ignored targets
    return model(tokens[:, :-1], head_loss=head_cross_entropy(labels, chunk_size=5))  # several chunks


def _other_heads(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """The per-row chunked CE (DPO's) and a head_loss of its own (as PPO's): a weighted sum."""
    from trainer.objectives.cross_entropy import head_cross_entropy

    per_row = model(tokens[:, :-1], head_loss=head_cross_entropy(tokens[:, 1:], chunk_size=4, per_row=True))
    own = model(tokens[:, :-1], head_loss=lambda h, w, b: torch.logsumexp(h @ w.t(), dim=-1).mean())
    return per_row @ torch.tensor([1.0, 0.5]) + own


BERT = {"preset": "tiny-bert", "d_model": 32, "n_heads": 2, "d_ff": 64, "max_seq_len": 64, "vocab_size": VOCAB}


def _model(tied: bool | None):
    """The llama-like model, tied or not; ``None``: a masked LM (its head's transform and bias)."""
    from model import ModelConfig, build_model

    net = build_model(ModelConfig.from_dict(BERT if tied is None else {**MODEL, "tie_embeddings": tied}))
    net.init_weights(0)
    return net


def _vocab_parallel_gradients(tied: bool | None, sequence_parallel: bool, train: dict
                              ) -> tuple[float, dict, tuple, set[int]]:
    """Backwards on 2 ranks (tp=2): the chunked CE, every gradient (with :func:`_other_heads`') gathered
    whole, this rank's embedding shape and the last dimensions of every float tensor made in the
    chunked CE's forward and backward."""
    from trainer.config import RunConfig
    from trainer.distributed import init_distributed
    from trainer.strategy.tensor_parallel import TensorParallel

    env = init_distributed(need_group=True)
    tp = TensorParallel(RunConfig.from_dict({"train": train}).train, env, size=2,
                        sequence_parallel=sequence_parallel)
    wrapped = tp.wrap(_model(tied))
    with _WidestLastDim() as seen:
        loss = _loss(wrapped, _batch())
        loss.backward()
    _other_heads(wrapped, _batch()).backward()
    tp._reduce_gradients()
    grads = {name: tp._gather(name, p.grad).numpy() for name, p in wrapped.named_parameters()}
    return float(loss), grads, tuple(wrapped.embed.tokens.weight.shape), seen.last_dims


@pytest.mark.parametrize(("tied", "sequence_parallel", "train"), [
    (True, False, {"strategy": "ddp"}), (False, False, {"strategy": "ddp"}), (True, True, {"strategy": "ddp"}),
    (False, True, {"strategy": "ddp"}), (True, True, {"strategy": "fsdp"}), (None, True, {"strategy": "ddp"})],
    ids=["tied", "untied", "tied-sp", "untied-sp", "tied-sp-fsdp", "masked-lm-sp"])
def test_vocab_parallel_gradients_equal_one_process(tied, sequence_parallel, train):
    reference = _model(tied)
    expected = _loss(reference, _batch())
    expected.backward()
    _other_heads(reference, _batch()).backward()
    ranks = spawn(_vocab_parallel_gradients, 2, tied, sequence_parallel, train)
    for loss, grads, embedding_shape, last_dims in ranks:
        assert embedding_shape == (VOCAB // 2, 32)  # split, not replicated
        assert VOCAB not in last_dims and VOCAB // 2 in last_dims  # sharded logits only
        assert loss == pytest.approx(expected.item(), rel=1e-6)
        for name, param in reference.named_parameters():  # atol: ~1e-7 of the largest (~10), rounding
            torch.testing.assert_close(torch.from_numpy(grads[name]), param.grad, rtol=1e-4, atol=1e-6,
                                       msg=lambda m, name=name: f"{name}: {m}")


def test_vocab_parallel_follows_one_process(corpus, tmp_path):
    """10 steps of tp=2 (dp=1) through the trainer with its chunked loss; whole tensors in the checkpoint."""
    common = ("train.max_steps=10", "checkpoint.save_final=true")

    def config(name, *overrides):
        raw = tiny_config(corpus, tmp_path / name, *common, *overrides)
        raw["model"] = {**MODEL, "vocab_size": 384, "tie_embeddings": False}
        return raw

    [single] = spawn(train, 1, config("single"))
    tp, _ = spawn(train, 2, config("tp", "train.strategy=ddp", "parallel.tp=2"))
    assert len(tp.losses) == 10
    np.testing.assert_allclose(tp.losses, single.losses, rtol=1e-5)
    tp_weights = final_weights(tp)
    for name, tensor in final_weights(single).items():
        torch.testing.assert_close(tp_weights[name], tensor, rtol=1e-4, atol=1e-5, msg=name)


def test_vocab_parallel_refuses_a_vocabulary_tp_does_not_divide_and_can_be_turned_off(corpus, tmp_path):
    """vocab 385 at tp=2: one line; with parallel.vocab_parallel=false the replicated head follows one process."""
    from spawn import RanksFailed

    def config(name, *overrides):
        raw = tiny_config(corpus, tmp_path / name, "train.max_steps=3", "checkpoint.save_final=false", *overrides)
        raw["model"] = {**MODEL, "vocab_size": 385}
        return raw

    with pytest.raises(RanksFailed, match=r"model\.vocab_size=385 must be a multiple of it"):
        spawn(train, 2, config("refused", "train.strategy=ddp", "parallel.tp=2"))
    [single] = spawn(train, 1, config("single"))
    tp, _ = spawn(train, 2, config("tp", "train.strategy=ddp", "parallel.tp=2", "parallel.vocab_parallel=false"))
    np.testing.assert_allclose(tp.losses, single.losses, rtol=1e-5)
