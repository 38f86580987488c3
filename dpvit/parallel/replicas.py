"""Data parallelism inside one rank: model replicas driven by threads.

A rank with T cores of its own (a lone process, or one rank per host) splits its share of
every batch into T parts. Thread t runs forward and backward of part t on replica t, which
reads the rank's parameter buffer and keeps its own gradient buffer and layer caches; the
parts' gradients are then summed into the rank's gradient buffer, as the allreduce sums the
ranks'. numpy releases the GIL inside BLAS calls and ufunc loops, so the threads overlap on
the cores, each with one BLAS thread. This model's GEMMs (64 to 192 wide) are too small to
split well across BLAS threads, so threads running whole replicas use the cores better
(docs/performance.md has the comparison).

Each replica also cuts its part into micro-batches of at most ``MICRO_BATCH`` images and runs
them one after the other, adding their gradients up in its buffer (see ``MICRO_BATCH``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import numpy as np

from dpvit.vit import VisionTransformer

T = TypeVar("T")
R = TypeVar("R")

#: ``share_step(model, indices, x, y) -> (loss, correct)``: forward and backward of one part
#: of a batch on ``model``, accumulating into its gradients.
ShareStep = Callable[[VisionTransformer, np.ndarray, np.ndarray, np.ndarray],
                     tuple[float, float]]


#: Most images one replica runs through forward and backward at a time. A larger part is cut
#: into contiguous micro-batches whose gradients add up in the replica's buffer: the same sum
#: in another order, as with ranks and threads. 32 images make activations of 0.4 MB per
#: (tokens x D) tensor and 1.3 MB of attention scores, so more of each layer's output is still
#: in the caches when the next layer reads it, and peak memory is a fraction of a whole
#: part's (docs/performance.md, "Micro-batches"). The training recipes (64 images per global
#: batch) never reach it: it matters for larger batches.
MICRO_BATCH = 32


class Replicas:
    """``threads`` models over one parameter buffer, and the threads that run them.

    Args:
        model: the rank's model; it is replica 0 and runs on the calling thread.
        threads: how many replicas (and threads) share the work; 1 runs everything on the
            calling thread.
        micro_batch: most images per forward/backward on one replica; 0 runs each part whole.
    """

    def __init__(self, model: VisionTransformer, threads: int = 1,
                 micro_batch: int = MICRO_BATCH) -> None:
        if threads < 1:
            raise ValueError(f"threads must be at least 1, got {threads}")
        if micro_batch < 0:
            raise ValueError(f"micro_batch must be 0 (off) or positive, got {micro_batch}")
        self.micro_batch = micro_batch
        self.models = [model, *(model.replica() for _ in range(threads - 1))]
        self._pool = (ThreadPoolExecutor(threads - 1, thread_name_prefix="dpvit-replica")
                      if threads > 1 else None)

    @property
    def model(self) -> VisionTransformer:
        """Replica 0: the model whose parameters and gradients the rank owns."""
        return self.models[0]

    def _run(self, jobs: Sequence[Callable[[], R]]) -> list[R]:
        """Job i on thread i (job 0 on the calling thread); results in job order."""
        if self._pool is None or len(jobs) <= 1:
            return [job() for job in jobs]
        futures = [self._pool.submit(job) for job in jobs[1:]]
        first = jobs[0]()
        return [first, *(f.result() for f in futures)]

    def forward_backward(self, share_step: ShareStep, indices: np.ndarray, x: np.ndarray,
                         y: np.ndarray) -> tuple[float, float]:
        """Zero the gradients, run ``share_step`` on one part of the batch per replica, and
        leave the summed gradients in replica 0's buffer.

        Parts are contiguous and in order (the first ones one sample larger when the batch
        does not divide), and so are their micro-batches, so the result depends on the number
        of threads and the micro-batch size only through the order of floating-point sums, as
        with the number of ranks.

        Returns:
            The sums over all parts and micro-batches of ``share_step``'s loss and correct count.
        """
        parts = [p for p in np.array_split(np.arange(len(indices)), len(self.models)) if len(p)]
        for model in self.models:
            model.store.zero_grad()
        results = self._run([
            lambda m=model, p=part: [share_step(m, indices[c], x[c], y[c])
                                     for c in self._micro_batches(p)]
            for model, part in zip(self.models, parts, strict=False)
        ])
        grads = self.model.store.flat_grads
        for model in self.models[1 : len(parts)]:
            grads += model.store.flat_grads
        steps = [r for part_results in results for r in part_results]
        return sum(r[0] for r in steps), sum(r[1] for r in steps)

    def _micro_batches(self, part: np.ndarray) -> list[np.ndarray]:
        """``part`` cut into near-equal contiguous pieces of at most ``micro_batch``."""
        if not self.micro_batch:
            return [part]
        return np.array_split(part, -(-len(part) // self.micro_batch))

    def map_batches(self, fn: Callable[[VisionTransformer, np.ndarray], R], items: np.ndarray,
                    batch_size: int) -> list[R]:
        """``fn(model, batch)`` for the consecutive batches of ``batch_size`` items (the last
        one shorter), spread over the replicas as `map` does; in batch order."""
        batches = [items[start : start + batch_size] for start in range(0, len(items), batch_size)]
        return self.map(fn, batches)

    def map(self, fn: Callable[[VisionTransformer, T], R], items: Sequence[T]) -> list[R]:
        """``fn(model, item)`` for every item, item i on replica i mod threads; in item order."""
        n = len(self.models)
        lanes = self._run([
            lambda m=model, lane=items[t::n]: [fn(m, item) for item in lane]
            for t, model in enumerate(self.models[: len(items)])
        ])
        out: list[R] = [None] * len(items)  # type: ignore[list-item]
        for t, lane in enumerate(lanes):
            out[t::n] = lane
        return out
