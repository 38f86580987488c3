"""Process-group communication for data-parallel training; the only module that imports mpi4py.

`Comm` hides whether the job runs under an MPI launcher (`MPIComm`) or as a plain process
(`LocalComm`, a world of one whose collectives are the identity), so training code calls the
same methods in both cases. Everything used inside the training step is buffer based
(`Bcast`/`Allreduce` on numpy arrays, never pickled); the `*_object` methods pickle and are
meant for rare setup-time values such as the resolved config.

`run_main` wraps every command: it picks the communicator, sets BLAS threads, configures
logging with a `[rank r/N]` prefix, and turns an exception on any rank into one clear message
followed by `MPI_Abort`, so that the other ranks never hang in a collective (what
`python -m mpi4py` does, but built in because users type `mpirun -n 4 python -m dpvit.train`).

A blocking `Allreduce` of the default model's 206k float32 gradients takes ~0.12 ms on two
ranks of one host, so the gradient is reduced with one call; bucketed `Iallreduce` overlapped
with backward does not pay at this size.

MPICH busy-polls while a rank waits. With more ranks than cores that steals CPU from the ranks
still computing; `MPIR_CVAR_ENABLE_HEAVY_YIELD=1` (nanosleep while waiting) fixes it at the
cost of 3-4x slower small collectives, so dpvit leaves the MPICH default; a launcher may set it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import numpy as np

from dpvit.allocator import keep_freed_memory
from dpvit.errors import AgreedError, UserError

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Environment variables set by MPI launchers (MPICH/Hydra, Intel MPI, Open MPI, PMIx, PALS,
#: srun with PMI); any of them means "started by a launcher, initialise MPI".
LAUNCHER_ENV_VARS = (
    "PMI_RANK",
    "PMI_SIZE",
    "PMIX_RANK",
    "OMPI_COMM_WORLD_SIZE",
    "MPI_LOCALNRANKS",
    "PALS_RANKID",
)

#: Seconds to wait between flushing stderr and MPI_Abort: without it, when several ranks fail at
#: once, Hydra sometimes tears the job down before forwarding the error lines (seen 2 in 30).
ABORT_GRACE_S = 0.2

#: How long `sleeping_barrier` sleeps between polls: short next to the seconds it waits for,
#: long enough that the sleeping ranks cost their cores nothing.
SLEEPING_POLL_S = 1e-3

#: How long a rank on a host with more ranks than cores sleeps between polls of the gradient
#: allreduce: a fraction of the tens of milliseconds by which ranks finish their shares apart.
#: `mpirun -n 4` training on 2 cores ran 6% faster with it than spinning (README, Performance).
OVERSUBSCRIBED_POLL_S = 1e-4

#: Environment variables that tell child processes and BLAS libraries how many threads to use.
THREAD_ENV_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


class DivergenceError(UserError):
    """Raised on every rank when an array that must be identical differs between ranks."""


class Comm:
    """A group of cooperating processes; the base class documents the contract.

    Attributes:
        rank: This process's index in the job, 0..size-1.
        size: Number of processes in the job.
        local_rank: Index among the processes on this host.
        local_size: Number of processes on this host (they share its cores).
        oversubscribed: More processes on this host than cores this process may use; then
            `allreduce_sum_` waits asleep, and `configure_threads` says one rank per core is
            faster.
        threads: Worker threads of this process, each running a model replica
            (`dpvit.replicas`); set by `configure_threads`.
    """

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    oversubscribed: bool = False
    threads: int = 1

    @property
    def is_root(self) -> bool:
        """True on rank 0, the rank that logs and writes files."""
        return self.rank == 0

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


def _flush_stdio() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()


class LocalComm(Comm):
    """A world of one process: collectives return their input unchanged."""

    def barrier(self) -> None:
        """No other rank to wait for."""

    def sleeping_barrier(self) -> None:
        """No other rank to wait for."""

    def broadcast_(self, buf: np.ndarray, root: int = 0) -> None:
        """Nothing to receive; only checks `root`."""
        _check_root(root, 1)

    def allreduce_sum_(self, buf: np.ndarray) -> None:
        """The sum over one rank is the buffer itself."""

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
        _flush_stdio()
        os._exit(code)


class MPIComm(Comm):
    """`Comm` over an mpi4py communicator (MPI.COMM_WORLD by default).

    Args:
        comm: The mpi4py communicator to wrap; None means MPI.COMM_WORLD.
    """

    def __init__(self, comm: Any = None) -> None:
        from mpi4py import MPI

        self._MPI = MPI
        self._comm = MPI.COMM_WORLD if comm is None else comm
        self.rank = self._comm.Get_rank()
        self.size = self._comm.Get_size()
        node = self._comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        self.local_rank = node.Get_rank()
        self.local_size = node.Get_size()
        node.Free()
        self._ops = {"sum": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN}
        self.oversubscribed = self.local_size > available_cores()

    def barrier(self) -> None:
        """Block until every rank has called `barrier`."""
        self._comm.Barrier()

    def sleeping_barrier(self) -> None:
        """`Ibarrier`, tested every millisecond with a sleep in between."""
        _wait_asleep(self._comm.Ibarrier(), SLEEPING_POLL_S)

    def broadcast_(self, buf: np.ndarray, root: int = 0) -> None:
        """Overwrite `buf` in place with `root`'s contents (one `Bcast`, no copy)."""
        _check_root(root, self.size)
        _check_contiguous(buf)
        self._comm.Bcast(buf, root=root)

    def allreduce_sum_(self, buf: np.ndarray) -> None:
        """`Allreduce(IN_PLACE, buf, SUM)`: one call, no copy, never pickled.

        With more ranks than cores on the host, a rank that has finished its share would spin
        inside `Allreduce` on a core that a rank still computing needs; it waits in
        `Iallreduce` instead, asleep between tests, and hands the core over. MPICH sums in the
        same order either way (bit-identical results at 2 and 4 ranks).
        """
        _check_contiguous(buf)
        if self.oversubscribed:
            request = self._comm.Iallreduce(self._MPI.IN_PLACE, buf, op=self._MPI.SUM)
            _wait_asleep(request, OVERSUBSCRIBED_POLL_S)
        else:
            self._comm.Allreduce(self._MPI.IN_PLACE, buf, op=self._MPI.SUM)

    def _allreduce_small(self, value: Any, op: str) -> Any:
        if isinstance(value, np.ndarray):
            out = np.array(value, order="C")  # a copy, 0-d stays 0-d
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
        self._comm.Allreduce(self._MPI.IN_PLACE, arr, op=self._ops[op])
        if isinstance(value, bool | np.bool_):
            return type(value)(arr[0] != 0)
        if isinstance(value, np.generic):
            return arr[0]
        return type(value)(arr[0])

    def broadcast_object(self, obj: T, root: int = 0) -> T:
        """Return `root`'s `obj` on every rank (pickled; setup time only)."""
        _check_root(root, self.size)
        return self._comm.bcast(obj, root=root)

    def allgather_object(self, obj: T) -> list[T]:
        """Return every rank's `obj`, indexed by rank (pickled)."""
        return self._comm.allgather(obj)

    def _gather_rows(self, row: np.ndarray) -> np.ndarray:
        rows = np.empty((self.size, row.size), dtype=row.dtype)
        self._comm.Allgather(row, rows)
        return rows

    def abort(self, code: int = 1) -> NoReturn:
        """`MPI_Abort` on COMM_WORLD: the launcher kills every rank and exits non-zero."""
        _flush_stdio()
        time.sleep(ABORT_GRACE_S)  # let the launcher forward this rank's last message
        self._MPI.COMM_WORLD.Abort(code)
        os._exit(code)  # Abort does not return; this only satisfies NoReturn.


