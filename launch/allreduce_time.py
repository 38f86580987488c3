"""Time an in-place Allreduce(SUM) of float32 values, as dpvit reduces its gradient per step.

    launch/cluster.py run -- mpirun -n 2 -ppn 1 python launch/allreduce_time.py [N [REPS]]

N defaults to 206,000 values (824 KB, about the default model's gradient); prints the median,
min and max seconds of REPS calls (default 50) after 5 warm-up calls, the slowest rank's.
"""

from __future__ import annotations

import sys
import time

import numpy as np
from mpi4py import MPI


def main() -> None:
    comm = MPI.COMM_WORLD
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 206_000
    reps = int(sys.argv[2]) if len(sys.argv) > 2 else 50
    buf = np.ones(n, np.float32)
    times = []
    for i in range(reps + 5):
        comm.Barrier()
        start = time.perf_counter()
        comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
        if i >= 5:  # warm-up: connections, buffers
            times.append(time.perf_counter() - start)
    median, low, high = (comm.allreduce(f(times), op=MPI.MAX)
                         for f in (np.median, min, max))
    if comm.rank == 0:
        print(f"{comm.size} ranks, {n * 4 / 1e3:.0f} KB float32: median {median * 1e3:.2f} ms, "
              f"min {low * 1e3:.2f}, max {high * 1e3:.2f} over {reps} calls")


if __name__ == "__main__":
    main()
