"""The gradient allreduce in buckets, overlapped with backward, optionally in 16 bits.

`GradSync` sums the gradient buffer over the ranks in *buckets*: contiguous slices of
``ParamStore.grad_buffer`` of about ``bucket_mb`` MiB, cut from the END of the buffer, because
backward produces the gradients in that order (head, norm, the last block first, ...,
patch embedding). The model's backward calls `GradSync.ready` after each part
(``VisionTransformer.backward(on_ready=...)``); every bucket whose slice is then complete is
started as a nonblocking collective at once, and the pending ones are tested between layers,
because MPICH moves a nonblocking collective on only inside MPI calls. `GradSync.finish` waits
for the rest after backward. Every rank runs the same kinds of collectives in the same order
(nonblocking, in bucket order), as MPI requires.

A bucket is complete only once *every* part of this rank's share has been through backward, so
overlap needs a rank that runs one model replica on one micro-batch (the trainer's case on a
cluster: one rank per host with ``DPVIT_NUM_THREADS=1``, or one rank per core); otherwise
the buckets start after backward, still bucketed.

Compression (``fp16``/``bf16``) sends 16-bit values and sums in float32 in a fixed rank order,
so every rank gets the same bytes, with the traffic of a ring allreduce at half the bytes:

1. each rank adds its error-feedback residual to the bucket, cuts it into ``size`` chunks,
   encodes each chunk in 16 bits and keeps what the rounding lost as its new residual;
2. an all-to-all of the 16-bit chunks: rank r receives every rank's chunk r;
3. rank r decodes them and sums them in float32 in rank order 0, 1, ..., then encodes the sum
   in 16 bits (what that rounding loses is added to rank r's residual too, so it is sent
   again next step);
4. an allgather of the encoded sums (on a second channel, so that phase 2 of one bucket and
   phase 1 of the next may interleave differently on different ranks); every rank decodes
   the same bytes.

Encodings (a chunk travels as one uint16 header word and its values):

- ``fp16``: IEEE half precision (numpy's float16, round to nearest even) of the chunk times
  2^e, where e (the header, an int16) puts the chunk's largest magnitude in [2^14, 2^15):
  a power of two, so scaling is exact; the largest value cannot overflow (65504), and values
  2^-24 below the chunk's maximum are still represented (subnormals) instead of flushing to
  zero. Per-chunk scales need no extra collective (a global max-abs would) and adapt to
  each chunk's range; a fixed loss scale would need an overflow check and a retry.
- ``bf16``: the top 16 bits of the float32 (numpy has no bfloat16), rounded to nearest even
  (`bf16_bits`); it keeps float32's exponent range, so e is 0.

Error feedback: the residual (float32, the size of the gradient, one per rank) is added to the
next step's gradient before rounding, so what rounding drops is delayed, not lost: over many
steps the sum of the decoded gradients tracks the sum of the true ones. A step whose update is
refused (non-finite) keeps the previous residual (`commit`). The residual is checkpointed
per rank (`dpvit.training.trainer`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from dpvit.parallel.comm import Comm

COMPRESSIONS = ("none", "fp16", "bf16")

#: fp16 chunks are scaled so that their largest magnitude lies in [2^(FP16_TOP-1), 2^FP16_TOP).
FP16_TOP = 15


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) of float32 ``x``, rounded to nearest, ties to even
    (as torch's ``x.to(torch.bfloat16)``); NaN stays a quiet NaN."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((bits + (((bits >> 16) & 1) + 0x7FFF)) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        rounded[nan] = ((bits[nan] >> 16) | 0x0040).astype(np.uint16)
    return rounded


def bf16_value(bits: np.ndarray) -> np.ndarray:
    """float32 values of bfloat16 bit patterns."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


