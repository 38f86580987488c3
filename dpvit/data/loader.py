"""Turn index batches into model-ready (x, y) arrays, optionally one step ahead.

The whole uint8 split is held in memory (47 MB for MNIST train); each batch is gathered,
augmented (training only) and normalised to float32 on the fly, so no float copy of the
dataset ever exists. With ``prefetch=True`` a single background thread prepares batch
``k+1`` while the caller computes on batch ``k``; numpy releases the GIL in the gather,
warp and arithmetic, so the two overlap. See ``data/README.md`` for the measurement.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from dpvit.data.augment import Augmentation, normalize
from dpvit.data.augment import augment as augment_batch


class BatchIterator:
    """Iterate ``(x float32 (b, 1, H, W), y int64 (b,))`` over a list of index arrays.

    Args:
        images: uint8 (N, H, W) split held in memory.
        labels: int (N,) labels.
        batches: one array of dataset indices per step (e.g. from ``train_batches``).
        mean: dataset mean of pixels in [0, 1].
        std: dataset standard deviation of pixels in [0, 1].
        augment: the random perturbation of training images; None (evaluation) for none.
        seed: run seed (augmentation key).
        epoch: epoch number (augmentation key).
        prefetch: prepare the next batch in a background thread.

    Empty index arrays (a rank with no share of a tiny global batch) yield empty arrays.
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        batches: Sequence[np.ndarray],
        mean: float,
        std: float,
        *,
        augment: Augmentation | None = None,
        seed: int = 0,
        epoch: int = 0,
        prefetch: bool = True,
    ) -> None:
        self.images = images
        self.labels = labels
        self.batches = batches
        self.mean = mean
        self.std = std
        self.augment = augment
        self.seed = seed
        self.epoch = epoch
        self.prefetch = prefetch

    def __len__(self) -> int:
        return len(self.batches)

    def make_batch(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Build one (x, y) pair for the given dataset indices."""
        indices = np.asarray(indices, dtype=np.int64)
        pixels = self.images[indices]
        if self.augment is not None:
            pixels = augment_batch(pixels, indices, self.seed, self.epoch, self.augment)
        return normalize(pixels, self.mean, self.std), self.labels[indices].astype(np.int64)

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        if not self.prefetch or len(self.batches) < 2:
            for indices in self.batches:
                yield self.make_batch(indices)
            return
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="dpvit-prefetch") as pool:
            pending = pool.submit(self.make_batch, self.batches[0])
            for indices in self.batches[1:]:
                ready = pending.result()
                pending = pool.submit(self.make_batch, indices)
                yield ready
            yield pending.result()
