"""The epoch plan computed a span at a time: equal to the plan materialised whole, small epochs bitwise
as before, large ones (here: a span of a few dozen samples) in blocks that still cover every unit once."""

import itertools
import json
import shutil
from collections import Counter

import numpy as np
import pytest

import data.epoch_plan
import data.stream
from data.config import DataConfig
from data.epoch_plan import EpochOrder, EpochPlan, UnitOrder, epoch_order
from data.loader import build_loader
from data.shard_set import ShardSet, Source
from data.shards import ShardError
from data.stream import SampleStream, StreamState

SEQ = 64


@pytest.fixture(scope="module")
def shards(text_shards):
    return ShardSet([Source(str(text_shards))])


def reference_order(shards, seed, epoch, buffer):
    """One source's epoch order built whole, as before: its shards permuted, then one lexsort of all
    its samples by (window, key), the keys drawn in order after the permutation."""
    rng = np.random.default_rng([seed, epoch, 0, 0x5EED])
    good = shards.source_shards[0]
    ids = np.concatenate([np.arange(good[i][0], good[i][0] + good[i][1]) for i in rng.permutation(len(good))])
    keys = rng.random(len(ids))
    return ids[np.lexsort((keys, np.arange(len(ids)) // buffer))]


def reference_units(shards, order, mode):
    """Every unit of the epoch in unit order, materialised: (tokens, starts) of each row, each chunk's
    tokens, or each sample's id."""
    if mode == "samples":
        return list(order)
    docs = [shards.read(int(i)) for i in order]
    if mode == "chunks":
        return [d[at : at + SEQ] for d in docs for at in range(0, max(1, len(d)), SEQ)]
    stream = np.concatenate(docs)
    begins = np.zeros(len(stream) + 1, bool)
    begins[np.cumsum([0] + [len(d) for d in docs])] = True
    return [(stream[g * SEQ : g * SEQ + SEQ + 1], begins[g * SEQ : g * SEQ + SEQ + 1])
            for g in range((len(stream) - 1) // SEQ)]


def read_all(plan):
    positions = np.arange(plan.num_units)
    if plan.mode == "samples":
        return list(plan.samples(positions[::-1])[::-1])
    if plan.mode == "chunks":
        return plan.chunks(positions[::-1])[::-1]
    (tokens,), starts = plan.rows(positions[::-1], (0,))  # backwards: the spans are evicted and computed again
    return list(zip(tokens[::-1], starts[::-1]))


def same(a, b):
    if isinstance(a, tuple):
        return all(np.array_equal(x, y) for x, y in zip(a, b))
    return np.array_equal(a, b)


@pytest.mark.parametrize(("buffer", "span"), [(16, 32), (64, 100), (7, 10), (4096, None)])
def test_the_order_computed_a_span_at_a_time_is_the_order_built_whole(shards, buffer, span):
    order = EpochOrder(shards, 4, 2, buffer=buffer)
    plan = EpochPlan(shards, order, "samples", SEQ, span=span)  # no unit seed: position p is sample p
    expected = reference_order(shards, 4, 2, buffer)
    np.testing.assert_array_equal(plan.samples(np.arange(plan.num_units)), expected)
    np.testing.assert_array_equal(epoch_order(shards, 4, 2, buffer=buffer), expected)


@pytest.mark.parametrize("mode", ["samples", "rows", "chunks"])
def test_a_small_epoch_is_planned_bitwise_as_before(shards, mode):
    """Up to a span of samples (2**18) one block: the unit permutation of before, same contents."""
    plan = EpochPlan(shards, EpochOrder(shards, 1, 0, buffer=64), mode, SEQ, unit_seed=(1, 0, 0x0F17))
    units = plan.unit(np.arange(plan.num_units))
    np.testing.assert_array_equal(units, np.random.default_rng((1, 0, 0x0F17)).permutation(plan.num_units))
    expected = reference_units(shards, reference_order(shards, 1, 0, 64), mode)
    assert len(expected) == plan.num_units and all(same(got, expected[u]) for got, u in zip(read_all(plan), units))


@pytest.mark.parametrize("mode", ["samples", "rows", "chunks"])
def test_a_large_epoch_in_blocks_reads_every_unit_once(shards, mode):
    """A span of 32 samples: 32 spans (more than are kept), units in ~32 blocks of about 32 samples'
    worth, groups of 8 interleaved; every unit exactly once, with the contents of the plan built whole."""
    plan = EpochPlan(shards, EpochOrder(shards, 1, 0, buffer=16), mode, SEQ, unit_seed=(1, 0, 0x0F17), span=32)
    units = plan.unit(np.arange(plan.num_units))
    assert plan.unit.num_blocks > 2 * data.epoch_plan.BLOCKS_IN_FLIGHT
    assert sorted(units.tolist()) == list(range(plan.num_units))
    assert not np.array_equal(units, np.random.default_rng((1, 0, 0x0F17)).permutation(plan.num_units))
    expected = reference_units(shards, reference_order(shards, 1, 0, 16), mode)
    assert len(expected) == plan.num_units and all(same(got, expected[u]) for got, u in zip(read_all(plan), units))
    again = EpochPlan(shards, EpochOrder(shards, 1, 0, buffer=16), mode, SEQ, unit_seed=(1, 0, 0x0F17), span=32)
    np.testing.assert_array_equal([int(again.unit(p)) for p in range(plan.num_units)[::-1]], units[::-1])


@pytest.mark.parametrize(("units", "block"), [(10_000, 100), (10_037, 100), (1_001, 100), (450, 100), (3, 2)])
def test_interleaved_blocks_are_a_permutation_and_a_batch_spans_blocks(units, block):
    """Also with a short last block (anywhere in its group) and fewer blocks than a group."""
    order = UnitOrder(units, (5, 1, 7), block)
    got = order(np.arange(units))
    assert sorted(got.tolist()) == list(range(units))
    np.testing.assert_array_equal(got, UnitOrder(units, (5, 1, 7), block)(np.arange(units)))
    assert not np.array_equal(got, UnitOrder(units, (5, 2, 7), block)(np.arange(units)))
    if units >= 1000:  # groups of 8 or (1,001: 11 blocks) of 6 and 5 blocks
        blocks_of = got // block
        consecutive = [len(set(blocks_of[at : at + 8])) for at in range(0, units - 8, 8)]
        assert np.mean(consecutive) > (7 if units > 5000 else 4.5)  # as many blocks as in the group
        for world in (2, 8):  # a rank's batch (every world-th position) draws from several blocks too
            rank = [len(set(blocks_of[at : at + 8 * world : world])) for at in range(0, units - 8 * world, 8 * world)]
            assert np.mean(rank) > (4 if units > 5000 else 3.5)


def test_the_plan_never_holds_a_table_of_the_epoch(shards):
    plan = EpochPlan(shards, EpochOrder(shards, 1, 0, buffer=16), "rows", SEQ, unit_seed=(1, 0, 3), span=32)
    plan.rows(np.arange(plan.num_units), (0,))
    assert len(plan._spans) <= 3 * data.epoch_plan.BLOCKS_IN_FLIGHT < plan.num_spans
    held = sum(a.size for s in plan._spans.values() for a in s) + sum(g.size for g in plan.unit._groups.values())
    assert held < 3 * 32 * 3 * data.epoch_plan.BLOCKS_IN_FLIGHT + 2 * plan.unit.block * data.epoch_plan.BLOCKS_IN_FLIGHT


@pytest.fixture
def small_spans(monkeypatch):
    monkeypatch.setattr(data.stream, "SPAN_SAMPLES", 32)


def loader(path, tokenizer, world=1, rank=0, workers=0, batch=4):
    config = DataConfig.from_dict({"train": str(path), "seq_len": SEQ, "num_workers": workers, "shuffle_buffer": 16})
    return build_loader(config, objective="clm", tokenizer=tokenizer, rank=rank, world_size=world,
                        micro_batch_size=batch, seed=5)


def rows(batches):
    return [tuple(r) for b in batches for r in b["input_ids"].tolist()]


def take(it, n):
    return [next(it) for _ in range(n)]


def resumes_exactly(make, ranks):
    """A blocked epoch of ``make(world, rank, workers, batch)``'s loader: a state after 30 batches resumes
    the same rows (with workers or without), and the rest of the epoch on ``ranks`` ranks reads each
    remaining row once (the last few, fewer than ``ranks``, dropped)."""
    single = make(batch=8)
    plan = single.stream.plan(0)
    assert plan.unit.num_blocks > data.epoch_plan.BLOCKS_IN_FLIGHT
    reference = rows(take(iter(single), len(single) + 10))  # past the epoch's end
    first = make(workers=2, batch=8)
    it = iter(first)
    assert rows(take(it, 30)) == reference[: 30 * 8]
    resumed = make(batch=8)
    resumed.load_state_dict(first.state_dict())
    assert rows(take(iter(resumed), len(single) - 20)) == reference[30 * 8 :][: (len(single) - 20) * 8]
    parts = []  # the rest of the epoch on ``ranks`` ranks: each remaining row once
    for rank in range(ranks):
        ld = make(world=ranks, rank=rank, batch=1)
        ld.load_state_dict(first.state_dict())
        parts += rows(take(iter(ld), (plan.num_units - 30 * 8) // ranks))
    epoch = reference[: plan.num_units]
    assert Counter(parts) <= Counter(epoch[30 * 8 :]) and len(parts) >= len(epoch) - 30 * 8 - (ranks - 1)


def test_a_blocked_epoch_resumes_exactly_also_on_another_world_size(text_shards, tokenizer, small_spans):
    resumes_exactly(lambda **kw: loader(text_shards, tokenizer, **kw), ranks=2)


def test_a_manifest_token_count_that_disagrees_with_the_index_is_one_line(text_shards, tmp_path):
    root = shutil.copytree(text_shards, tmp_path / "c")
    raw = json.loads((root / "manifest.json").read_text())
    raw["shards"][0]["tokens"] += 1
    raw["num_tokens"] += 1
    (root / "manifest.json").write_text(json.dumps(raw))
    shards = ShardSet([Source(str(root))])
    stream = SampleStream(shards, mode="rows", seq_len=SEQ, seed=0, rank=0, world_size=1, batch_size=8,
                          shuffle_buffer=16, span=32)
    with pytest.raises(ShardError, match=r"00000\.tar: its index counts \d+ tokens, the manifest \d+") as exc:
        for pieces in itertools.islice(stream.batches(StreamState()), 1000):  # more than an epoch
            for epoch, positions in pieces:
                stream.plan(epoch).rows(positions, (0,))
    assert "\n" not in str(exc.value)


@pytest.fixture(scope="module")
def mixture(text_shards, tmp_path_factory):
    """The TinyStories shards twice, weighted 2 : 1 (2,000 samples: 1,333 draws of the first source,
    upsampled, 667 of the second)."""
    copy = shutil.copytree(text_shards, tmp_path_factory.mktemp("mix") / "copy")
    return ShardSet([Source(str(text_shards), 2.0), Source(str(copy), 1.0)])


def source_order(shards, si, seed, epoch, buffer):
    """One source's order, as :func:`reference_order` builds it."""
    rng = np.random.default_rng([seed, epoch, si, 0x5EED])
    good = shards.source_shards[si]
    ids = np.concatenate([np.arange(good[i][0], good[i][0] + good[i][1]) for i in rng.permutation(len(good))])
    keys = rng.random(len(ids))
    return ids[np.lexsort((keys, np.arange(len(ids)) // buffer))]


def reference_mixture(shards, seed, epoch, buffer):
    """The mixture order materialised whole, as before blocks: one permutation of all source labels,
    source ``s``'s draws ``np.resize`` of its order."""
    per_source = [source_order(shards, si, seed, epoch, buffer) for si in range(len(shards.sources))]
    total, weights = sum(map(len, per_source)), [s.weight for s in shards.sources]
    takes = [round(total * w / sum(weights)) for w in weights]
    labels = np.random.default_rng([seed, epoch, 0x313C]).permutation(np.repeat(np.arange(len(takes)), takes))
    out = np.empty(len(labels), np.int64)
    for si, (ids, take) in enumerate(zip(per_source, takes)):
        out[labels == si] = np.resize(ids, take)
    return out, per_source, takes


def test_a_mixture_of_one_block_is_ordered_bitwise_as_before(mixture):
    expected, _, _ = reference_mixture(mixture, 3, 1, 64)
    order = EpochOrder(mixture, 3, 1, buffer=64)
    assert order.num_windows == 1
    np.testing.assert_array_equal(order.ids(0, 1)[0], expected)
    np.testing.assert_array_equal(epoch_order(mixture, 3, 1, buffer=64), expected)


@pytest.mark.parametrize(("buffer", "block"), [(64, 128), (16, 50), (7, 1999)])
def test_a_blocked_mixture_draws_each_source_in_its_order_and_counts(mixture, buffer, block):
    """Every source's draws, in the epoch's order, are its own order cycled (``np.resize``) to its
    takes, as before; each block's counts are the prefix counts' differences, within a sample or two
    of the weights."""
    expected, per_source, takes = reference_mixture(mixture, 3, 1, buffer)
    order = EpochOrder(mixture, 3, 1, buffer=buffer, block=block)
    assert order.num_windows == -(-sum(takes) // block) > 1 and order.takes == takes
    got = order.ids(0, order.num_windows)[0]
    assert len(got) == len(expected) and not np.array_equal(got, expected)
    source = np.searchsorted(mixture.source_start, got, "right") - 1
    for si, ids in enumerate(per_source):
        np.testing.assert_array_equal(got[source == si], np.resize(ids, takes[si]))
    for b in range(order.num_windows + 1):
        position = min(b * block, len(got))
        counts = np.bincount(source[:position], minlength=len(takes))
        np.testing.assert_array_equal(counts, data.epoch_plan.mixture_prefix(takes, position))
        assert np.all(np.abs(counts - np.array(takes) * position / len(got)) < len(takes))
    parts = [order.ids(b, b + 1)[0] for b in range(order.num_windows)[::-1]]  # a block alone, in any order
    np.testing.assert_array_equal(np.concatenate(parts[::-1]), got)
    ids, lengths = order.ids(1, 3, field=0)
    np.testing.assert_array_equal(lengths, mixture.length(0)[ids])


@pytest.mark.parametrize("takes", [[5, 3, 2], [1, 10**9, 3], [0, 7, 0, 2], [1_000_000_007, 3, 999_999_937]])
def test_mixture_prefix_counts_grow_add_up_and_end_at_the_takes(takes):
    """Also for a source with far fewer draws than blocks, where differences of rounded cumulative
    targets per source could go negative."""
    total = sum(takes)
    positions = sorted({0, total, *np.random.default_rng(0).integers(0, total + 1, 300).tolist(),
                        *range(0, min(total, 50) + 1)})
    counts = np.array([data.epoch_plan.mixture_prefix(takes, p) for p in positions])
    assert counts.sum(1).tolist() == positions and counts[-1].tolist() == takes
    assert (np.diff(counts, axis=0) >= 0).all()
    assert np.all(np.abs(counts - np.outer(positions, takes) / total) < len(takes))


@pytest.mark.parametrize("mode", ["samples", "rows", "chunks"])
def test_a_blocked_mixture_plan_reads_every_unit_once(mixture, mode):
    """Spans of 32 samples (63 blocks of the mixture): the units, their count and contents are the
    ones of the blocked order materialised whole."""
    order = EpochOrder(mixture, 1, 0, buffer=16, block=32)
    plan = EpochPlan(mixture, order, mode, SEQ, unit_seed=(1, 0, 0x0F17), span=32)
    assert plan.num_spans == order.num_windows == 63
    units = plan.unit(np.arange(plan.num_units))
    assert sorted(units.tolist()) == list(range(plan.num_units))
    expected = reference_units(mixture, order.ids(0, order.num_windows)[0], mode)
    assert len(expected) == plan.num_units and all(same(got, expected[u]) for got, u in zip(read_all(plan), units))


def mixture_loader(paths, tokenizer, world=1, rank=0, workers=0, batch=4):
    train = [{"path": str(path), "weight": weight} for path, weight in zip(paths, (2.0, 1.0))]
    config = DataConfig.from_dict({"train": train, "seq_len": SEQ, "num_workers": workers, "shuffle_buffer": 16})
    return build_loader(config, objective="clm", tokenizer=tokenizer, rank=rank, world_size=world,
                        micro_batch_size=batch, seed=5)


def test_a_blocked_mixture_resumes_exactly_also_on_another_world_size(mixture, tokenizer, small_spans):
    paths = [s.path for s in mixture.sources]
    assert mixture_loader(paths, tokenizer).stream.plan(0).num_spans > 1
    resumes_exactly(lambda **kw: mixture_loader(paths, tokenizer, **kw), ranks=3)


def test_a_state_from_before_order_versions_resuming_a_blocked_epoch_says_so_once(
    mixture, tokenizer, small_spans, caplog, monkeypatch
):
    """Order version 1 ordered every epoch as one permutation: resuming its state into an epoch now in
    blocks is logged in one line with the units affected; a current state, or an epoch of one block, not."""
    paths = [s.path for s in mixture.sources]
    first = mixture_loader(paths, tokenizer, batch=8)
    take(iter(first), 30)
    state = first.state_dict()
    assert state["order"] == data.epoch_plan.ORDER_VERSION
    old = {k: v for k, v in state.items() if k != "order"}
    resumed = mixture_loader(paths, tokenizer, batch=8)
    with caplog.at_level("WARNING", logger="tessera.data"):
        resumed.load_state_dict(state)
        assert not caplog.records
        resumed.load_state_dict(old)
    total = resumed.stream.plan(0).num_units
    (record,) = caplog.records
    assert "order version 1" in record.message and "\n" not in record.message
    assert f"remaining {total - 240} units" in record.message and "of the 240 already read" in record.message
    assert rows(take(iter(resumed), 3)) == rows(take(iter(first), 3))  # resumed all the same
    caplog.clear()
    monkeypatch.setattr(data.stream, "SPAN_SAMPLES", 1 << 18)
    whole = mixture_loader(paths, tokenizer, batch=8)
    assert not whole.stream.plan(0).blocked
    with caplog.at_level("WARNING", logger="tessera.data"):
        whole.load_state_dict(old)
    assert not caplog.records
