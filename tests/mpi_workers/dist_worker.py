"""MPI worker for tests/test_dist.py: `mpirun -n N python dist_worker.py MODE PIDDIR`.

Modes:
    collectives: every collective checked against its expected value; rank 0 prints "OK".
    diverge: the last rank perturbs one parameter, then `check_identical` must fail.
    fail: rank 1 raises RuntimeError while the others wait in a barrier.
    user_error: rank 1 raises UserError while the others wait in an allreduce.
"""

import os
import sys
import time
from pathlib import Path

import numpy as np

from dpvit.cli import run_main
from dpvit.errors import UserError
from dpvit.parallel.comm import Comm


def collectives(comm: Comm) -> None:
    r, n = comm.rank, comm.size
    params = np.arange(1000, dtype=np.float32) if r == 0 else np.zeros(1000, np.float32)
    comm.broadcast_(params)
    np.testing.assert_array_equal(params, np.arange(1000, dtype=np.float32))
    comm.check_identical(params, "parameters")

    grads = np.full(206_000, r + 1, dtype=np.float32)
    comm.allreduce_sum_(grads)
    assert np.all(grads == n * (n + 1) / 2), grads[:4]
    # waiting asleep in Iallreduce (hosts with more ranks than cores) sums bit for bit as
    # Allreduce does, so the number of cores never changes a training run
    rng = np.random.default_rng(r)
    noisy = (rng.standard_normal(206_000) * 10.0 ** rng.uniform(-4, 4, 206_000)).astype(np.float32)
    sums = []
    for asleep in (False, True):
        comm.oversubscribed = asleep
        sums.append(noisy.copy())
        comm.allreduce_sum_(sums[-1])
    np.testing.assert_array_equal(sums[0], sums[1])
    comm.check_identical(sums[1], "sums waited for asleep")

    assert comm.allreduce_sum(r) == n * (n - 1) // 2
    assert isinstance(comm.allreduce_sum(1.5), float) and comm.allreduce_sum(1.5) == 1.5 * n
    assert comm.allreduce_max(r == 1) is True and comm.allreduce_min(r == 1) is False
    assert comm.allreduce_max(float(r)) == n - 1 and comm.allreduce_min(r) == 0
    cm = np.eye(3, dtype=np.int64) * (r + 1)
    np.testing.assert_array_equal(comm.allreduce_sum(cm), np.eye(3) * n * (n + 1) // 2)
    assert cm[0, 0] == r + 1, "allreduce_sum must not modify its input"
    assert comm.allreduce_sum(np.float32(2.0)) == np.float32(2.0 * n)
    loss_sum = comm.allreduce_sum(np.array(0.5))
    assert loss_sum.shape == () and loss_sum == 0.5 * n

    cfg = comm.broadcast_object({"lr": 3e-4, "rank": r})
    assert cfg == {"lr": 3e-4, "rank": 0}
    assert comm.allgather_object(r * 10) == [10 * i for i in range(n)]
    assert comm.local_size == n and 0 <= comm.local_rank < n
    comm.barrier()

    # while rank 0 works alone for 0.5 s, the ranks waiting in sleeping_barrier use no CPU
    cpu, wall = time.process_time(), time.perf_counter()
    if r == 0:
        time.sleep(0.5)
    comm.sleeping_barrier()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    assert wall >= 0.45 and cpu < 0.1, (wall, cpu)
    if r == 0:
        print(f"OK size={n} local_size={comm.local_size}", flush=True)


def main(comm: Comm) -> int:
    mode, piddir = sys.argv[1], Path(sys.argv[2])
    (piddir / f"{comm.rank}.pid").write_text(str(os.getpid()))
    if mode == "collectives":
        collectives(comm)
    elif mode == "diverge":
        params = np.ones(5000, dtype=np.float32)
        if comm.rank == comm.size - 1:
            params[1234] = np.nextafter(params[1234], np.float32(2))
        comm.check_identical(params, "parameters after step 7")
    elif mode in ("fail", "user_error"):
        comm.barrier()
        if comm.rank == 1:
            time.sleep(0.5)
            if mode == "fail":
                raise RuntimeError("boom from rank 1")
            raise UserError("data file /nonexistent/train.h5 does not exist")
        if mode == "fail":
            comm.barrier()
        else:
            comm.allreduce_sum_(np.zeros(10, np.float32))
        time.sleep(30)  # never reached in a correct run: the abort ends this rank first
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, argv=[]))