def _wait_asleep(request: Any, poll_s: float) -> None:
    """Complete an MPI request, sleeping ``poll_s`` between tests instead of spinning."""
    while not request.Test():
        time.sleep(poll_s)


def _check_root(root: int, size: int) -> None:
    if not 0 <= root < size:
        raise ValueError(f"root rank {root} is outside the world of {size} process(es)")


def _check_contiguous(buf: np.ndarray) -> None:
    if not (isinstance(buf, np.ndarray) and buf.flags.c_contiguous and buf.flags.writeable):
        raise ValueError("in-place collectives need a writeable C-contiguous numpy array")


def launched_by_mpi(environ: dict[str, str] | None = None) -> bool:
    """Whether an MPI launcher (mpirun, mpiexec, srun with PMI) started this process."""
    env = os.environ if environ is None else environ
    return any(name in env for name in LAUNCHER_ENV_VARS)


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
    return MPIComm()


def find_mpirun() -> str:
    """The mpirun of this Python environment (the mpich wheel puts it beside python), else
    whatever ``mpirun`` the PATH gives."""
    beside = Path(sys.executable).parent / "mpirun"
    return str(beside) if beside.exists() else "mpirun"


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS reports one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def configure_threads(comm: Comm, threads: int | None = None) -> int:
    """Choose this rank's worker threads and give each of them one BLAS/OpenMP thread.

    When several ranks share a host each uses one thread (the ranks already fill the
    cores; with more ranks than cores the log line says that one rank per core is faster); a
    lone process uses every core it may run on, as that many model replicas in
    threads (`dpvit.replicas`), which this model's small GEMMs suit better than BLAS threads.
    The choice is stored in `comm.threads`; the BLAS limit of 1 is applied with threadpoolctl
    (it persists for the process) and exported in `OMP/OPENBLAS/MKL_NUM_THREADS` for child
    processes.

    Args:
        comm: The job's communicator (its `local_size` decides; its `threads` is set).
        threads: Explicit override; otherwise the `DPVIT_NUM_THREADS` environment variable,
            otherwise the rule above.

    Returns:
        The number of worker threads chosen.
    """
    cores = available_cores()
    if threads is None and os.environ.get("DPVIT_NUM_THREADS"):
        threads = int(os.environ["DPVIT_NUM_THREADS"])
        reason = "DPVIT_NUM_THREADS"
    elif threads is not None:
        reason = "requested"
    elif comm.oversubscribed:
        # measured on 2 cores: -n 4 trained at a median 0.90x -n 2 (README, Performance)
        threads, reason = 1, (f"{comm.local_size} ranks share this host's {cores} cores; "
                              "one rank per core trains faster")
    elif comm.local_size > 1:
        threads, reason = 1, f"{comm.local_size} ranks share this host"
    else:
        threads, reason = cores, "one rank on this host"
    comm.threads = max(1, threads)
    for name in THREAD_ENV_VARS:
        os.environ[name] = "1"
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        logger.debug("threadpoolctl is not installed; BLAS thread count left as loaded")
    else:
        threadpool_limits(limits=1)
    if comm.is_root:
        logger.info("threads per rank: %d (%s), one BLAS thread each", comm.threads, reason)
    return comm.threads


