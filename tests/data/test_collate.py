import numpy as np
import pytest

from common.errors import ConfigError, UserError
from data.collate import IGNORE_INDEX as IGNORE
from data.collate import collate_mlm, collate_preference, collate_rows, collate_sft, corrupt_spans
from data.config import DataConfig
from data.loader import build_loader, count_input_tokens, count_target_tokens


def test_packed_rows_document_ids_positions_and_shifted_labels():
    # one stream: doc A (5 tokens) | doc B (3) | doc C (4...) cut into rows of 4 (+1 overlap)
    tokens = np.array([[10, 11, 12, 13, 14], [14, 20, 21, 22, 30]])
    starts = np.array([[1, 0, 0, 0, 0], [0, 1, 0, 0, 1]], bool)
    b = collate_rows(tokens, starts)
    assert b["input_ids"].tolist() == [[10, 11, 12, 13], [14, 20, 21, 22]]
    assert b["labels"].tolist() == [[11, 12, 13, 14], [IGNORE, 21, 22, IGNORE]]
    assert b["document_ids"].tolist() == [[0, 0, 0, 0], [0, 1, 1, 1]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3], [0, 0, 1, 2]]
    mask = np.array([[0, 0, 1, 1, 1], [1, 0, 1, 1, 1]], np.uint8)
    assert collate_rows(tokens, starts, mask)["labels"].tolist() == [[IGNORE, 12, 13, 14], [IGNORE, 21, 22, IGNORE]]


def test_clm_loader_batches_are_exact_packings_of_the_documents(text_shards, tokenizer):
    cfg = DataConfig.from_dict({"train": str(text_shards), "seq_len": 64, "num_workers": 0, "shuffle": False})
    loader = build_loader(cfg, objective="clm", tokenizer=tokenizer, rank=0, world_size=1, micro_batch_size=3, seed=0)
    batch = next(iter(loader))
    assert set(batch) == {"input_ids", "labels", "document_ids", "position_ids"}
    shards = loader.stream.shards
    stream = np.concatenate([shards.read(i) for i in range(4)])
    flat = batch["input_ids"].reshape(-1).numpy()
    np.testing.assert_array_equal(flat, stream[: flat.size])
    labels = batch["labels"].numpy()
    inputs = batch["input_ids"].numpy()
    inside = labels != IGNORE
    shifted = np.concatenate([inputs[:, 1:], stream[64 : 64 * 3 + 1 : 64].reshape(-1, 1)], axis=1)
    np.testing.assert_array_equal(labels[inside], shifted[inside])
    # the ignored targets are exactly the first tokens of documents (stories end with EOS)
    assert (inputs[:, :][np.nonzero(~inside)] == tokenizer.eos_id).all()
    assert count_target_tokens(batch) == int(inside.sum()) and count_input_tokens(batch) == 3 * 64


def test_mlm_masking_statistics(text_shards, tokenizer):
    cfg = DataConfig.from_dict({"train": str(text_shards), "seq_len": 128, "num_workers": 0})
    loader = build_loader(cfg, objective="mlm", tokenizer=tokenizer, rank=0, world_size=1, micro_batch_size=16,
                          seed=0)
    it = iter(loader)
    batches = [next(it) for _ in range(12)]
    labels = np.concatenate([b["labels"].numpy().ravel() for b in batches])
    inputs = np.concatenate([b["input_ids"].numpy().ravel() for b in batches])
    real = np.concatenate([b["attention_mask"].numpy().ravel() for b in batches]) == 1
    target = labels != IGNORE
    special = np.isin(labels, sorted(tokenizer.special_ids))
    assert not special[target].any()  # EOS and other special tokens are never targets
    ordinary = real & ~np.isin(np.where(target, labels, inputs), sorted(tokenizer.special_ids))
    assert target.sum() / ordinary.sum() == pytest.approx(0.15, abs=0.01)
    masked = (inputs[target] == tokenizer.mask_id).mean()
    kept = (inputs[target] == labels[target]).mean()
    assert masked == pytest.approx(0.8, abs=0.025)
    assert kept == pytest.approx(0.1 + 0.1 / (tokenizer.vocab_size - len(tokenizer.special_ids)), abs=0.02)
    assert 1 - masked - kept == pytest.approx(0.1, abs=0.02)
    rng = [np.random.default_rng(1)]
    one = collate_mlm([np.arange(50, 250)], rng, pad_id=0, mask_id=4, special_ids=np.arange(10), vocab_size=700)
    again = collate_mlm([np.arange(50, 250)], [np.random.default_rng(1)], pad_id=0, mask_id=4,
                        special_ids=np.arange(10), vocab_size=700)
    assert all(bool((one[k] == again[k]).all()) for k in one)  # a pure function of the unit's seed


