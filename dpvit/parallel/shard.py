"""The optimizer state sharded over the ranks (``--shard-optimizer``; ZeRO stage 1).

Without it every rank holds the whole optimizer state (AdamW's two moments: twice the
parameters) and takes the same update of the whole model. With it, rank r owns one contiguous
slice of the flat parameter buffer (`Shard`), holds the optimizer state of that slice only
(optimizer memory / N) and updates only that slice. A step (`ShardedStep`, run by
`dpvit.training.step.TrainStep`):

1. ``Reduce_scatter(SUM)`` of the flat gradient, in place: rank r receives the sum over
   ranks of its slice alone (the same bytes on the wire as the first half of a ring
   allreduce), into its slice of the gradient buffer.
2. One small allgather of every rank's row ``[extras..., squared norm of its summed slice]``
   in float64. Every rank adds the rows up in rank order 0, 1, ..., so the loss, the correct
   count, the stop votes and the global gradient norm are the same bytes on every rank and
   in every run, whatever order the MPI library reduces in; clipping and the non-finite
   check then decide alike everywhere.
3. The slice is clipped with that global norm and the optimizer updates the slice (the weight
   decay mask is the slice of the whole model's mask, so every element is decayed or not
   exactly as without sharding).
4. ``Allgatherv`` of the updated slices into ``flat_params``: every rank ends with the same
   parameter bytes, each slice computed once by its owner.

A refused (non-finite) step skips 3 and 4: the parameters were identical and stay so.

Checkpoints keep the unsharded layout: `gather_state` collects the whole state on rank 0
(``Gatherv``) before it writes, and `spread_state` gives every rank its slice of the state
rank 0 read (``Scatterv``), so a checkpoint of a sharded run is the file an unsharded run
writes, and either resumes the other, on any number of ranks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from dpvit.parallel.comm import Comm

if TYPE_CHECKING:
    from dpvit.nn.params import ParamStore
    from dpvit.optim import Optimizer


@dataclass(frozen=True)
class Shard:
    """Rank ``rank``'s contiguous slice of a flat buffer split over ``len(counts)`` ranks.

    ``counts[r]`` values belong to rank r, in rank order; they differ by at most one.
    """

    rank: int
    counts: tuple[int, ...]

    @classmethod
    def of(cls, numel: int, rank: int, size: int) -> Shard:
        """The balanced split of ``numel`` values: the first ``numel % size`` ranks take one
        more than the others."""
        base, extra = divmod(numel, size)
        return cls(rank, tuple(base + (r < extra) for r in range(size)))

    @property
    def start(self) -> int:
        return sum(self.counts[: self.rank])

    @property
    def stop(self) -> int:
        return self.start + self.counts[self.rank]

    @property
    def numel(self) -> int:
        """Values in the whole buffer."""
        return sum(self.counts)


class ShardedStep:
    """The collectives of a sharded step around the optimizer's update of this rank's slice.

    Args:
        comm: the job's communicator.
        store: the model's buffers; ``store.grad_buffer`` is the gradients, then ``extras``.
        shard: this rank's slice (the optimizer's ``shard``).
    """

    def __init__(self, comm: Comm, store: ParamStore, shard: Shard) -> None:
        if shard.numel != store.numel or len(shard.counts) != comm.size:
            raise ValueError(f"a shard of {shard.numel} values over {len(shard.counts)} ranks "
                             f"does not fit {store.numel} parameters over {comm.size} ranks")
        self.comm, self.store, self.shard = comm, store, shard

    def reduce(self) -> float:
        """Sum the gradients (this rank's slice of ``store.flat_grads`` then holds the sum
        over ranks; the rest of the buffer is left undefined, unused) and the extras (every
        rank gets the same sums); return the global gradient norm (before clipping), the
        same on every rank."""
        store, shard = self.store, self.shard
        self.comm.reduce_scatter_sum_(store.flat_grads, shard.counts)
        own64 = self.own_grads().astype(np.float64, copy=False)
        extras = store.grad_buffer[store.numel :]
        row = np.empty(len(extras) + 1, dtype=np.float64)
        row[:-1] = extras
        row[-1] = own64 @ own64
        rows = self.comm.allgather_array(row)
        total = rows[0].copy()
        for other in rows[1:]:  # rank order, on every rank: identical bytes everywhere
            total += other
        extras[:] = total[:-1]
        return math.sqrt(total[-1])  # NaN stays NaN: the step is then skipped on every rank

    def own_grads(self) -> np.ndarray:
        """This rank's slice of the summed gradient (a view: clip it in place)."""
        return self.store.flat_grads[self.shard.start : self.shard.stop]

    def gather_params(self) -> None:
        """Every rank's updated slice into every rank's ``flat_params``."""
        self.comm.allgatherv_(self.store.flat_params, self.shard.counts)


def gather_state(comm: Comm, optimizer: Optimizer) -> dict[str, np.ndarray] | None:
    """The whole optimizer state, laid out like the parameters, on rank 0 (collective when the
    optimizer is sharded; then None on the other ranks). Unsharded: the state itself, on
    every rank."""
    shard = optimizer.shard
    if shard is None:
        return dict(optimizer.state)
    gathered = {}
    for name, part in optimizer.state.items():
        full = np.empty(shard.numel, dtype=part.dtype) if comm.is_root else None
        comm.gatherv(part, full, shard.counts)
        gathered[name] = full
    return gathered if comm.is_root else None


def spread_state(comm: Comm, optimizer: Optimizer, full: dict[str, np.ndarray] | None) -> None:
    """Give every rank rank 0's optimizer state (collective).

    Unsharded, every rank receives rank 0's buffers (a broadcast; ``full`` is unused: rank 0
    has loaded it already). Sharded, ``full`` is rank 0's whole state as a checkpoint holds
    it (None: a fresh optimizer, whose zeros every rank has already) and every rank receives
    its slice.
    """
    shard = optimizer.shard
    if shard is None:
        for buf in optimizer.state.values():
            comm.broadcast_(buf)
        return
    if not comm.broadcast_object(full is not None if comm.is_root else None):
        return
    for name, part in optimizer.state.items():
        comm.scatterv(full[name] if comm.is_root else None, part, shard.counts)