class _RankFormatter(logging.Formatter):
    """Prefixes `[rank r/N]`, and the level name for warnings and errors."""

    def __init__(self, rank: int, size: int) -> None:
        super().__init__("%(message)s")
        self._prefix = f"[rank {rank}/{size}]"

    def format(self, record: logging.LogRecord) -> str:
        level = "" if record.levelno < logging.WARNING else f"{record.levelname.lower()}: "
        when = self.formatTime(record, "%H:%M:%S")
        return f"{when} {self._prefix} {level}{super().format(record)}"


def setup_logging(comm: Comm, debug: bool = False) -> None:
    """Send log records to stderr: rank 0 at INFO (dpvit's own at DEBUG with `debug`, so
    libraries such as matplotlib stay quiet), others at WARNING."""
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h.formatter, _RankFormatter)]:
        root.removeHandler(old)  # calling twice (tests, several commands) keeps one handler
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_RankFormatter(comm.rank, comm.size))
    root.addHandler(handler)
    root.setLevel(logging.INFO if comm.is_root else logging.WARNING)
    logging.getLogger("dpvit").setLevel(logging.DEBUG if debug and comm.is_root else logging.NOTSET)


def debug_requested(argv: list[str] | None = None) -> bool:
    """True when `--debug` is on the command line or `DPVIT_DEBUG=1` is set."""
    args = sys.argv[1:] if argv is None else argv
    return "--debug" in args or os.environ.get("DPVIT_DEBUG", "") not in ("", "0")


