"""Seeded permutations without a table, and the epoch order built on them."""

import numpy as np
import pytest

from data.permutation import Permutation, permute, subkeys
from data.stream import EpochOrder, SampleStream, ShardSet, Source


@pytest.mark.parametrize("n", [1, 2, 3, 5, 16, 17, 1000, 4097, 65_537])
def test_a_permutation_is_a_bijection_of_0_to_n(n):
    image = permute(np.arange(n), n, 12345)
    assert sorted(image.tolist()) == list(range(n))


def test_a_permutation_is_a_pure_function_of_its_key_and_looks_random():
    n = 100_000
    a = permute(np.arange(n), n, 1)
    np.testing.assert_array_equal(a, permute(np.arange(n), n, 1))
    assert (a != permute(np.arange(n), n, 2)).mean() > 0.99
    assert abs(np.corrcoef(np.arange(n), a)[0, 1]) < 0.02
    assert (a == np.arange(n)).sum() < 10  # about one fixed point expected
    np.testing.assert_array_equal(permute(a[::-1][:5], n, 1), permute(a[::-1][:5].copy(), n, 1))


def test_one_permutation_per_element_of_n_and_key():
    n = np.array([7] * 7 + [3] * 3)
    keys = subkeys(9, np.array([0] * 7 + [1] * 3))
    x = np.array(list(range(7)) + list(range(3)))
    image = permute(x, n, keys)
    np.testing.assert_array_equal(image[:7], permute(np.arange(7), 7, keys[0]))
    np.testing.assert_array_equal(image[7:], permute(np.arange(3), 3, keys[7]))


def test_a_value_outside_the_domain_is_refused():
    with pytest.raises(ValueError, match="not below n"):
        permute(np.array([3, 9]), 9, 1)


def test_the_sequence_view():
    p = Permutation(50, 4)
    table = np.asarray(p)
    assert len(p) == 50 and sorted(table.tolist()) == list(range(50)) and p.tolist() == table.tolist()
    assert p[3] == table[3] and isinstance(p[3], int)
    np.testing.assert_array_equal(p[10:20], table[10:20])
    np.testing.assert_array_equal(p[np.array([[1, 2], [3, 4]])], table[[[1, 2], [3, 4]]])


@pytest.fixture(scope="module")
def shards(text_shards):
    return ShardSet([Source(str(text_shards))], verify_checksums=False)


def test_the_epoch_order_permutes_inside_windows_of_the_shard_order(shards):
    order = EpochOrder(shards, 3, 0, buffer=64)
    table = np.asarray(order)
    firsts, starts, _ = order.sources[0]
    concatenated = np.concatenate([np.arange(f, f + n) for f, n in zip(firsts, np.diff(starts))])
    for at in range(0, len(table), 64):
        assert sorted(table[at : at + 64].tolist()) == sorted(concatenated[at : at + 64].tolist())
    assert not np.array_equal(table, concatenated)
    positions = np.array([999, 0, 500, 64, 63])
    np.testing.assert_array_equal(order[positions], table[positions])
    assert order[17] == table[17]


def test_a_samples_plan_holds_no_table_per_sample(shards):
    stream = SampleStream(shards, mode="samples", seq_len=64, seed=1, rank=0, world_size=2, batch_size=4)
    plan = stream.plan(0)
    held = [v for obj in (plan, plan.order, *plan.order.sources) for v in (vars(obj).values()
            if hasattr(obj, "__dict__") else obj) if isinstance(v, np.ndarray)]
    assert held and max(a.size for a in held) <= len(shards.shard_start)
    assert sorted(plan.sample(u) for u in range(plan.num_units)) == list(range(shards.num_samples))


def test_a_chunks_plan_cuts_every_sample_once(shards):
    stream = SampleStream(shards, mode="chunks", seq_len=50, seed=2, rank=0, world_size=1, batch_size=4)
    plan = stream.plan(0)
    got = sorted(tuple(plan.chunk(u).tolist()) for u in range(plan.num_units))
    expected = []
    for sample in range(shards.num_samples):
        tokens = shards.read(sample).tolist()
        expected += [tuple(tokens[at : at + 50]) for at in range(0, max(1, len(tokens)), 50)]
    assert got == sorted(expected)
