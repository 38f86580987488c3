"""MPI worker for tests/test_gradsync.py: `mpirun -n N python gradsync_worker.py MODE`.

Modes:
    equal: bucketed sums (several bucket sizes, buckets started at backward-like offsets with
        tests in between) against one `allreduce_sum_` of the same float64 buffer; prints
        "bitwise" when every result is bit-identical, else "close MAXREL" (rank 0).
    compressed: fp16 and bf16 sums of float32 buffers; every rank must hold the same bytes
        (`check_identical`) and be within a few 16-bit roundings of the exact sum; prints
        "OK" (rank 0).
"""

import sys

import numpy as np

from dpvit.parallel.comm import init_comm
from dpvit.parallel.gradsync import GradSync

NUMEL, EXTRAS = 50_003, 4


def gradient(rank: int, step: int, dtype: str) -> np.ndarray:
    rng = np.random.default_rng(1000 * step + rank)
    values = rng.standard_normal(NUMEL + EXTRAS) * 10.0 ** rng.uniform(-6, 2, NUMEL + EXTRAS)
    return values.astype(dtype)


def run_sync(comm, buf: np.ndarray, bucket_mb: float, compression: str = "none") -> GradSync:
    sync = GradSync(comm, buf, NUMEL, bucket_mb=bucket_mb, compression=compression)
    sync.begin()
    for offset in range(NUMEL, -1, -7_001):  # backward completes the buffer from its end
        sync.ready(max(offset, 0))
    sync.finish()
    return sync


def equal(comm) -> None:
    worst, bitwise = 0.0, True
    for step, bucket_mb in enumerate((0.0, 0.01, 0.05, 0.1, 1.0)):
        reference = gradient(comm.rank, step, "float64")
        comm.allreduce_sum_(reference)
        buf = gradient(comm.rank, step, "float64")
        run_sync(comm, buf, bucket_mb)
        bitwise &= buf.tobytes() == reference.tobytes()
        worst = max(worst, float(np.max(np.abs(buf - reference) / np.abs(reference))))
        comm.check_identical(buf, f"bucketed sums ({bucket_mb} MiB)")
    worst = comm.allreduce_max(worst)
    bitwise = comm.allreduce_min(int(bitwise))
    if comm.is_root:
        print("bitwise" if bitwise else f"close {worst:.3g}", flush=True)


def compressed(comm) -> None:
    for kind in ("fp16", "bf16"):
        for bucket_mb in (0.0, 0.03):
            exact = gradient(comm.rank, 7, "float64")
            comm.allreduce_sum_(exact)
            buf = gradient(comm.rank, 7, "float32")
            sync = run_sync(comm, buf, bucket_mb, kind)
            comm.check_identical(buf, f"{kind} sums")
            np.testing.assert_allclose(buf[NUMEL:], exact[NUMEL:], rtol=1e-6)  # extras exact
            # each value is within 16-bit roundings of its chunk's largest magnitude
            tolerance = (2.0**-8 if kind == "bf16" else 2.0**-10) * comm.size
            scale = np.max(np.abs(exact[:NUMEL]))
            assert np.max(np.abs(buf[:NUMEL] - exact[:NUMEL])) < tolerance * scale, kind
            # the residual is what rounding lost: the sum over ranks of (sent + residual)
            # is the exact sum
            rest = comm.allgather_array(sync._next_residual).sum(axis=0, dtype=np.float64)
            err = np.abs(buf[:NUMEL] + rest - exact[:NUMEL])
            assert np.max(err) < 1e-5 * scale, (kind, np.max(err) / scale)
    if comm.is_root:
        print("OK", flush=True)


if __name__ == "__main__":
    comm = init_comm()
    {"equal": equal, "compressed": compressed}[sys.argv[1]](comm)
