"""KTO: the loss against its closed form (TRL's KTOTrainer), the unpaired shard format and its batches
(each prompt also paired with the previous example's completion, for the KL reference point)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from common.errors import UserError
from data.collate import collate_unpaired
from data.conversations import encode_unpaired
from trainer.objectives.kto import kl_reference_point, kto_losses


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_kto_losses_match_the_closed_form():
    logps = torch.tensor([-10.0, -12.0, -8.0, -9.0], dtype=torch.float64)
    ref = torch.tensor([-11.0, -11.0, -8.5, -7.0], dtype=torch.float64)
    desirable = torch.tensor([True, False, True, False])
    kl = torch.tensor(0.25, dtype=torch.float64)
    out = kto_losses(logps, ref, desirable, kl, beta=0.1, desirable_weight=1.5, undesirable_weight=0.5)
    expected = []
    for p, r, d in zip(logps.tolist(), ref.tolist(), desirable.tolist()):
        expected.append(1.5 * (1 - sigmoid(0.1 * (p - r - 0.25))) if d else 0.5 * (1 - sigmoid(0.1 * (0.25 - (p - r)))))
    assert out.losses.tolist() == pytest.approx(expected)
    assert out.rewards.tolist() == pytest.approx([0.1, -0.1, 0.05, -0.2])
    # raising a desirable completion's log-prob lowers its loss; raising an undesirable one's raises it
    logps.requires_grad_()
    kto_losses(logps, ref, desirable, kl, beta=0.1).losses.sum().backward()
    assert (logps.grad[desirable] < 0).all() and (logps.grad[~desirable] > 0).all()


def test_kl_reference_point_is_the_clamped_mean_log_ratio():
    assert kl_reference_point(torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -4.5])).item() == pytest.approx(0.25)
    assert kl_reference_point(torch.tensor([-5.0]), torch.tensor([-4.0])).item() == 0.0  # clamped at 0


def test_unpaired_records_and_batches(tokenizer):
    records = [{"prompt": "Say hi.", "completion": "Hi!", "label": True},
               {"prompt": [{"role": "user", "content": "Be rude."}], "completion": "No.", "label": False},
               {"prompt": "Count.", "completion": "1 2 3", "label": True}]
    encoded = [encode_unpaired(r, tokenizer, name=f"r{i}") for i, r in enumerate(records)]
    assert [e[2] for e in encoded] == [[1], [0], [1]]
    assert tokenizer.decode(encoded[0][0]).endswith("<|assistant|>\n")
    assert tokenizer.decode(encoded[0][1]) == "Hi!<|end|>"
    batch = collate_unpaired([tuple(np.asarray(a) for a in e) for e in encoded], pad_id=tokenizer.pad_id, seq_len=64)
    assert batch["kto_labels"].tolist() == [1, 0, 1]
    for row, (prompt, _, _) in enumerate(encoded):  # the kl completion of example i is example i-1's
        labels = batch["kl_labels"][row]
        kl_completion = labels[labels != -100].tolist()
        assert kl_completion == encoded[row - 1][1]
        assert batch["kl_input_ids"][row, : len(prompt)].tolist() == prompt
    with pytest.raises(UserError, match="r9: 'label' must be true or false"):
        encode_unpaired({"prompt": "x", "completion": "y", "label": "yes"}, tokenizer, name="r9")
    with pytest.raises(UserError, match="r9: missing field 'label'"):
        encode_unpaired({"prompt": "x", "completion": "y"}, tokenizer, name="r9")