def restore(inputs, targets, sentinels, eos):
    """Undo span corruption: put each sentinel's span back in place."""
    spans, current = {}, None
    for t in targets[:-1]:
        if t in sentinels:
            current = t
            spans[t] = []
        else:
            spans[current].append(t)
    out = []
    for t in inputs[:-1]:
        out += spans[t] if t in sentinels else [t]
    return out


def test_span_corruption_is_invertible_and_dense_as_asked(tokenizer):
    sentinels = tokenizer.sentinel_ids
    noise = []
    for seed in range(200):
        rng = np.random.default_rng(seed)
        tokens = rng.integers(100, 600, rng.integers(2, 120))
        inputs, targets = corrupt_spans(tokens, rng, sentinel_ids=sentinels, eos_id=2, density=0.15, mean_span=3.0)
        assert restore(inputs.tolist(), targets.tolist(), set(sentinels), 2) == tokens.tolist()
        used = [t for t in inputs if t in sentinels]
        assert used == sentinels[: len(used)] and inputs[-1] == targets[-1] == 2
        noise.append((len(targets) - 1 - len(used)) / len(tokens))
    assert np.mean(noise) == pytest.approx(0.15, abs=0.03)


def test_span_batches_are_corrupted_full_rows_of_packed_documents(text_shards, tokenizer):
    """Span corruption reads ``seq_len``-token rows that tile the document stream (several documents
    a row, each closed by EOS): every batch carries micro-batch × seq_len tokens, as the peer's
    ``group_texts`` rows do, and undoing the corruption gives the row back exactly."""
    cfg = DataConfig.from_dict({"train": str(text_shards), "seq_len": 96, "num_workers": 0, "shuffle": False})
    loader = build_loader(cfg, objective="span", tokenizer=tokenizer, rank=0, world_size=1, micro_batch_size=4,
                          seed=0)
    batch = next(iter(loader))
    shards, sentinels, eos = loader.stream.shards, tokenizer.sentinel_ids, tokenizer.eos_id
    stream = np.concatenate([shards.read(i) for i in range(8)])
    documents = []
    for b in range(4):
        inputs = batch["input_ids"][b][batch["attention_mask"][b] == 1].tolist()
        targets = batch["labels"][b][batch["labels"][b] != IGNORE].tolist()
        assert restore(inputs, targets, set(sentinels), eos) == stream[96 * b : 96 * (b + 1)].tolist()
        used = [t for t in inputs if t in sentinels]
        assert used == sentinels[: len(used)] and len(used) >= 2  # numbered over the row, not per document
        documents.append(stream[96 * b : 96 * (b + 1)].tolist().count(eos))
    assert sum(documents) >= 4  # the rows do pack several documents
    assert (batch["decoder_input_ids"][:, 0] == tokenizer.pad_id).all()
    labels, dec = batch["labels"], batch["decoder_input_ids"]
    real = batch["decoder_attention_mask"][:, 1:] == 1
    assert (dec[:, 1:][real] == labels[:, :-1][real]).all()


def test_sft_batches_train_only_assistant_tokens(sft_shards, tokenizer):
    cfg = DataConfig.from_dict({"train": str(sft_shards), "seq_len": 256, "num_workers": 0, "shuffle": False})
    batch = next(iter(build_loader(cfg, objective="sft", tokenizer=tokenizer, rank=0, world_size=1,
                                   micro_batch_size=4, seed=0)))
    shards = build_loader(cfg, objective="sft", tokenizer=tokenizer, rank=0, world_size=1, micro_batch_size=4,
                          seed=0).stream.shards
    ids, mask = shards.read(0, 0), shards.read(0, 1)
    labels = batch["labels"][0].numpy()
    trained = labels[labels != IGNORE]
    np.testing.assert_array_equal(trained, ids[1:257][mask[1:257] == 1])
    assert tokenizer.decode(trained).endswith("<|end|>")
    packed = DataConfig.from_dict({"train": str(sft_shards), "seq_len": 256, "num_workers": 0, "packing": True})
    batch = next(iter(build_loader(packed, objective="sft", tokenizer=tokenizer, rank=0, world_size=1,
                                   micro_batch_size=2, seed=0)))
    assert {"document_ids", "position_ids"} <= set(batch) and batch["input_ids"].shape == (2, 256)
    b = collate_sft([(np.array([1, 5, 6, 7]), np.array([0, 0, 1, 1]))], pad_id=0, seq_len=8)
    assert b["input_ids"].tolist() == [[1, 5, 6]] and b["labels"].tolist() == [[IGNORE, 6, 7]]


