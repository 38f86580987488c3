"""How many worker threads each rank runs, and one BLAS thread for each of them."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dpvit.parallel.comm import Comm

logger = logging.getLogger(__name__)

#: Environment variables that tell child processes and BLAS libraries how many threads to use.
THREAD_ENV_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")

def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS reports one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)



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
    cores = available_cores()
    if threads is None and os.environ.get("DPVIT_NUM_THREADS"):
        threads = int(os.environ["DPVIT_NUM_THREADS"])
        reason = "DPVIT_NUM_THREADS"
    elif threads is not None:
        reason = "requested"
    elif comm.oversubscribed:
        # a fact, not advice: the result does not depend on the rank count, and on 2 cores
        # -n 4 trains at a median 0.90x -n 2 (docs/performance.md); the README says what to type
        threads, reason = 1, f"{comm.local_size} ranks share this host's {cores} cores"
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
        logger.log(level, "threads per rank: %d (%s), one BLAS thread each", comm.threads,
                   reason)
    return comm.threads


