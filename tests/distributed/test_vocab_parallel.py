"""Vocab parallel (the default under parallel.tp): the embedding and LM head split by vocabulary rows,
the chunked cross-entropy computed from vocab-sharded logits, follow one process; no rank makes
full-vocabulary logits in training."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from spawn import spawn
from torch.utils._python_dispatch import TorchDispatchMode

from runs import assert_weights_follow, final_weights, tiny_config, train

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


ODD = 385  # at tp=2: shards of 256 rows, the last one 129 of its own and 127 of padding


def _batch(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 17), generator=torch.Generator().manual_seed(0))


def _loss(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    from trainer.objectives.cross_entropy import head_cross_entropy

    labels = tokens[:, 1:].clone()
    labels[0, :3] = -100  # ignored targets
    return model(tokens[:, :-1], head_loss=head_cross_entropy(labels, chunk_size=5))  # several chunks


def _other_heads(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """The per-row chunked CE (DPO's), a head_loss of its own (as PPO's) and plain logits: a weighted sum."""
    from trainer.objectives.cross_entropy import head_cross_entropy

    per_row = model(tokens[:, :-1], head_loss=head_cross_entropy(tokens[:, 1:], chunk_size=4, per_row=True))
    own = model(tokens[:, :-1], head_loss=lambda h, w, b: torch.logsumexp(h @ w.t(), dim=-1).mean())
    logits = model(tokens[:, :-1])
    return per_row @ torch.tensor([1.0, 0.5]) + own + logits.logsumexp(-1).mean()


BERT = {"preset": "tiny-bert", "d_model": 32, "n_heads": 2, "d_ff": 64, "max_seq_len": 64, "vocab_size": VOCAB}


def _model(tied: bool | None, vocab: int):
    """The llama-like model, tied or not; ``None``: a masked LM (its head's transform and bias)."""
    from model import ModelConfig, build_model

    raw = BERT if tied is None else {**MODEL, "tie_embeddings": tied}
    net = build_model(ModelConfig.from_dict({**raw, "vocab_size": vocab}))
    net.init_weights(0)
    return net


def _vocab_parallel_gradients(tied: bool | None, sequence_parallel: bool, train: dict, vocab: int
                              ) -> tuple[float, dict, tuple, set[int], float]:
    """Backwards on 2 ranks (tp=2): the chunked CE, every gradient (with :func:`_other_heads`') gathered
    whole, this rank's embedding shape, the last dimensions of every float tensor made in the chunked
    CE's forward and backward, and the summed magnitude of the gradient of its padding rows."""
    from trainer.config import RunConfig
    from trainer.distributed import init_distributed
    from trainer.strategy.tensor_parallel import TensorParallel
    from trainer.strategy.vocab_parallel import vocab_shards

    env = init_distributed(need_group=True)
    tp = TensorParallel(RunConfig.from_dict({"train": train}).train, env, size=2,
                        sequence_parallel=sequence_parallel)
    wrapped = tp.wrap(_model(tied, vocab))
    with _WidestLastDim() as seen:
        loss = _loss(wrapped, _batch(vocab))
        loss.backward()
    _other_heads(wrapped, _batch(vocab)).backward()
    tp._reduce_gradients()
    grads = {name: tp._gather(name, p.grad).numpy() for name, p in wrapped.named_parameters()}
    own = len(vocab_shards(vocab, 2)[0][tp.shard_rank])
    padding = wrapped.embed.tokens.weight.grad.to_local() if train["strategy"] == "fsdp" else \
        wrapped.embed.tokens.weight.grad
    return (float(loss), grads, tuple(wrapped.embed.tokens.weight.shape), seen.last_dims,
            float(padding[own:].abs().sum()))


@pytest.mark.parametrize(("tied", "sequence_parallel", "train", "vocab"), [
    (True, False, {"strategy": "ddp"}, VOCAB), (False, False, {"strategy": "ddp"}, VOCAB),
    (True, True, {"strategy": "ddp"}, VOCAB), (False, True, {"strategy": "ddp"}, VOCAB),
    (True, True, {"strategy": "fsdp"}, VOCAB), (None, True, {"strategy": "ddp"}, VOCAB),
    (True, False, {"strategy": "ddp"}, ODD), (False, False, {"strategy": "ddp"}, ODD),
    (True, True, {"strategy": "ddp"}, ODD), (False, True, {"strategy": "ddp"}, ODD),
    (False, True, {"strategy": "fsdp"}, ODD), (None, False, {"strategy": "ddp"}, ODD)],
    ids=["tied", "untied", "tied-sp", "untied-sp", "tied-sp-fsdp", "masked-lm-sp", "padded-tied",
         "padded-untied", "padded-tied-sp", "padded-untied-sp", "padded-untied-sp-fsdp", "padded-masked-lm"])
def test_vocab_parallel_gradients_equal_one_process(tied, sequence_parallel, train, vocab):
    """Loss and every gradient (whole, in the plain shapes) as one process; a padded vocabulary's extra
    rows on the last rank get no gradient."""
    reference = _model(tied, vocab)
    expected = _loss(reference, _batch(vocab))
    expected.backward()
    _other_heads(reference, _batch(vocab)).backward()
    ranks = spawn(_vocab_parallel_gradients, 2, tied, sequence_parallel, train, vocab)
    rows = VOCAB // 2 if vocab == VOCAB else 256
    for rank, (loss, grads, embedding_shape, last_dims, padding_grad) in enumerate(ranks):
        assert embedding_shape == (rows, 32)  # split, not replicated
        assert vocab not in last_dims and (rows if rank == 0 else vocab - rows) in last_dims  # sharded logits only
        assert padding_grad == 0.0
        assert loss == pytest.approx(expected.item(), rel=1e-6)
        for name, param in reference.named_parameters():  # atol: ~1e-7 of the largest (~10), rounding
            assert grads[name].shape == tuple(param.shape), name
            torch.testing.assert_close(torch.from_numpy(grads[name]), param.grad, rtol=1e-4, atol=1e-6,
                                       msg=lambda m, name=name: f"{name}: {m}")


def test_vocab_shards_pad_as_megatron_and_refuse_a_vocabulary_too_small():
    from common.errors import ConfigError
    from trainer.strategy.vocab_parallel import vocab_shards

    def layout(vocab, tp):
        rows, size = vocab_shards(vocab, tp)
        return size, [(int(r[0]), len(r)) for r in rows]

    assert layout(50257, 2) == (25216, [(0, 25216), (25216, 25041)])  # GPT-2: 197 × 128 rows a rank
    assert layout(50304, 8) == (6288, [(i * 6288, 6288) for i in range(8)])  # tp divides it: no padding
    assert layout(385, 4) == (128, [(0, 128), (128, 128), (256, 128), (384, 1)])
    assert layout(97, 2) == (49, [(0, 49), (49, 48)])  # 128 rows would leave rank 1 none: not rounded
    with pytest.raises(ConfigError, match=r"parallel\.tp=4 ranks a row of model\.vocab_size=5"):
        vocab_shards(5, 4)


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
    assert_weights_follow(tp_weights, final_weights(single))


def test_a_padded_vocabulary_follows_one_process_and_keeps_its_checkpoint_shapes(corpus, tmp_path):
    """vocab 385 at tp=2 (its last shard padded): the losses of one process, whole unpadded tensors in the
    checkpoint (weights and optimizer moments), which resume at tp=2 as the run goes on and at tp=1."""

    def config(name, *overrides):
        raw = tiny_config(corpus, tmp_path / name, "train.max_steps=6", "checkpoint.save_final=true", *overrides)
        raw["model"] = {**MODEL, "vocab_size": ODD}
        return raw

    [single] = spawn(train, 1, config("single"))
    tp, _ = spawn(train, 2, config("tp", "train.strategy=ddp", "parallel.tp=2", "checkpoint.every=3"))
    np.testing.assert_allclose(tp.losses, single.losses, rtol=1e-5)
    tp_weights = final_weights(tp)
    assert tp_weights["embed.tokens.weight"].shape == (ODD, 32)
    assert_weights_follow(tp_weights, final_weights(single))
    for name, overrides in (("again-tp", ("train.strategy=ddp", "parallel.tp=2")), ("again-single", ())):
        checkpoints = tmp_path / name / "checkpoints"
        shutil.copytree(tmp_path / "tp" / "checkpoints" / "step_000003", checkpoints / "step_000003")
        (checkpoints / "latest").write_text("step_000003")
        again = spawn(train, 2 if overrides else 1, config(name, *overrides))[0]
        np.testing.assert_allclose(again.losses, tp.losses[3:], rtol=1e-5)