def test_preference_batches(preference_shards, tokenizer):
    cfg = DataConfig.from_dict({"train": str(preference_shards), "seq_len": 128, "num_workers": 0})
    batch = next(iter(build_loader(cfg, objective="preference", tokenizer=tokenizer, rank=0, world_size=1,
                                   micro_batch_size=4, seed=0)))
    names = {f"{s}_{k}" for s in ("chosen", "rejected") for k in ("input_ids", "labels", "attention_mask")}
    assert set(batch) == names
    assert batch["chosen_input_ids"].shape == batch["rejected_input_ids"].shape
    b = collate_preference([(np.array([1, 8, 9]), np.array([5, 6]), np.array([7]))], pad_id=0, seq_len=10,
                           reference_logps=np.array([[-1.5, -2.5]], np.float32))
    assert b["chosen_input_ids"].tolist() == [[1, 8, 9, 5]] and b["chosen_labels"].tolist() == [[IGNORE, IGNORE, 5, 6]]
    assert b["rejected_input_ids"].tolist() == [[1, 8, 9, 0]]
    assert b["rejected_labels"].tolist() == [[IGNORE, IGNORE, 7, IGNORE]]
    assert b["ref_chosen_logps"].tolist() == [-1.5] and b["ref_rejected_logps"].tolist() == [-2.5]
    cut = collate_preference([(np.arange(10, 30), np.arange(40, 50), np.arange(50, 52))], pad_id=0, seq_len=15)
    assert cut["chosen_input_ids"][0].tolist()[:2] == [22, 23]  # the prompt loses its start, keeps its end


def test_reference_logps_beside_the_shards_reach_the_batch(preference_shards, tokenizer, tmp_path):
    import shutil

    from data.shards import REFERENCE_LOGPS, ShardManifest

    shutil.copytree(preference_shards, tmp_path / "p")
    n = ShardManifest.load(tmp_path / "p").num_samples
    values = np.stack([-np.arange(n), -np.arange(n) - 0.5], 1).astype(np.float32)
    np.save(tmp_path / "p" / REFERENCE_LOGPS, values)
    cfg = DataConfig.from_dict({"train": str(tmp_path / "p"), "seq_len": 512, "num_workers": 0, "shuffle": False})
    loader = build_loader(cfg, objective="preference", tokenizer=tokenizer, rank=0, world_size=1,
                          micro_batch_size=3, seed=0)
    batch = next(iter(loader))
    assert batch["ref_chosen_logps"].tolist() == [0.0, -1.0, -2.0]
    assert batch["ref_rejected_logps"].tolist() == [-0.5, -1.5, -2.5]


def test_wrong_kind_bad_config_and_eval_split(text_shards, sft_shards, tokenizer):
    cfg = DataConfig.from_dict({"train": str(sft_shards), "valid": str(text_shards), "seq_len": 64,
                                "num_workers": 0})
    with pytest.raises(UserError, match="holds sft shards; the clm objective needs text shards"):
        build_loader(cfg, objective="clm", tokenizer=tokenizer, rank=0, world_size=1, micro_batch_size=2, seed=0)
    valid = build_loader(cfg, objective="clm", tokenizer=tokenizer, rank=1, world_size=2, micro_batch_size=32,
                         seed=0, split="valid")
    batches = list(valid)
    assert len(batches) == len(valid) == len(list(valid))  # one pass, every time
    assert sum(b["input_ids"].shape[0] for b in batches) == valid.stream.plan(0).num_units // 2
    with pytest.raises(ConfigError, match=r"data\.seq_len: must be at least 2"):
        DataConfig.from_dict({"seq_len": 1}, "data")
    with pytest.raises(ConfigError, match=r"unknown config key .data\.sequence_length."):
        DataConfig.from_dict({"sequence_length": 1}, "data")
    mix = DataConfig.from_dict({"train": [{"path": "a", "weight": 2}, {"path": "b"}]}, "data")
    assert [(d.path, d.weight) for d in mix.datasets()] == [("a", 2.0), ("b", 1.0)]
    with pytest.raises(ConfigError, match=r"data\.train is not set"):
        DataConfig().datasets()


def test_mixture_follows_the_weights(text_shards, tmp_path, tokenizer):
    import shutil

    from data.epoch_plan import epoch_order
    from data.shard_set import ShardSet, Source

    shutil.copytree(text_shards, tmp_path / "b")
    shards = ShardSet([Source(str(text_shards), 3.0), Source(str(tmp_path / "b"), 1.0)])
    order = epoch_order(shards, 0, 0)
    from_b = (order >= shards.source_start[1]).mean()
    assert from_b == pytest.approx(0.25, abs=0.001) and len(order) == shards.num_samples
    first = order[:400]
    assert (first >= shards.source_start[1]).mean() == pytest.approx(0.25, abs=0.07)  # interleaved, not blocked
    cfg = DataConfig.from_dict({"train": [{"path": str(text_shards), "weight": 3}, {"path": str(tmp_path / "b")}],
                                "seq_len": 64, "num_workers": 0})
    loader = build_loader(cfg, objective="clm", tokenizer=tokenizer, rank=0, world_size=1, micro_batch_size=2, seed=0)
    assert next(iter(loader))["input_ids"].shape == (2, 64)
