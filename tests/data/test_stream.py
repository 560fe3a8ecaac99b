"""The stream's promises: a pure-function order, equal shares per rank, exact resume on any world size."""

from collections import Counter

import numpy as np
import pytest

from data.config import DataConfig
from data.epoch_plan import EpochPlan, epoch_order
from data.loader import build_loader
from data.shard_set import ShardSet, Source
from data.stream import SampleStream, StreamState


@pytest.fixture(scope="module")
def shards(text_shards):
    return ShardSet([Source(str(text_shards))])


def units_seen(stream_args, world, workers, batches):
    """(epoch, unit) pairs each rank consumes, worker by worker, for ``batches`` batches per rank."""
    seen = []
    for rank in range(world):
        s = SampleStream(rank=rank, world_size=world, **stream_args)
        per_worker = [s.batches(StreamState(), w, workers) for w in range(workers)]
        for j in range(batches):
            pieces = next(per_worker[j % workers])
            seen += [(e, int(u)) for e, units in pieces for u in units]
    return seen


def test_order_is_a_pure_function_of_seed_and_epoch(shards):
    a, b = epoch_order(shards, 7, 0), epoch_order(shards, 7, 0)
    np.testing.assert_array_equal(a, b)
    assert sorted(a.tolist()) == list(range(shards.num_samples))
    assert not np.array_equal(a, epoch_order(shards, 7, 1))
    assert not np.array_equal(a, epoch_order(shards, 8, 0))
    np.testing.assert_array_equal(epoch_order(shards, 7, 0, shuffle=False), np.arange(shards.num_samples))


