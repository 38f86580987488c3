"""Process-group communication for data-parallel training: the `Comm` interface.

`Comm` hides whether the job runs under an MPI launcher (`MPIComm`, in
`dpvit.parallel.mpi_comm`, the only module that imports mpi4py) or as a plain process
(`LocalComm`, a world of one whose collectives are the identity), so training code calls the
same methods in both cases. Everything used inside the training step is buffer based
(`Bcast`/`Allreduce` on numpy arrays, never pickled); the `*_object` methods pickle and are
meant for rare setup-time values such as the resolved config.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import zlib
from collections.abc import Iterator
from typing import Any, NoReturn, TypeVar

import numpy as np

from dpvit.errors import UserError
from dpvit.parallel.launcher import launched_by_mpi
from dpvit.parallel.threads import available_cores

logger = logging.getLogger(__name__)

T = TypeVar("T")


class DivergenceError(UserError):
    """Raised on every rank when an array that must be identical differs between ranks."""


class Comm:
    """A group of cooperating processes; the base class documents the contract.

    Attributes:
        rank: This process's index in the job, 0..size-1.
        size: Number of processes in the job.
        local_rank: Index among the processes on this host.
        local_size: Number of processes on this host (they share its cores).
        host_cores: Cores the processes on this host may run on together (the union of
            their affinity masks).
        oversubscribed: More processes on this host than `host_cores`; then
            `allreduce_sum_` waits asleep, handing the core to a rank still computing.
        spare_ranks: How many ranks of the job compute nothing (set by `computing_ranks`).
        threads: Worker threads of this process, each running a model replica
            (`dpvit.parallel.replicas`); set by `configure_threads`.
    """

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    host_cores: int = 1
    oversubscribed: bool = False
    spare_ranks: int = 0
    threads: int = 1

    @property
    def is_root(self) -> bool:
        """True on rank 0, the rank that logs and writes files."""
        return self.rank == 0

    def set_collective_timeout(self, seconds: float) -> None:
        """Seconds a rank may wait in one collective before the job stops (0: forever);
        see `dpvit.parallel.deadline`."""

    def set_context(self, text: str) -> None:
        """What the job is doing, for the collective-timeout message (e.g. "step 14")."""

    @contextlib.contextmanager
    def no_deadline(self) -> Iterator[None]:
        """No collective timeout inside the block (rank 0 downloading while others wait)."""
        yield

    def barrier(self) -> None:
        """Block until every rank has called `barrier`."""
        raise NotImplementedError

    def sleeping_barrier(self) -> None:
        """A barrier in which waiting ranks sleep instead of busy-polling.

        For the seconds rank 0 alone spends writing reports and checkpoints: with more ranks
        than cores, spinning ranks would take half of rank 0's core.
        """
        raise NotImplementedError

    def broadcast_(self, buf: np.ndarray, root: int = 0) -> None:
        """Overwrite `buf` in place on every rank with `root`'s contents (C-contiguous)."""
        raise NotImplementedError

    def allreduce_sum_(self, buf: np.ndarray) -> None:
        """Replace `buf` in place with its elementwise sum over all ranks (C-contiguous)."""
        raise NotImplementedError

    # -- nonblocking collectives (dpvit.parallel.gradsync) ------------------------------------
    # Each starts a collective and returns a request for `test` and `wait_all`. Every rank
    # must start the collectives of one channel in the same order; channel 0 is this
    # communicator, further channels (`open_channel`) are duplicates of it, so that two
    # streams of collectives (e.g. the two phases of a compressed allreduce) may interleave
    # differently on different ranks.

    def open_channel(self) -> int:
        """A new channel for nonblocking collectives (collective: call on every rank)."""
        return 0

    def iallreduce_sum_(self, buf: np.ndarray, channel: int = 0) -> Any:
        """Start an in-place sum of `buf` over all ranks."""
        raise NotImplementedError

    def ialltoall(self, send: np.ndarray, recv: np.ndarray, channel: int = 0) -> Any:
        """Start an all-to-all: block r of `send` (split into `size` equal blocks along the
        first axis) goes to rank r, and block r of `recv` receives rank r's block."""
        raise NotImplementedError

    def iallgather(self, send: np.ndarray, recv: np.ndarray, channel: int = 0) -> Any:
        """Start an allgather: block r of `recv` receives rank r's `send`."""
        raise NotImplementedError

    # -- vector collectives of the sharded optimizer (dpvit.parallel.shard) --------------------
    # ``counts[r]`` values of a flat buffer belong to rank r, in rank order: rank r's block is
    # ``[sum(counts[:r]), sum(counts[:r + 1]))``.

    def reduce_scatter_sum_(self, buf: np.ndarray, counts: tuple[int, ...]) -> None:
        """In place: this rank's block of ``buf`` receives the sum over ranks of that block;
        the other blocks are left undefined (no buffer for the result: memory is what
        sharding saves)."""
        raise NotImplementedError

    def allgatherv_(self, buf: np.ndarray, counts: tuple[int, ...]) -> None:
        """In place: every rank's block of ``buf`` replaces that block on every rank."""
        raise NotImplementedError

    def gatherv(self, send: np.ndarray, recv: np.ndarray | None, counts: tuple[int, ...],
                root: int = 0) -> None:
        """``root``'s ``recv`` (all blocks) receives every rank's ``send`` (its block); ``recv``
        is ignored elsewhere."""
        raise NotImplementedError

    def scatterv(self, send: np.ndarray | None, recv: np.ndarray, counts: tuple[int, ...],
                 root: int = 0) -> None:
        """Every rank's ``recv`` receives its block of ``root``'s ``send`` (ignored
        elsewhere)."""
        raise NotImplementedError

    def test(self, request: Any) -> bool:
        """Whether a started collective has completed; also lets MPI progress all of them
        (MPICH moves nonblocking collectives on only inside MPI calls)."""
        return True

    def wait_all(self, requests: list[Any], what: str) -> None:
        """Complete every request (under the collective deadline, named `what`)."""

    def _allreduce_small(self, value: Any, op: str) -> Any:
        raise NotImplementedError

    def allreduce_sum(self, value: T) -> T:
        """Sum a small value (int, float, bool, numpy scalar or array) over ranks.

        Returns a new value of the same kind; the input is not modified. Buffer based, so it
        is cheap enough for per-step metrics and confusion matrices.
        """
        return self._allreduce_small(value, "sum")

    def allreduce_max(self, value: T) -> T:
        """Maximum over ranks, e.g. to agree on a "stop now" or "non-finite seen" flag."""
        return self._allreduce_small(value, "max")

    def allreduce_min(self, value: T) -> T:
        """Minimum over ranks, e.g. to agree that every rank has finished."""
        return self._allreduce_small(value, "min")

    def broadcast_object(self, obj: T, root: int = 0) -> T:
        """Return `root`'s `obj` on every rank (pickled; setup time only, never in the step)."""
        raise NotImplementedError

    def allgather_object(self, obj: T) -> list[T]:
        """Return the list of every rank's `obj`, indexed by rank (pickled)."""
        raise NotImplementedError

    def _gather_rows(self, row: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def allgather_array(self, row: np.ndarray) -> np.ndarray:
        """Every rank's 1-D ``row`` (same size and dtype everywhere), stacked in rank order
        into a (size, len(row)) array on every rank (buffer based)."""
        return self._gather_rows(np.ascontiguousarray(row))

    def check_identical(self, buf: np.ndarray, what: str) -> None:
        """Check that `buf` is bitwise identical on every rank.

        Each rank computes a CRC-32 of the bytes plus the float64 sum (for the message), the
        rows are gathered to all ranks, and every rank raises the same `DivergenceError`
        naming the ranks that differ from rank 0, so the job stops on all ranks together.

        Args:
            buf: Array to compare, e.g. the flat parameter buffer.
            what: Name used in the error message, e.g. "parameters after step 200".

        Raises:
            DivergenceError: If any rank's bytes differ from rank 0's.
        """
        data = np.asarray(buf, order="C")
        crc = zlib.crc32(data.reshape(-1).view(np.uint8))
        total = float(np.sum(data, dtype=np.float64)) if data.dtype.kind in "fiub" else 0.0
        row = np.array([crc, data.nbytes, total], dtype=np.float64)
        rows = self._gather_rows(row)
        ref = rows[0]
        bad = [r for r in range(1, self.size) if not np.array_equal(rows[r, :2], ref[:2])]
        if bad:
            sums = ", ".join(f"rank {r}: {rows[r, 2]:.17g}" for r in [0, *bad])
            raise DivergenceError(
                f"{what} differ across ranks: rank(s) {bad} disagree with rank 0 "
                f"(float64 sums {sums})"
            )

    def abort(self, code: int = 1) -> NoReturn:
        """End the whole job immediately with exit status `code` (no cleanup)."""
        raise NotImplementedError

    def computing_ranks(self) -> Comm | None:
        """The ranks that compute, as a communicator of their own; None on a spare rank
        (`dpvit.parallel.threads.computes_steps`). Collective. Here: every rank computes."""
        return self

    def join_spare_ranks(self, code: int) -> int:
        """Where the computing ranks end and the spare ranks wait: the computing ranks' exit
        code (which they agree on), on every rank. Collective on the whole job. Here: no
        spare rank."""
        return code


def flush_stdio() -> None:
    """Flush stdout and stderr before the process ends without Python's clean-up."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()


class LocalComm(Comm):
    """A world of one process: collectives return their input unchanged."""

    def __init__(self) -> None:
        self.host_cores = available_cores()

    def barrier(self) -> None:
        """No other rank to wait for."""

    def sleeping_barrier(self) -> None:
        """No other rank to wait for."""

    def broadcast_(self, buf: np.ndarray, root: int = 0) -> None:
        """Nothing to receive; only checks `root`."""
        _check_root(root, 1)

    def allreduce_sum_(self, buf: np.ndarray) -> None:
        """The sum over one rank is the buffer itself."""

    def iallreduce_sum_(self, buf: np.ndarray, channel: int = 0) -> Any:
        """Done at once: the sum over one rank is the buffer itself."""
        return None

    def ialltoall(self, send: np.ndarray, recv: np.ndarray, channel: int = 0) -> Any:
        """Done at once: this rank's one block goes to itself."""
        np.copyto(recv, send)

    def iallgather(self, send: np.ndarray, recv: np.ndarray, channel: int = 0) -> Any:
        """Done at once: this rank's block is the whole result."""
        np.copyto(recv.reshape(send.shape), send)

    def reduce_scatter_sum_(self, buf: np.ndarray, counts: tuple[int, ...]) -> None:
        """The one block is the whole buffer, summed over one rank."""

    def allgatherv_(self, buf: np.ndarray, counts: tuple[int, ...]) -> None:
        """The one block is already in place."""

    def gatherv(self, send: np.ndarray, recv: np.ndarray | None, counts: tuple[int, ...],
                root: int = 0) -> None:
        """This rank's block is the whole result."""
        _check_root(root, 1)
        np.copyto(recv, send)

    def scatterv(self, send: np.ndarray | None, recv: np.ndarray, counts: tuple[int, ...],
                 root: int = 0) -> None:
        """This rank's block is the whole buffer."""
        _check_root(root, 1)
        np.copyto(recv, send)

    def _allreduce_small(self, value: Any, op: str) -> Any:
        return value.copy() if isinstance(value, np.ndarray) else value

    def broadcast_object(self, obj: T, root: int = 0) -> T:
        """Return `obj` itself."""
        _check_root(root, 1)
        return obj

    def allgather_object(self, obj: T) -> list[T]:
        """Return `[obj]`."""
        return [obj]

    def _gather_rows(self, row: np.ndarray) -> np.ndarray:
        return row[None, :]

    def abort(self, code: int = 1) -> NoReturn:
        """Exit this process at once with `code`."""
        flush_stdio()
        os._exit(code)


def _check_root(root: int, size: int) -> None:
    if not 0 <= root < size:
        raise ValueError(f"root rank {root} is outside the world of {size} process(es)")


def _check_contiguous(buf: np.ndarray) -> None:
    if not (isinstance(buf, np.ndarray) and buf.flags.c_contiguous and buf.flags.writeable):
        raise ValueError("in-place collectives need a writeable C-contiguous numpy array")


def init_comm(force_local: bool = False) -> Comm:
    """Return the communicator for this process.

    MPI is initialised only when a launcher started the process, so a plain
    `python -m dpvit.train` never loads libmpi (fast start, no singleton-init surprises) and
    gets a `LocalComm`. Under `mpirun -n 1` it is an `MPIComm` of size 1.

    Args:
        force_local: Return a `LocalComm` even under a launcher (single-process debug mode).
    """
    if force_local or not launched_by_mpi():
        return LocalComm()
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        logger.debug("mpi4py is not installed; running as a world of one")
        return LocalComm()
    from dpvit.parallel.mpi_comm import MPIComm

    return MPIComm()


