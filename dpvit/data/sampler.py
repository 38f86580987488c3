"""Which samples each rank sees: DistributedSampler semantics without communication.

Every rank draws the same permutation from ``np.random.default_rng([seed, epoch])`` and cuts
the same global batches from it; rank ``r`` of ``W`` takes positions
``[r*G//W, (r+1)*G//W)`` of each global batch of size ``G``. The union over ranks of one step
is therefore exactly the global batch a single process would use, which is what makes N-rank
training equal 1-rank training with the same global batch.

Training drops the last partial global batch (``num_samples % global_batch`` samples per
epoch, a different random subset every epoch), so every step has the full global batch and
every rank runs the same number of steps. Evaluation instead partitions the data exactly:
every sample is scored once, with no padding duplicates.
"""

from __future__ import annotations

import numpy as np


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"expected 0 <= rank < world_size, got rank={rank}, "
                         f"world_size={world_size}")


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """The permutation of ``range(num_samples)`` used for ``epoch`` (same on every rank)."""
    return np.random.default_rng([seed, epoch]).permutation(num_samples)


def train_batches(
    num_samples: int, global_batch: int, seed: int, epoch: int, rank: int, world_size: int
) -> list[np.ndarray]:
    """This rank's sample indices for every training step of one epoch.

    Args:
        num_samples: size of the training set.
        global_batch: samples per step summed over all ranks.
        seed: run seed.
        epoch: epoch number (changes the permutation).
        rank: this rank, ``0 <= rank < world_size``.
        world_size: number of ranks.

    Returns:
        ``num_samples // global_batch`` int64 arrays (the same count on every rank); entry
        ``s`` holds this rank's contiguous share of global batch ``s``. Shares differ by at
        most one sample; a rank's share is empty when ``global_batch < world_size``.

    Raises:
        ValueError: bad rank/world size, or a global batch outside ``1..num_samples``.
    """
    _check_rank(rank, world_size)
    if not 1 <= global_batch <= num_samples:
        raise ValueError(f"expected a global batch in 1..{num_samples} (the training set "
                         f"size), got {global_batch}")
    perm = epoch_permutation(num_samples, seed, epoch)
    steps = num_samples // global_batch
    lo = rank * global_batch // world_size
    hi = (rank + 1) * global_batch // world_size
    batches = perm[: steps * global_batch].reshape(steps, global_batch)[:, lo:hi]
    return list(batches.astype(np.int64))


def eval_shard(num_samples: int, rank: int, world_size: int) -> np.ndarray:
    """Contiguous, exact partition of ``range(num_samples)``: every sample on one rank once."""
    _check_rank(rank, world_size)
    return np.arange(rank * num_samples // world_size, (rank + 1) * num_samples // world_size,
                     dtype=np.int64)
