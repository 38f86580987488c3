"""How many worker threads each rank runs, one BLAS thread for each of them, and which ranks
compute when a host has more ranks than cores."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

from dpvit.errors import ConfigError

if TYPE_CHECKING:
    from dpvit.parallel.comm import Comm

logger = logging.getLogger(__name__)

#: Environment variables that tell child processes and BLAS libraries how many threads to use.
THREAD_ENV_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")

#: What the ranks of a host beyond its cores do: "wait" (the default) or "compute".
SPARE_RANKS_ENV = "DPVIT_SPARE_RANKS"
SPARE_RANK_MODES = ("wait", "compute")


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS reports one)."""
    return len(affinity())


def affinity() -> frozenset[int]:
    """The CPU numbers this process may run on (all of them where the OS has no masks)."""
    if hasattr(os, "sched_getaffinity"):
        return frozenset(os.sched_getaffinity(0))
    return frozenset(range(max(1, os.cpu_count() or 1)))


def computes_steps(local_rank: int, host_cores: int) -> bool:
    """Whether the rank ``local_rank`` of its host computes its share of the training steps.

    ``host_cores`` counts the cores the host's ranks may run on together (the union of their
    affinity masks, so ranks that a launcher binds to a core each all compute). On a host with
    more ranks than that, ranks take turns on the cores, and every rank pays its per-step
    fixed costs (Python overhead per layer, the optimizer over all parameters, GEMMs on fewer
    images) on a core another rank needs: ``mpirun -n 4`` on 2 cores trained slower than
    ``-n 2`` (docs/performance.md). So by default only the first ``host_cores`` ranks of such
    a host compute: training runs on a communicator of the computing ranks alone (it is then
    the training of that many ranks, bit for bit), and the spare ranks wait asleep for its
    end (`dpvit.cli.run_main`). Keeping them in every step instead, with a zero gradient, was
    slower still: every collective then waits for ranks that are asleep.
    ``DPVIT_SPARE_RANKS=compute`` makes every rank compute its own share (the tests use it
    to shard N ways on few cores).
    """
    mode = os.environ.get(SPARE_RANKS_ENV, "wait").strip().lower() or "wait"
    if mode not in SPARE_RANK_MODES:
        raise ConfigError(f"{SPARE_RANKS_ENV}={mode!r}: choose one of "
                          f"{', '.join(SPARE_RANK_MODES)}")
    return mode == "compute" or local_rank < host_cores


def configure_threads(comm: Comm, threads: int | None = None,
                      level: int = logging.INFO) -> int:
    """Choose this rank's worker threads and give each of them one BLAS/OpenMP thread.

    When several ranks share a host each uses one thread (the ranks already fill the
    cores; with more ranks than cores they take turns, and the log line says how many share
    how many cores); a lone process uses every core it may run on, as that many model
    replicas in threads (`dpvit.parallel.replicas`), which this model's small GEMMs suit
    better than BLAS threads. The choice is stored in `comm.threads`; the BLAS limit of 1 is
    applied with threadpoolctl (it persists for the process) and exported in
    `OMP/OPENBLAS/MKL_NUM_THREADS` for child processes. Rank 0 logs the choice at `level`.

    Args:
        comm: The job's communicator (its `local_size` decides; its `threads` is set).
        threads: Explicit override; otherwise the `DPVIT_NUM_THREADS` environment variable,
            otherwise the rule above.
        level: The logging level of the line `threads per rank: ...` (`run_main` says it at
            INFO for training and bench only).

    Returns:
        The number of worker threads chosen.
    """
    if threads is None and os.environ.get("DPVIT_NUM_THREADS"):
        threads = int(os.environ["DPVIT_NUM_THREADS"])
        reason = "DPVIT_NUM_THREADS"
    elif threads is not None:
        reason = "requested"
    elif comm.oversubscribed:
        # a fact, not advice: training leaves such ranks spare unless DPVIT_SPARE_RANKS=compute
        threads, reason = 1, f"{comm.local_size} ranks share this host's {comm.host_cores} cores"
    elif comm.local_size > 1:
        threads, reason = 1, f"{comm.local_size} ranks share this host"
    else:
        threads, reason = comm.host_cores, "one rank on this host"
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
        logger.log(level, "threads per rank: %d (%s), one BLAS thread each", comm.threads,
                   reason)
    return comm.threads


