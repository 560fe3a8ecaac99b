"""Task collators and objectives: classification and seq2seq batches, their losses against
torch's cross-entropy computed here, and a classifier head sized by the shards' labels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data.collate import collate_classification, collate_seq2seq
from model import build_model
from model.config import ModelConfig
from trainer.objectives.classify import Classification
from trainer.objectives.seq2seq import TeacherForcedSeq2Seq

PAD = 0


def tiny(preset: str, **extra) -> ModelConfig:
    return ModelConfig.from_dict({"preset": preset, "vocab_size": 64, "d_model": 32, "n_heads": 2, "d_ff": 64,
                                  **extra}, "model")


def samples(rng: np.random.Generator, n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(rng.integers(5, 64, rng.integers(2, 12)).astype(np.uint16), rng.integers(5, 64, rng.integers(1, 9))
             .astype(np.uint16)) for _ in range(n)]


def test_classification_batch_pads_cuts_and_keeps_one_label_per_row():
    rows = [(np.array([1, 9, 8, 7, 2], np.uint16), np.array([1], np.uint16)),
            (np.array([1, 6, 2], np.uint16), np.array([0], np.uint16))]
    batch = collate_classification(rows, pad_id=PAD, seq_len=4)
    assert batch["input_ids"].tolist() == [[1, 9, 8, 7], [1, 6, 2, PAD]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert batch["labels"].tolist() == [1, 0]


def test_classification_loss_and_accuracy_equal_torch_cross_entropy():
    torch.manual_seed(0)
    model = build_model(tiny("tiny-bert", n_labels=3), head="classifier")
    rng = np.random.default_rng(0)
    rows = [(np.concatenate([[1], rng.integers(5, 64, rng.integers(2, 10)), [2]]).astype(np.uint16),
             np.array([rng.integers(0, 3)], np.uint16)) for _ in range(6)]
    batch = collate_classification(rows, pad_id=PAD, seq_len=32)
    out = Classification().loss(model, batch)
    scores = torch.cat([model(torch.from_numpy(ids.astype(np.int64))[None]) for ids, _ in rows])  # unpadded
    labels = torch.tensor([int(label[0]) for _, label in rows])
    torch.testing.assert_close(out.loss_sum, F.cross_entropy(scores, labels, reduction="sum"), atol=1e-5, rtol=1e-5)
    assert out.count.item() == Classification().count(batch) == 6
    assert out.metrics["accuracy"].item() == (scores.argmax(-1) == labels).sum().item()


def test_seq2seq_batch_teacher_forces_the_target_after_the_pad_start():
    rows = [(np.array([5, 6, 2], np.uint16), np.array([7, 8, 9, 2], np.uint16)),
            (np.array([5, 2], np.uint16), np.array([9, 2], np.uint16))]
    batch = collate_seq2seq(rows, pad_id=PAD, seq_len=16)
    assert batch["input_ids"].tolist() == [[5, 6, 2], [5, 2, PAD]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["decoder_input_ids"].tolist() == [[PAD, 7, 8, 9], [PAD, 9, PAD, PAD]]
    assert batch["labels"].tolist() == [[7, 8, 9, 2], [9, 2, -100, -100]]
    assert batch["decoder_attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]


@pytest.mark.parametrize("chunk_size", [0, 7])
def test_seq2seq_loss_equals_torch_cross_entropy_over_target_tokens(chunk_size):
    torch.manual_seed(0)
    model = build_model(tiny("tiny-t5"))
    rows = samples(np.random.default_rng(1), 5)
    batch = collate_seq2seq(rows, pad_id=PAD, seq_len=32)
    out = TeacherForcedSeq2Seq(chunk_size).loss(model, batch)
    total, tokens = 0.0, 0
    for source, target in rows:  # each pair alone, no padding anywhere
        src, tgt = torch.from_numpy(source.astype(np.int64))[None], torch.from_numpy(target.astype(np.int64))
        logits = model(src, torch.cat([torch.tensor([PAD]), tgt[:-1]])[None])[0]
        total += F.cross_entropy(logits, tgt, reduction="sum")
        tokens += len(tgt)
    torch.testing.assert_close(out.loss_sum, torch.as_tensor(total), atol=1e-4, rtol=1e-5)
    assert out.count.item() == tokens


def test_classifier_from_an_mlm_checkpoint_keeps_the_encoder_and_sizes_the_head(tmp_path):
    from common.config import load_config
    from model.io import save_pretrained
    from trainer.build import build_run_model
    from trainer.config import RunConfig
    from trainer.strategy import materialize

    torch.manual_seed(0)
    mlm = build_model(tiny("tiny-bert"))
    save_pretrained(mlm, tmp_path / "mlm")
    cfg = load_config(RunConfig, None, [f"model.init={tmp_path / 'mlm'}"])
    net, config = build_run_model(cfg, "classifier", 64, n_labels=3)
    materialize(net, cfg.train.seed)  # what every strategy does first
    assert config.n_labels == 3 and net.score.weight.shape == (3, 32)
    body = {k: v for k, v in mlm.state_dict().items() if k.startswith(("embed.", "stack."))}
    assert body and all(torch.equal(net.state_dict()[k], v) for k, v in body.items())