class Codec:
    """Encodes rows of float32 into rows of uint16: a header word (the int16 exponent e) and
    the values times 2^e in 16 bits; decodes back to float32."""

    def __init__(self, kind: str) -> None:
        if kind not in ("fp16", "bf16"):
            raise ValueError(f"unknown compression {kind!r}; choose fp16 or bf16")
        self.kind = kind

    def exponents(self, rows: np.ndarray) -> np.ndarray:
        """Per row, the power of two that scales it into range (0 for bf16, a zero row or a
        non-finite one, which then stays non-finite and the step is skipped)."""
        if self.kind == "bf16":
            return np.zeros(rows.shape[0], dtype=np.int32)
        peak = np.max(np.abs(rows), axis=1) if rows.shape[1] else np.zeros(rows.shape[0])
        _, k = np.frexp(peak)  # peak < 2^k
        ok = np.isfinite(peak) & (peak > 0)
        return np.where(ok, FP16_TOP - k, 0).astype(np.int32)

    def encode(self, rows: np.ndarray, out: np.ndarray) -> None:
        """``rows`` (n, c) float32 into ``out`` (n, c + 1) uint16."""
        e = self.exponents(rows)
        out[:, 0] = e.astype(np.int16).view(np.uint16)
        if self.kind == "bf16":
            out[:, 1:] = bf16_bits(rows)
        else:
            with np.errstate(over="ignore", invalid="ignore"):
                out[:, 1:] = np.ldexp(rows, e[:, None]).astype(np.float16).view(np.uint16)

    def decode(self, words: np.ndarray) -> np.ndarray:
        """``words`` (n, c + 1) uint16 into (n, c) float32."""
        e = words[:, :1].view(np.int16).astype(np.int32)
        if self.kind == "bf16":
            return bf16_value(np.ascontiguousarray(words[:, 1:]))
        values = np.ascontiguousarray(words[:, 1:]).view(np.float16).astype(np.float32)
        return np.ldexp(values, -e).astype(np.float32)

    def round_trip(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(the encoded words, their decoded values) of ``rows``."""
        words = np.empty((rows.shape[0], rows.shape[1] + 1), dtype=np.uint16)
        self.encode(rows, words)
        return words, self.decode(words)


@dataclass
class Bucket:
    """The slice ``[start, stop)`` of the gradient buffer and its collective in flight."""

    start: int
    stop: int
    requests: list = field(default_factory=list)
    stage: int = 0  # 0 not started, 1 first collective in flight, 2 second, 3 done
    started_at: float = 0.0
    done_at: float = 0.0
    # compression: the chunks sent and received, the encoded sum, the gathered sums
    send: np.ndarray | None = None
    recv: np.ndarray | None = None
    mine: np.ndarray | None = None
    gathered: np.ndarray | None = None


def bucket_bounds(numel: int, itemsize: int, bucket_mb: float) -> list[tuple[int, int]]:
    """Contiguous slices of ``[0, numel)`` of about ``bucket_mb`` MiB each, from the end of the
    buffer (the order backward produces them); one slice for ``bucket_mb`` 0."""
    size = numel if bucket_mb <= 0 else max(1, int(bucket_mb * 2**20 / itemsize))
    bounds, stop = [], numel
    while stop > 0:
        start = max(0, stop - size)
        if 0 < start < size // 4:  # no sliver at the front: fold it into this bucket
            start = 0
        bounds.append((start, stop))
        stop = start
    return bounds


class GradSync:
    """Sums ``grad_buffer`` (the gradients, then ``extras`` slots) over the ranks in buckets.

    Per step: `begin`, then `ready(offset)` as backward completes the gradients from
    ``offset`` to the end (optional: `finish` starts whatever has not started), `finish`, and
    after the update decision `commit`.

    Args:
        comm: the job's communicator (opens a second channel for compression: collective).
        grad_buffer: the flat gradient buffer, ``numel`` gradients then the extras.
        numel: how many of its values are gradients.
        bucket_mb: bucket size in MiB of the buffer's dtype (0: one bucket).
        compression: "none", "fp16" or "bf16".
        on_span: ``on_span(name, start, end)`` (perf_counter seconds) per bucket, for a
            timeline; None: not recorded.
    """

    def __init__(self, comm: Comm, grad_buffer: np.ndarray, numel: int, *, bucket_mb: float,
                 compression: str = "none",
                 on_span: Callable[[str, float, float], None] | None = None) -> None:
        if compression not in COMPRESSIONS:
            raise ValueError(f"unknown compression {compression!r}; choose from {COMPRESSIONS}")
        self.comm, self.buffer, self.numel = comm, grad_buffer, numel
        self.compression = compression
        self.codec = None if compression == "none" else Codec(compression)
        self.on_span = on_span
        self.bounds = bucket_bounds(numel, grad_buffer.dtype.itemsize, bucket_mb)
        self.extras = grad_buffer[numel:]
        self.residual = np.zeros(numel, dtype=np.float32) if self.codec else None
        self._next_residual = np.zeros_like(self.residual) if self.codec else None
        self._gather_channel = comm.open_channel() if self.codec else 0
        self.buckets: list[Bucket] = []
        self._extras_request = None
        self.exposed_seconds = 0.0  # time spent in `finish` (communication not hidden)

    # -- the step ------------------------------------------------------------------------------

    def begin(self) -> None:
        """A new step: no bucket started."""
        self.buckets = [Bucket(a, b) for a, b in self.bounds]
        self._extras_request = None
        self._started = 0

    def ready(self, offset: int) -> None:
        """Backward has completed every gradient from ``offset`` on: start the buckets that
        lie there (in order), and let MPI progress the ones in flight."""
        while self._started < len(self.buckets) and self.buckets[self._started].start >= offset:
            self._start(self.buckets[self._started])
            self._started += 1
        self._progress()

    def finish(self) -> None:
        """Start what has not started, wait for everything; the buffer then holds the sums."""
        begun = time.perf_counter()
        self.ready(0)
        what = f"the gradient allreduce ({len(self.buckets)} bucket(s))"
        if self.codec is None:
            self.comm.wait_all([self._extras_request, *(b.requests[0] for b in self.buckets)],
                               what)
            now = time.perf_counter()
            for bucket in self.buckets:
                bucket.done_at = bucket.done_at or now
        else:
            self.comm.wait_all([self._extras_request], what)
            for bucket in self.buckets:  # in bucket order: the second channel's order
                if bucket.stage == 1:
                    self.comm.wait_all(bucket.requests, what)
                    self._sum_chunks(bucket)
            for bucket in self.buckets:
                if bucket.stage == 2:
                    self.comm.wait_all(bucket.requests, what)
                    self._unpack(bucket)
        if self.on_span is not None:
            for i, bucket in enumerate(self.buckets):
                self.on_span(f"allreduce bucket {i} ({bucket.stop - bucket.start} values)",
                             bucket.started_at, bucket.done_at)
        self.exposed_seconds += time.perf_counter() - begun

    def commit(self, updated: bool) -> None:
        """Keep this step's residual if its update was taken; else the previous one stays."""
        if self.codec is not None and updated:
            self.residual, self._next_residual = self._next_residual, self.residual

    # -- buckets -------------------------------------------------------------------------------

    def _start(self, bucket: Bucket) -> None:
        bucket.started_at = time.perf_counter()
        with np.errstate(invalid="ignore", over="ignore"):  # a non-finite step is skipped
            self._start_bucket(bucket)

    def _start_bucket(self, bucket: Bucket) -> None:
        if self.codec is None:
            # the extras (loss, correct count, stop votes) travel with the first bucket, which
            # ends where the gradients end
            stop = len(self.buffer) if bucket.stop == self.numel else bucket.stop
            bucket.requests = [self.comm.iallreduce_sum_(self.buffer[bucket.start : stop])]
            bucket.stage = 2
            return
        if self._extras_request is None and len(self.extras):
            # exact, in the buffer's dtype, before the first bucket on every rank
            self._extras_request = self.comm.iallreduce_sum_(self.extras)
        size, n = self.comm.size, bucket.stop - bucket.start
        chunk = -(-n // size)
        rows = np.zeros((size, chunk), dtype=np.float32)
        flat = rows.reshape(-1)
        flat[:n] = self.buffer[bucket.start : bucket.stop]
        flat[:n] += self.residual[bucket.start : bucket.stop]
        bucket.send = np.empty((size, chunk + 1), dtype=np.uint16)
        self.codec.encode(rows, bucket.send)
        sent = self.codec.decode(bucket.send).reshape(-1)
        self._next_residual[bucket.start : bucket.stop] = flat[:n] - sent[:n]
        bucket.recv = np.empty_like(bucket.send)
        bucket.requests = [self.comm.ialltoall(bucket.send, bucket.recv)]
        bucket.stage = 1

    def _sum_chunks(self, bucket: Bucket) -> None:
        """Phase 2 of a compressed bucket: sum this rank's chunk of every rank in rank order,
        encode the sum, keep its rounding in the residual, start the allgather."""
        with np.errstate(invalid="ignore", over="ignore"):  # a non-finite step is skipped
            self._sum_received(bucket)

    def _sum_received(self, bucket: Bucket) -> None:
        received = self.codec.decode(bucket.recv)
        total = received[0].copy()
        for row in received[1:]:
            total += row
        bucket.mine = np.empty((1, total.size + 1), dtype=np.uint16)
        self.codec.encode(total[None], bucket.mine)
        lost = total - self.codec.decode(bucket.mine)[0]
        chunk, rank = total.size, self.comm.rank
        own = slice(bucket.start + rank * chunk, min(bucket.start + (rank + 1) * chunk,
                                                     bucket.stop))
        if own.stop > own.start:
            self._next_residual[own] += lost[: own.stop - own.start]
        bucket.gathered = np.empty((self.comm.size, chunk + 1), dtype=np.uint16)
        bucket.requests = [self.comm.iallgather(bucket.mine, bucket.gathered,
                                                channel=self._gather_channel)]
        bucket.stage = 2

    def _unpack(self, bucket: Bucket) -> None:
        n = bucket.stop - bucket.start
        self.buffer[bucket.start : bucket.stop] = self.codec.decode(bucket.gathered).reshape(-1)[:n]
        bucket.stage = 3
        bucket.done_at = time.perf_counter()

    def _progress(self) -> None:
        """Test the oldest collectives in flight (MPICH progresses all of them inside any
        test); a compressed bucket whose all-to-all completed goes on to its allgather, in
        bucket order."""
        for bucket in self.buckets[: self._started]:
            if bucket.stage == 3:
                continue
            if not self.comm.test(bucket.requests[0]):
                return
            if bucket.stage == 1:
                self._sum_chunks(bucket)
            elif self.codec is None:
                bucket.stage, bucket.done_at = 3, time.perf_counter()
            else:
                self._unpack(bucket)

    # -- checkpoint ----------------------------------------------------------------------------

    def gather_residuals(self) -> np.ndarray | None:
        """Every rank's residual, (size, numel), on every rank (collective); None without
        compression."""
        if self.codec is None:
            return None
        return self.comm.allgather_array(self.residual)

    def load_residuals(self, saved: np.ndarray | None) -> None:
        """Set this rank's residual from the residuals of a checkpoint's ranks, (old size,
        numel), on every rank: the same world size gets its own row back (bit-identical
        resume); another folds old rank r' into new rank r' mod size (the sum over ranks, which
        is what error feedback delays, is kept); None (an uncompressed checkpoint) zeroes it."""
        if self.codec is None:
            return
        self.residual[:] = 0
        if saved is None:
            return
        for old_rank in range(self.comm.rank, saved.shape[0], self.comm.size):
            self.residual += saved[old_rank]
