"""`MPIComm`: the `Comm` of a job started by an MPI launcher; the only module that imports
mpi4py (inside `MPIComm`, so importing this module does not load MPI).

The gradient is reduced with one blocking `Allreduce` per step: on one host it is a small
fraction of the step (docs/performance.md). With more ranks than cores on a host, a rank that
has finished its share waits asleep in `Iallreduce` instead, so that its core goes to a rank
still computing. Every collective is bounded by the collective deadline
(`dpvit.parallel.deadline`).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import time
from collections.abc import Iterator
from typing import Any, NoReturn, TypeVar

import numpy as np

from dpvit.parallel.comm import Comm, _check_contiguous, _check_root, flush_stdio
from dpvit.parallel.deadline import DEFAULT_TIMEOUT_S, CollectiveDeadline
from dpvit.parallel.threads import affinity, computes_steps

T = TypeVar("T")

#: Seconds to wait between flushing stderr and MPI_Abort: without it, when several ranks fail at
#: once, Hydra sometimes tears the job down before forwarding the error lines (seen 2 in 30).
ABORT_GRACE_S = 0.2
#: How long `sleeping_barrier` sleeps between polls: short next to the seconds it waits for,
#: long enough that the sleeping ranks cost their cores nothing.
SLEEPING_POLL_S = 1e-3
#: How long a rank on a host with more ranks than cores sleeps between polls of the gradient
#: allreduce: a fraction of the tens of milliseconds by which ranks finish their shares apart,
#: so a rank wakes soon after the last one arrives (docs/performance.md compares intervals).
OVERSUBSCRIBED_POLL_S = 1e-4
#: How long a spare rank sleeps between polls while the others train: its wake-ups then cost
#: the computing ranks nothing, and the job ends at most this much later.
SPARE_POLL_S = 0.05

class MPIComm(Comm):
    """`Comm` over an mpi4py communicator (MPI.COMM_WORLD by default).

    Args:
        comm: The mpi4py communicator to wrap; None means MPI.COMM_WORLD.
        parent: The communicator this one was split from (`computing_ranks`): its collective
            timeout follows this one's.
    """

    def __init__(self, comm: Any = None, parent: MPIComm | None = None) -> None:
        from mpi4py import MPI

        self._MPI = MPI
        self._parent = parent
        self._computes = True
        self._comm = MPI.COMM_WORLD if comm is None else comm
        self.rank = self._comm.Get_rank()
        self.size = self._comm.Get_size()
        node = self._comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        self.local_rank = node.Get_rank()
        self.local_size = node.Get_size()
        # the cores of the host's ranks together: a launcher that binds each rank to its own
        # core gives every rank a mask of one core, and the host is still not oversubscribed
        self.host_cores = len(frozenset().union(*node.allgather(affinity())))
        node.Free()
        self._ops = {"sum": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN}
        self.oversubscribed = self.local_size > self.host_cores
        # MPI never matches a blocking collective with a nonblocking one, so every rank must
        # wait for the gradient in the same way: asleep in Iallreduce as soon as any host has
        # more ranks than cores (hosts may hold different numbers of ranks)
        self._sleeping_allreduce = bool(self._comm.allreduce(self.oversubscribed, op=MPI.LOR))
        self._channels = [self._comm]  # channel 0, then `open_channel`'s duplicates
        self._deadline = None
        if self.size > 1:
            self._deadline = CollectiveDeadline(
                self._comm.Dup(), self.rank, DEFAULT_TIMEOUT_S,
                can_ask=MPI.Query_thread() == MPI.THREAD_MULTIPLE)

    def set_collective_timeout(self, seconds: float) -> None:
        """Seconds a rank may wait in one collective before the job stops (0: forever)."""
        if self._deadline is not None:
            self._deadline.set_timeout(seconds)
        if self._parent is not None:  # the job's end, where spare ranks join, is bounded too
            self._parent.set_collective_timeout(seconds)

    def set_context(self, text: str) -> None:
        """What the job is doing, for the collective-timeout message (e.g. "step 14")."""
        if self._deadline is not None:
            self._deadline.context = text
        if self._parent is not None:
            self._parent.set_context(text)

    @contextlib.contextmanager
    def no_deadline(self) -> Iterator[None]:
        """No collective timeout inside the block."""
        if self._deadline is None:
            yield
        else:
            with self._deadline.suspended():
                yield

    @contextlib.contextmanager
    def _waiting(self, what: str) -> Iterator[None]:
        """Mark this rank as waiting in the collective ``what`` (for the deadline)."""
        deadline = self._deadline
        if deadline is None:
            yield
            return
        deadline.enter(what)
        try:
            yield
        finally:
            deadline.leave()

    def barrier(self) -> None:
        """Block until every rank has called `barrier`."""
        with self._waiting("a barrier"):
            self._comm.Barrier()

    def sleeping_barrier(self) -> None:
        """`Ibarrier`, tested every millisecond with a sleep in between."""
        with self._waiting("a barrier (waiting for rank 0's files)"):
            _wait_asleep(self._comm.Ibarrier(), SLEEPING_POLL_S)

    def broadcast_(self, buf: np.ndarray, root: int = 0) -> None:
        """Overwrite `buf` in place with `root`'s contents (one `Bcast`, no copy)."""
        _check_root(root, self.size)
        _check_contiguous(buf)
        with self._waiting(f"a broadcast from rank {root}"):
            self._comm.Bcast(buf, root=root)

    def allreduce_sum_(self, buf: np.ndarray) -> None:
        """`Allreduce(IN_PLACE, buf, SUM)`: one call, no copy, never pickled.

        With more ranks than cores on a host, a rank that has finished its share would spin
        inside `Allreduce` on a core that a rank still computing needs; it waits in
        `Iallreduce` instead, asleep between tests, and hands the core over. MPICH sums in the
        same order either way (bit-identical results at 2 and 4 ranks).
        """
        _check_contiguous(buf)
        with self._waiting(f"an allreduce of {buf.size} values"):
            if self._sleeping_allreduce:
                request = self._comm.Iallreduce(self._MPI.IN_PLACE, buf, op=self._MPI.SUM)
                _wait_asleep(request, OVERSUBSCRIBED_POLL_S)
            else:
                self._comm.Allreduce(self._MPI.IN_PLACE, buf, op=self._MPI.SUM)

    def open_channel(self) -> int:
        """A duplicate of this communicator for a second stream of nonblocking collectives."""
        with self._waiting("creating a communication channel"):
            self._channels.append(self._comm.Dup())
        return len(self._channels) - 1

    def iallreduce_sum_(self, buf: np.ndarray, channel: int = 0) -> Any:
        """`Iallreduce(IN_PLACE, buf, SUM)` on ``channel``; the same sums as `Allreduce`."""
        _check_contiguous(buf)
        with self._waiting(f"starting an allreduce of {buf.size} values"):
            return self._channels[channel].Iallreduce(self._MPI.IN_PLACE, buf,
                                                      op=self._MPI.SUM)

    def ialltoall(self, send: np.ndarray, recv: np.ndarray, channel: int = 0) -> Any:
        """`Ialltoall` of equal blocks on ``channel``."""
        _check_contiguous(recv)
        with self._waiting(f"starting an all-to-all of {send.size} values"):
            return self._channels[channel].Ialltoall(send, recv)

    def iallgather(self, send: np.ndarray, recv: np.ndarray, channel: int = 0) -> Any:
        """`Iallgather` on ``channel``."""
        _check_contiguous(recv)
        with self._waiting(f"starting an allgather of {send.size} values"):
            return self._channels[channel].Iallgather(send, recv)

    def reduce_scatter_sum_(self, buf: np.ndarray, counts: tuple[int, ...]) -> None:
        """`Reduce_scatter(IN_PLACE, buf, SUM)` with ``counts``, asleep in `Ireduce_scatter`
        on a host with more ranks than cores (as `allreduce_sum_`, every rank alike).

        MPI leaves the result at the start of ``buf``; it is moved to this rank's block, which
        never overlaps the start: block 0, the largest, lies before every other block.
        """
        _check_contiguous(buf)
        start, count = sum(counts[: self.rank]), counts[self.rank]
        if 0 < start < count:
            raise ValueError(f"blocks {counts} are not in decreasing size")
        with self._waiting(f"a reduce-scatter of {buf.size} values"):
            if self._sleeping_allreduce:
                request = self._comm.Ireduce_scatter(self._MPI.IN_PLACE, buf, list(counts),
                                                     op=self._MPI.SUM)
                _wait_asleep(request, OVERSUBSCRIBED_POLL_S)
            else:
                self._comm.Reduce_scatter(self._MPI.IN_PLACE, buf, list(counts),
                                          op=self._MPI.SUM)
        if start:
            buf[start : start + count] = buf[:count]

    def allgatherv_(self, buf: np.ndarray, counts: tuple[int, ...]) -> None:
        """`Allgatherv(IN_PLACE, buf)` with ``counts``; asleep in `Iallgatherv` on a host with
        more ranks than cores, as `allreduce_sum_`."""
        _check_contiguous(buf)
        spec = [buf, (list(counts), _displacements(counts))]
        with self._waiting(f"an allgather of {buf.size} values"):
            if self._sleeping_allreduce:
                _wait_asleep(self._comm.Iallgatherv(self._MPI.IN_PLACE, spec),
                             OVERSUBSCRIBED_POLL_S)
            else:
                self._comm.Allgatherv(self._MPI.IN_PLACE, spec)

    def gatherv(self, send: np.ndarray, recv: np.ndarray | None, counts: tuple[int, ...],
                root: int = 0) -> None:
        """`Gatherv` of every rank's block into ``root``'s ``recv``."""
        _check_root(root, self.size)
        spec = None
        if self.rank == root:
            _check_contiguous(recv)
            spec = [recv, (list(counts), _displacements(counts))]
        with self._waiting(f"a gather to rank {root}"):
            self._comm.Gatherv(np.ascontiguousarray(send), spec, root=root)

    def scatterv(self, send: np.ndarray | None, recv: np.ndarray, counts: tuple[int, ...],
                 root: int = 0) -> None:
        """`Scatterv` of ``root``'s ``send``, each rank's block into its ``recv``."""
        _check_root(root, self.size)
        _check_contiguous(recv)
        spec = None
        if self.rank == root:
            spec = [np.ascontiguousarray(send), (list(counts), _displacements(counts))]
        with self._waiting(f"a scatter from rank {root}"):
            self._comm.Scatterv(spec, recv, root=root)

    def test(self, request: Any) -> bool:
        """`MPI_Test`: completed yet? (Progresses every pending collective.)"""
        return request is None or bool(request.Test())

    def wait_all(self, requests: list[Any], what: str) -> None:
        """Complete ``requests`` in order: asleep between tests on a host with more ranks than
        cores (as `allreduce_sum_`), else in `MPI_Wait`."""
        with self._waiting(what):
            for request in requests:
                if request is None:
                    continue
                if self._sleeping_allreduce:
                    _wait_asleep(request, OVERSUBSCRIBED_POLL_S)
                else:
                    request.Wait()

    def _allreduce_small(self, value: Any, op: str) -> Any:
        if isinstance(value, np.ndarray):
            out = np.array(value, order="C")  # a copy, 0-d stays 0-d
            with self._waiting(f"an allreduce ({op})"):
                self._comm.Allreduce(self._MPI.IN_PLACE, out, op=self._ops[op])
            return out
        if isinstance(value, bool | np.bool_):
            arr = np.array([int(value)], dtype=np.int64)
        elif isinstance(value, np.generic):
            arr = np.array([value])
        elif isinstance(value, int):
            arr = np.array([value], dtype=np.int64)
        elif isinstance(value, float):
            arr = np.array([value], dtype=np.float64)
        else:
            raise TypeError(f"cannot allreduce a {type(value).__name__}; pass a number or array")
        with self._waiting(f"an allreduce ({op})"):
            self._comm.Allreduce(self._MPI.IN_PLACE, arr, op=self._ops[op])
        if isinstance(value, bool | np.bool_):
            return type(value)(arr[0] != 0)
        if isinstance(value, np.generic):
            return arr[0]
        return type(value)(arr[0])

    def broadcast_object(self, obj: T, root: int = 0) -> T:
        """Return `root`'s `obj` on every rank (pickled; setup time only)."""
        _check_root(root, self.size)
        with self._waiting(f"a broadcast from rank {root}"):
            return self._comm.bcast(obj, root=root)

    def allgather_object(self, obj: T) -> list[T]:
        """Return every rank's `obj`, indexed by rank (pickled)."""
        with self._waiting("an allgather"):
            return self._comm.allgather(obj)

    def _gather_rows(self, row: np.ndarray) -> np.ndarray:
        rows = np.empty((self.size, row.size), dtype=row.dtype)
        with self._waiting("an allgather (the ranks' checksums)"):
            self._comm.Allgather(row, rows)
        return rows

    def abort(self, code: int = 1) -> NoReturn:
        """`MPI_Abort` on COMM_WORLD: the launcher kills every rank and exits non-zero."""
        flush_stdio()
        time.sleep(ABORT_GRACE_S)  # let the launcher forward this rank's last message
        self._MPI.COMM_WORLD.Abort(code)
        os._exit(code)  # Abort does not return; this only satisfies NoReturn.

    def computing_ranks(self) -> MPIComm | None:
        """The ranks that compute, as an `MPIComm` of their own in rank order (this one when
        every rank computes); None on a spare rank (`dpvit.parallel.threads.computes_steps`).
        The number of spare ranks is kept in `spare_ranks`."""
        computes = self._computes = computes_steps(self.local_rank, self.host_cores)
        with self._waiting("an allgather (which ranks compute)"):
            flags = self._comm.allgather(computes)
        self.spare_ranks = flags.count(False)
        if not self.spare_ranks:
            return self
        with self._waiting("splitting off the spare ranks"):
            computing = self._comm.Split(0 if computes else self._MPI.UNDEFINED, key=self.rank)
        return MPIComm(computing, parent=self) if computes else None

    def join_spare_ranks(self, code: int) -> int:
        """Where the computing ranks end and the spare ranks wait: rank 0's exit code, on
        every rank (the computing ranks reach this only with a code they agree on; a failure
        they do not agree on ends the job with `abort`).

        The code travels in a broadcast from rank 0 (which always computes), then every rank
        enters a barrier. A spare rank waits in the broadcast asleep for the whole training,
        with no deadline; the computing ranks wait in the barrier under the collective
        deadline, and a spare rank enters it only after it has received the code: a spare
        rank that was stopped or hung meanwhile ends the job with the timeout line instead
        of leaving it waiting forever (a collective that a rank joins by posting its data
        alone, such as an allreduce, would complete without it, and the job would then wait
        in MPI_Finalize)."""
        if not self.spare_ranks:
            return code
        buf = np.array([code], dtype=np.int64)
        sent = self._comm.Ibcast(buf, root=0)
        if self._computes:
            self.set_context("the end of the run")
            waiting = self._waiting("the spare ranks' exit")
        else:
            self.set_context("its wait as a spare rank")
            waiting = contextlib.nullcontext()
        with waiting:
            _wait_asleep(sent, SPARE_POLL_S)
            _wait_asleep(self._comm.Ibarrier(), SPARE_POLL_S)
        return int(buf[0])


def _displacements(counts: tuple[int, ...]) -> list[int]:
    """Where each rank's block starts: the running sum of the counts before it."""
    return [0, *itertools.accumulate(counts[:-1])]


def _wait_asleep(request: Any, poll_s: float) -> None:
    """Complete an MPI request, sleeping ``poll_s`` between tests instead of spinning."""
    while not request.Test():
        time.sleep(poll_s)