def test_two_ranks_two_workers_see_every_sample_once_per_epoch(shards):
    args = dict(shards=shards, mode="samples", seq_len=64, seed=1, batch_size=5)
    world = 2
    per_rank = shards.num_samples // world
    seen = units_seen(args, world, 2, batches=per_rank // 5)
    assert len(seen) == len(set(seen)) == world * (per_rank // 5) * 5 == shards.num_samples
    stream = SampleStream(rank=0, world_size=1, **args)
    samples = Counter(stream.plan(e).samples(np.array([u]))[0] for e, u in seen)
    assert set(samples) == set(range(shards.num_samples)) and set(samples.values()) == {1}


def test_epochs_roll_over_with_a_new_order(shards):
    args = dict(shards=shards, mode="samples", seq_len=64, seed=1, batch_size=7)
    seen = units_seen(args, 2, 1, batches=shards.num_samples // 7)  # a little more than one epoch per rank
    epochs = Counter(e for e, _ in seen)
    assert set(epochs) == {0, 1} and epochs[0] == shards.num_samples


def loader(path, world=1, rank=0, workers=0, batch=4, objective="clm", tokenizer=None, **cfg):
    config = DataConfig.from_dict({"train": str(path), "seq_len": 128, "num_workers": workers, **cfg})
    return build_loader(config, objective=objective, tokenizer=tokenizer, rank=rank, world_size=world,
                        micro_batch_size=batch, seed=5)


def rows(batches):
    return [tuple(r) for b in batches for r in b["input_ids"].tolist()]


def take(it, n):
    return [next(it) for _ in range(n)]


@pytest.mark.parametrize("objective", ["clm", "span"])
def test_packed_rows_split_over_ranks_and_workers_partition_the_epoch(text_shards, tokenizer, objective):
    """Also span corruption's rows: each row is corrupted by its epoch position's seed, whoever reads it."""
    single = loader(text_shards, batch=8, tokenizer=tokenizer, objective=objective)
    everything = rows(take(iter(single), len(single)))
    split = []
    for rank in range(2):
        part = loader(text_shards, world=2, rank=rank, workers=2, batch=4, tokenizer=tokenizer, objective=objective)
        split += rows(take(iter(part), len(part)))
    assert len(everything) > 500 and Counter(split) == Counter(everything)


@pytest.mark.parametrize("objective", ["clm", "span"])
def test_resume_equals_the_uninterrupted_stream(text_shards, tokenizer, objective):
    full = loader(text_shards, workers=2, batch=8, tokenizer=tokenizer, objective=objective)
    steps = len(full) + 37  # past an epoch boundary
    reference = take(iter(full), steps + 25)
    first = loader(text_shards, workers=2, batch=8, tokenizer=tokenizer, objective=objective)
    it = iter(first)
    take(it, steps)
    state = first.state_dict()
    assert state["epoch"] == 1
    resumed = loader(text_shards, workers=0, batch=8, tokenizer=tokenizer, objective=objective)
    resumed.load_state_dict(state)
    for a, b in zip(reference[steps:], take(iter(resumed), 25), strict=True):
        assert a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)
    again = iter(first)  # a new iterator on the same loader continues too
    assert bool((next(again)["input_ids"] == reference[steps]["input_ids"]).all())


@pytest.mark.parametrize(("before", "after"), [(2, 1), (1, 2)])
def test_resume_on_another_world_size_sees_the_rest_exactly_once(text_shards, tokenizer, before, after):
    single = loader(text_shards, batch=64, tokenizer=tokenizer)
    full = rows(take(iter(single), len(single) + 1))[: single.stream.plan(0).num_units]  # the epoch's rows in order
    steps = 23
    seen_before, states = [], []
    for rank in range(before):
        ld = loader(text_shards, world=before, rank=rank, batch=4, workers=2 if rank == 0 else 0, tokenizer=tokenizer)
        seen_before += rows(take(iter(ld), steps))
        states.append(ld.state_dict())
    consumed = states[0]["consumed"]
    assert all(s == states[0] for s in states) and consumed == steps * 4 * before
    share = (len(full) - consumed) // after  # each new rank's rest of the epoch
    seen_after = []
    for rank in range(after):
        ld = loader(text_shards, world=after, rank=rank, batch=1, tokenizer=tokenizer)
        ld.load_state_dict(states)
        seen_after += rows(take(iter(ld), share))
    assert Counter(seen_before + seen_after) == Counter(full[: consumed + after * share])
    assert len(full) - consumed - after * share < after  # only the epoch's last (rest % after) rows are dropped


def test_a_micro_batch_draws_its_rows_from_the_whole_epoch(text_shards, tokenizer):
    """The second level of the shuffle: without it a batch is B neighbouring rows (one or two
    documents); with it the rows of a batch are spread over the epoch like a random draw."""
    ld = loader(text_shards, batch=8, tokenizer=tokenizer)
    plan = ld.stream.plan(0)
    batches = [units for pieces in take(ld.stream.batches(StreamState()), 20) for _, units in pieces]
    spread = np.mean([np.ptp(plan.unit(u)) for u in batches])
    expected = plan.num_units * 7 / 9  # E[max - min] of 8 uniform draws without replacement
    assert 0.6 * expected < spread < 1.3 * expected
    assert np.mean([np.ptp(u) for u in batches]) == 7  # positions are still consecutive: the split is unchanged
    in_order = EpochPlan(plan.shards, plan.order, "rows", plan.seq_len)  # position p is unit p
    (shuffled,), starts = plan.rows(np.arange(8), (0,))
    (direct,), direct_starts = in_order.rows(plan.unit(np.arange(8)), (0,))
    np.testing.assert_array_equal(shuffled, direct)
    np.testing.assert_array_equal(starts, direct_starts)


def test_the_unit_order_depends_on_seed_and_epoch_only(shards):
    def order(seed, epoch, rank=0, world=1, shuffle=True):
        stream = SampleStream(shards=shards, mode="samples", seq_len=64, seed=seed, rank=rank, world_size=world,
                              batch_size=4, shuffle=shuffle)
        plan = stream.plan(epoch)
        return plan.unit(np.arange(plan.num_units))

    units = order(3, 0)
    assert sorted(units.tolist()) == list(range(len(units)))
    np.testing.assert_array_equal(units, order(3, 0, rank=1, world=2))
    assert not np.array_equal(units, order(3, 1))
    assert not np.array_equal(units, order(4, 0))
    np.testing.assert_array_equal(order(3, 0, shuffle=False), np.arange(len(units)))  # evaluation reads in order
