"""Sampler: same permutation on every rank, exact shares, exact evaluation partition."""

from __future__ import annotations

import numpy as np
import pytest

from dpvit.data import eval_shard, train_batches
from dpvit.data.sampler import epoch_permutation


def check_epoch(n: int, g: int, w: int, seed: int, epoch: int) -> None:
    per_rank = [train_batches(n, g, seed, epoch, r, w) for r in range(w)]
    steps = n // g
    assert all(len(b) == steps for b in per_rank)  # identical step counts on all ranks
    perm = epoch_permutation(n, seed, epoch)
    for s in range(steps):
        parts = [per_rank[r][s] for r in range(w)]
        assert [len(p) for p in parts] == [(r + 1) * g // w - r * g // w for r in range(w)]
        np.testing.assert_array_equal(np.concatenate(parts), perm[s * g:(s + 1) * g])
    union = np.concatenate([b for batches in per_rank for b in batches] or [np.zeros(0)])
    assert len(np.unique(union)) == len(union) == steps * g  # no duplicates
    # The dropped remainder is exactly the permutation's tail of n % g samples.
    assert set(range(n)) - set(union.tolist()) == set(perm[steps * g:].tolist())


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize(("n", "g"), [(103, 10), (100, 25), (60, 7), (11, 3), (5, 5)])
def test_union_is_permutation_minus_remainder(world_size, n, g):
    check_epoch(n, g, world_size, seed=7, epoch=2)


def test_sampler_random_configurations():
    rng = np.random.default_rng(2024)
    for _ in range(100):
        n = int(rng.integers(1, 300))
        g = int(rng.integers(1, min(n, 64) + 1))
        w = int(rng.integers(1, 9))
        check_epoch(n, g, w, seed=int(rng.integers(2**31)), epoch=int(rng.integers(100)))


def test_small_global_batch_gives_empty_shares():
    shares = [train_batches(10, 2, 0, 0, r, 4)[0] for r in range(4)]
    assert [len(s) for s in shares] == [0, 1, 0, 1]


def test_permutations_differ_between_epochs_and_seeds():
    a = np.concatenate(train_batches(1000, 100, 0, 0, 0, 1))
    b = np.concatenate(train_batches(1000, 100, 0, 1, 0, 1))
    c = np.concatenate(train_batches(1000, 100, 1, 0, 0, 1))
    assert not np.array_equal(a, b) and not np.array_equal(a, c)
    np.testing.assert_array_equal(a, np.concatenate(train_batches(1000, 100, 0, 0, 0, 1)))


@pytest.mark.parametrize("n", [0, 1, 7, 10000, 10001])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 5])
def test_eval_shards_partition_exactly(n, world_size):
    shards = [eval_shard(n, r, world_size) for r in range(world_size)]
    np.testing.assert_array_equal(np.concatenate(shards), np.arange(n))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_bad_arguments():
    with pytest.raises(ValueError, match="global batch"):
        train_batches(10, 11, 0, 0, 0, 1)
    with pytest.raises(ValueError, match="rank"):
        train_batches(10, 2, 0, 0, 2, 2)
    with pytest.raises(ValueError, match="rank"):
        eval_shard(10, 0, 0)