def help_requested(argv: list[str] | None = None) -> bool:
    """True when the command line asks for the usage text (`-h` / `--help`), which is then
    all a command prints."""
    args = sys.argv[1:] if argv is None else argv
    return "-h" in args or "--help" in args


def launcher_rank(environ: dict[str, str] | None = None) -> int:
    """This process's rank as the launcher numbered it (0 without a launcher), read from the
    environment so that it is known without initialising MPI."""
    env = os.environ if environ is None else environ
    for name in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PALS_RANKID", "SLURM_PROCID"):
        if env.get(name, "").isdigit():
            return int(env[name])
    return 0


def run_main(main: Callable[[Comm], int | None], argv: list[str] | None = None,
             single_process: bool = False) -> int:
    """Run a command's `main(comm)` with dpvit's process setup and failure handling.

    Sets up the communicator (`init_comm`), BLAS threads, logging and the allocator
    (`keep_freed_memory`), then calls `main`.
    An uncaught exception on any rank is reported once, by that rank: a `UserError` as its
    one-line message, anything else as its type and message (with the traceback under
    `--debug` / `DPVIT_DEBUG=1`). With more than one rank the job is then aborted with
    `MPI_Abort`, so ranks waiting in a collective end too instead of hanging. An
    `AgreedError`, raised on every rank together, is reported by rank 0 only and every rank
    returns its exit code without aborting.
    KeyboardInterrupt exits with 130, a non-zero `SystemExit` with its code.

    Args:
        main: The command body; returns an exit status (None means 0).
        argv: Command-line arguments used to detect `--debug` (default `sys.argv[1:]`).
        single_process: Give every process a world of one even under a launcher (the
            training debug mode, where only launcher rank 0 does anything).

    Returns:
        The exit status, for `sys.exit`. With more than one rank a failure never returns.
    """
    debug = debug_requested(argv)
    comm = init_comm(force_local=single_process)
    setup_logging(comm, debug=debug)
    try:
        if not help_requested(argv):  # the usage text alone, without the thread log line
            configure_threads(comm)
        keep_freed_memory()
        code = main(comm)
        return 0 if code is None else int(code)
    except KeyboardInterrupt:
        logger.error("interrupted")
        code = 130
    except SystemExit as exc:
        if exc.code is None or exc.code == 0:
            return 0
        if not isinstance(exc.code, int):
            logger.error("%s", exc.code)
        code = exc.code if isinstance(exc.code, int) else 1
    except AgreedError as exc:  # every rank is here together: report once, exit normally
        if comm.is_root:
            logger.log(exc.level, "%s", exc)
        return exc.exit_code
    except UserError as exc:
        if debug:
            logger.exception("%s", exc)
        else:
            logger.error("%s", exc)
        code = 1
    except BaseException as exc:
        if debug:
            logger.exception("unexpected %s: %s", type(exc).__name__, exc)
        else:
            logger.error(
                "unexpected %s: %s (run with --debug or DPVIT_DEBUG=1 for the traceback)",
                type(exc).__name__,
                exc,
            )
        code = 1
    if comm.size > 1:
        comm.abort(code)
    return code
