"""Measurements behind ``python -m dpvit.bench``: step throughput, per-layer times, GEMM peak.

Everything here runs on every rank with the same collectives, so it works under mpirun; timings
that differ across ranks are reduced to the slowest rank, which is what bounds a synchronous
data-parallel step.
"""

from __future__ import annotations

import contextlib
import resource
import statistics
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from dpvit.nn.attention import Attention
from dpvit.nn.layers import GELU, LayerNorm, Linear
from dpvit.nn.losses import CrossEntropyLoss
from dpvit.nn.patch_embed import PatchEmbed
from dpvit.optim import AdamW
from dpvit.parallel.comm import Comm
from dpvit.parallel.replicas import MICRO_BATCH
from dpvit.training.step import TrainStep
from dpvit.vit import Mlp, VisionTransformer, ViTConfig

#: The benchmark's learning rate, as the PyTorch reference's AdamW.
LR = 1e-3


def gemm_peak_flops(size: int = 1024, repeats: int = 5) -> float:
    """Best float32 GEMM FLOP/s of this process with its current BLAS threads."""
    rng = np.random.default_rng(0)
    a = rng.random((size, size), dtype=np.float32)
    b = rng.random((size, size), dtype=np.float32)
    out = a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        np.matmul(a, b, out=out)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def peak_rss_bytes() -> int:
    """Peak resident memory of this process (ru_maxrss is KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


@dataclass
class StepTimes:
    """Seconds per repeat of ``steps`` training steps; seconds in all of them spent in the
    allreduce (the rank that spent most) and in forward/backward (the fastest and the slowest
    rank)."""

    repeats: list[float]
    allreduce: float
    steps: int
    compute_fastest: float
    compute_slowest: float


class StepBench:
    """The trainer's own step (`dpvit.training.step.TrainStep`: zero grads, forward, loss,
    backward, gradient allreduce, clipping, AdamW) on a fixed synthetic batch, the work the
    PyTorch reference measures.

    Args:
        cfg: model shape.
        comm: communicator; the global batch is ``batch_per_rank * comm.size``.
        batch_per_rank: images per rank per step.
        dtype: float32 or float64.
        micro_batch: most images per forward/backward pass (see ``dpvit.parallel.replicas``).
        bucket_mb, grad_compression: the gradient allreduce (see ``TrainStep``).
    """

    def __init__(self, cfg: ViTConfig, comm: Comm, batch_per_rank: int,
                 dtype: str = "float32", micro_batch: int = MICRO_BATCH,
                 bucket_mb: float = 0.0, grad_compression: str = "none") -> None:
        self.comm = comm
        self.model = VisionTransformer(cfg, np.dtype(dtype), seed=0)
        self.optimizer = AdamW(self.model.store, lr=LR)
        self.train_step = TrainStep(self.model, comm, self.optimizer, CrossEntropyLoss(),
                                    batch_size=batch_per_rank * comm.size, grad_clip=1.0,
                                    seed=0, micro_batch=micro_batch, bucket_mb=bucket_mb,
                                    grad_compression=grad_compression)
        rng = np.random.default_rng(comm.rank)
        shape = (batch_per_rank, cfg.in_chans, cfg.img_size, cfg.img_size)
        self.x = rng.random(shape).astype(dtype)
        self.y = rng.integers(0, cfg.num_classes, batch_per_rank)
        self.indices = comm.rank * batch_per_rank + np.arange(batch_per_rank)
        self.steps = 0

    def step(self) -> None:
        self.train_step(self.steps, self.indices, self.x, self.y, LR)
        self.steps += 1

    def run(self, steps: int, warmup: int, repeats: int) -> StepTimes:
        """Time ``repeats`` blocks of ``steps`` steps after ``warmup`` untimed ones."""
        for _ in range(warmup):
            self.step()
        timed = self.train_step
        timed.compute_seconds = timed.allreduce_seconds = 0.0
        times = []
        for _ in range(repeats):
            self.comm.barrier()
            start = time.perf_counter()
            for _ in range(steps):
                self.step()
            times.append(self.comm.allreduce_max(time.perf_counter() - start))
        return StepTimes(times, self.comm.allreduce_max(timed.allreduce_seconds), steps,
                         self.comm.allreduce_min(timed.compute_seconds),
                         self.comm.allreduce_max(timed.compute_seconds))


def summarize(times: StepTimes, images_per_step: int) -> dict[str, float]:
    """images/s as median and spread over the repeats, the allreduce share of time, and the
    forward/backward time per step of the fastest and the slowest rank."""
    rates = [images_per_step * times.steps / t for t in times.repeats]
    steps = times.steps * len(times.repeats)
    return {
        "images_per_s": statistics.median(rates),
        "images_per_s_min": min(rates),
        "images_per_s_max": max(rates),
        "step_ms": 1e3 * statistics.median(times.repeats) / times.steps,
        "allreduce_share": times.allreduce / sum(times.repeats),
        # ranks compute the same work; a synchronous step goes at the slowest one's pace
        "compute_ms_fastest_rank": 1e3 * times.compute_fastest / steps,
        "compute_ms_slowest_rank": 1e3 * times.compute_slowest / steps,
    }


#: The layer types whose forward/backward time the per-layer table reports. Containers are
#: timed inclusive of their children (Attention includes its qkv and proj Linears).
TIMED_LAYERS = (PatchEmbed, LayerNorm, Attention, Mlp, Linear, GELU)


@contextlib.contextmanager
def layer_timer() -> Iterator[dict[str, float]]:
    """Temporarily wrap the forward/backward of ``TIMED_LAYERS`` to accumulate seconds."""
    totals: dict[str, float] = defaultdict(float)
    lock = threading.Lock()  # replica threads add to the same totals
    originals = []
    for cls in TIMED_LAYERS:
        fwd, bwd = cls.forward, cls.backward
        originals.append((cls, fwd, bwd))

        def timed_fwd(self, x, train, *args, _f=fwd, _key=f"{cls.__name__}.forward"):
            start = time.perf_counter()
            out = _f(self, x, train, *args)
            with lock:
                totals[_key] += time.perf_counter() - start
            return out

        def timed_bwd(self, dy, *args, _b=bwd, _key=f"{cls.__name__}.backward", **kwargs):
            start = time.perf_counter()
            out = _b(self, dy, *args, **kwargs)
            with lock:
                totals[_key] += time.perf_counter() - start
            return out

        cls.forward, cls.backward = timed_fwd, timed_bwd
    try:
        yield totals
    finally:
        for cls, fwd, bwd in originals:
            cls.forward, cls.backward = fwd, bwd


def layer_table(bench: StepBench, steps: int) -> list[dict[str, float | str]]:
    """Milliseconds per step in each layer type's forward and backward (this rank; with
    replica threads, the sum of their times)."""
    with layer_timer() as totals:
        for _ in range(steps):
            bench.step()
    return [{"layer": key, "ms_per_step": 1e3 * seconds / steps}
            for key, seconds in sorted(totals.items(), key=lambda kv: -kv[1])]


def allreduce_ms(bench: StepBench, calls: int, warmup: int = 3) -> float:
    """Median milliseconds (slowest rank) of summing ``bench``'s gradient buffer the way its
    step does (one allreduce, or `GradSync`'s buckets started back to back), alone: no
    backward to hide behind."""
    step, times = bench.train_step, []
    buf = step.store.grad_buffer
    saved = buf.copy()
    for i in range(warmup + calls):
        buf[:] = saved  # the same values every call (compression's cost depends on them)
        bench.comm.barrier()
        start = time.perf_counter()
        if step.sync is None:
            bench.comm.allreduce_sum_(buf)
        else:
            step.sync.begin()
            step.sync.finish()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    buf[:] = saved
    if step.sync is not None:
        step.sync.exposed_seconds = 0.0
    return 1e3 * bench.comm.allreduce_max(statistics.median(times))


def comm_table(cfg: ViTConfig, comm: Comm, batch_per_rank: int, settings: list[tuple[float, str]],
               steps: int, warmup: int, repeats: int, micro_batch: int = MICRO_BATCH
               ) -> list[dict[str, float | str | bool]]:
    """Per (bucket MiB, compression): the allreduce alone (ms), the training step with it
    (images/s, ms), the communication the step still waits for after backward (ms), and the
    share of the allreduce hidden behind backward, 1 - exposed / alone (0 when not
    overlapped)."""
    rows = []
    for bucket_mb, compression in settings:
        bench = StepBench(cfg, comm, batch_per_rank, micro_batch=micro_batch,
                          bucket_mb=bucket_mb, grad_compression=compression)
        alone = allreduce_ms(bench, calls=max(10, steps))
        times = bench.run(steps, warmup, repeats)
        result = summarize(times, batch_per_rank * comm.size)
        exposed = 1e3 * times.allreduce / (times.steps * len(times.repeats))
        rows.append({
            "bucket_mb": bucket_mb, "compression": compression,
            "buckets": len(bench.train_step.sync.bounds) if bench.train_step.sync else 1,
            "overlapped": bench.train_step.overlaps(batch_per_rank),
            "allreduce_ms": alone, "exposed_ms": exposed,
            "hidden_share": max(0.0, 1.0 - exposed / alone) if alone > 0 else 0.0,
            "images_per_s": result["images_per_s"], "step_ms": result["step_ms"],
        })
    return rows
