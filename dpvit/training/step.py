"""One data-parallel training step (docs/design.md, "The data-parallel step").

The trainer runs it on its batches and ``python -m dpvit.bench`` times it on a synthetic batch,
so the benchmark measures the code that trains. Rank ``r`` runs forward and backward of its
share of the global batch on its replicas, each part's loss divided by the *global* batch size;
one in-place ``Allreduce`` sums the gradient buffer, whose extra slots carry the loss, the
count of correct predictions and the stop votes; every rank then clips and updates on
identical numbers.

With ``bucket_mb`` > 0 or a ``grad_compression``, `dpvit.parallel.gradsync.GradSync` sums the
buffer instead, in buckets started during backward (when this rank runs one replica on one
micro-batch; after backward otherwise), optionally in 16 bits with error feedback.

With a sharded optimizer (``--shard-optimizer``), `dpvit.parallel.shard.ShardedStep` replaces
the allreduce: a reduce-scatter gives each rank the summed gradient of its slice, the extras
and the global norm are agreed in one small allgather, the optimizer updates the slice and an
allgather spreads the updated parameters.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from dpvit.nn.losses import CrossEntropyLoss
from dpvit.optim import Optimizer, clip_grad_norm_, clip_to_norm_
from dpvit.parallel.comm import Comm
from dpvit.parallel.gradsync import GradSync
from dpvit.parallel.replicas import MICRO_BATCH, Replicas
from dpvit.parallel.shard import ShardedStep
from dpvit.training import timeline
from dpvit.training.guard import STOP_SIGNALS, StopSignals, agreed_signal, stop_votes
from dpvit.training.nonfinite import check_finite
from dpvit.vit import VisionTransformer

#: Numbers summed across ranks in the gradient allreduce, after the gradients: the loss, the
#: count of correct predictions, and one vote per stop signal (`stop_votes`).
STEP_EXTRAS = 2 + len(STOP_SIGNALS)


@dataclass
class StepResult:
    """What the ranks agreed on in one step (identical on every rank)."""

    loss: float  # the global batch's loss (each part's loss is over the global batch size)
    correct: float  # correct predictions in the global batch
    grad_norm: float  # global L2 norm of the gradient before clipping
    stop_signal: int  # a stop signal any rank received (0: none)
    updated: bool  # False when ``may_update`` refused the update (a non-finite step)


class TrainStep:
    """Forward/backward of this rank's share on its replicas, one allreduce, clip, update.

    It extends the model's gradient buffer by `STEP_EXTRAS` slots and builds the replicas
    (``self.replicas``) over the model, so create it before the first backward. It adds the
    seconds spent in forward/backward and in the allreduce to ``compute_seconds`` and
    ``allreduce_seconds`` (the benchmark reads and resets them).

    Args:
        model: the rank's model (replica 0).
        comm: the job's communicator; ``comm.threads`` replicas share this rank's work.
        optimizer: updates ``model``'s parameters from its summed gradients; one with a
            ``shard`` (this rank's slice) makes the step sharded (`ShardedStep`), which sums
            the whole gradient in one reduce-scatter, so not with buckets or compression.
        loss_fn: returns ``(loss, dlogits)`` for logits, labels and a denominator.
        batch_size: images per step over all ranks (the global batch).
        grad_clip: the most global gradient norm (0: no clipping).
        seed: the run's seed (dropout is keyed by seed, step and sample index).
        micro_batch: most images per forward/backward pass (see `Replicas`).
        bucket_mb: gradient allreduce in buckets of about this many MiB, overlapped with
            backward where possible (0: one blocking allreduce after backward).
        grad_compression: "none", "fp16" or "bf16": 16-bit gradients on the wire, with error
            feedback (`GradSync`; its residual is ``self.sync.residual``).
        on_span: ``on_span(name, start, end)`` for each bucket's allreduce (a timeline).
    """

    def __init__(self, model: VisionTransformer, comm: Comm, optimizer: Optimizer,
                 loss_fn: CrossEntropyLoss, *, batch_size: int, grad_clip: float, seed: int,
                 micro_batch: int = MICRO_BATCH, bucket_mb: float = 0.0,
                 grad_compression: str = "none",
                 on_span: Callable[[str, float, float], None] | None = None) -> None:
        self.comm, self.optimizer, self.loss_fn = comm, optimizer, loss_fn
        self.batch_size, self.grad_clip, self.seed = batch_size, grad_clip, seed
        self.store = model.store
        # before the replicas read the gradient buffer: the extras travel in the same allreduce
        self.extras = self.store.extend_grads(STEP_EXTRAS)
        self.replicas = Replicas(model, comm.threads, micro_batch)
        self.micro_batch = micro_batch
        self.sync = None
        self.sharded = None
        if optimizer.shard is not None:
            if bucket_mb > 0 or grad_compression != "none":
                raise ValueError("a sharded optimizer sums the gradient in one reduce-scatter: "
                                 "no buckets or compression")
            self.sharded = ShardedStep(comm, self.store, optimizer.shard)
        elif bucket_mb > 0 or grad_compression != "none":
            self.sync = GradSync(comm, self.store.grad_buffer, self.store.numel,
                                 bucket_mb=bucket_mb, compression=grad_compression,
                                 on_span=on_span)
        self.step = 0  # the step being taken (0-based), for the dropout keys
        self.compute_seconds = self.allreduce_seconds = 0.0
        self._overlap_stop: StopSignals | None = None
        self._overlapping = False
        self._extras_set = False

    def overlaps(self, share: int) -> bool:
        """Whether this step's buckets start during backward: only when one backward pass
        (one replica, one micro-batch) produces this rank's whole gradient."""
        return (self.sync is not None and len(self.replicas.models) == 1
                and (not self.micro_batch or share <= self.micro_batch))

    def forward_backward_part(self, model: VisionTransformer, indices: np.ndarray,
                              x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
        """Forward/backward of one part of this rank's share on one replica (its thread).

        Returns the part's loss (over the global batch size) and its correct count.
        """
        model.set_dropout_keys(self.seed, self.step, indices)
        logits = model.forward(x.astype(self.store.dtype, copy=False), train=True)
        loss, dlogits = self.loss_fn(logits, y, denominator=self.batch_size)
        correct = float(np.count_nonzero(logits.argmax(axis=1) == y))
        if self._overlapping:
            # the first bucket (or the compressed mode's extras) starts after the head's
            # backward and carries the extras, so they are final already
            self.extras[:] = [loss, correct, *stop_votes(self._overlap_stop)]
            self._extras_set = True
            model.backward(dlogits, input_grad=False, on_ready=self.sync.ready)
        else:
            model.backward(dlogits, input_grad=False)
        return loss, correct

    def __call__(self, step: int, indices: np.ndarray, x: np.ndarray, y: np.ndarray,
                 lr: float, stop: StopSignals | None = None,
                 may_update: Callable[[float, float], bool] | None = None) -> StepResult:
        """Take step number ``step`` (0-based) on this rank's share ``x``, ``y`` (global sample
        ``indices``) at learning rate ``lr``.

        ``stop`` is this rank's signal flag (its vote travels in the allreduce);
        ``may_update(loss, grad_norm)`` may refuse the update (the parameters and optimizer
        state then stay as they were); None always updates.
        """
        self.step = step
        start = time.perf_counter()
        if self.sync is not None:
            self.sync.begin()
            self._overlapping, self._overlap_stop = self.overlaps(len(indices)), stop
            self._extras_set = False
        # a rank can get no samples when batch_size < world size: its gradients stay zero
        loss, correct = self.replicas.forward_backward(self.forward_backward_part, indices, x, y)
        if not self._extras_set:
            self.extras[:] = [loss, correct, *stop_votes(stop)]
        reduce_start = time.perf_counter()
        if self.sharded is not None:
            grad_norm = self.sharded.reduce()  # this rank's slice, the extras, the global norm
        elif self.sync is None:
            self.comm.allreduce_sum_(self.store.grad_buffer)
        else:
            self.sync.finish()
            self._overlapping, self._extras_set = False, False
        reduced = time.perf_counter()
        self.allreduce_seconds += reduced - reduce_start
        self.compute_seconds += reduce_start - start
        loss, correct = float(self.extras[0]), float(self.extras[1])
        if self.sharded is not None:
            clip_to_norm_(self.sharded.own_grads(), grad_norm, self.grad_clip)
        else:
            grad_norm = clip_grad_norm_(self.store.flat_grads, self.grad_clip)
        updated = may_update is None or may_update(loss, grad_norm)
        if self.sync is not None:
            self.sync.commit(updated)
        gather_start = gathered = 0.0
        if updated:
            self.optimizer.lr = lr
            self.optimizer.step()
            if self.sharded is not None:
                gather_start = time.perf_counter()
                self.sharded.gather_params()
                gathered = time.perf_counter()
                self.allreduce_seconds += gathered - gather_start
            check_finite({"parameters": self.store.flat_params}, step + 1)
        if timeline.recording():  # --timeline: this step's spans, from the times taken above
            timeline.record("forward/backward", start, reduce_start)
            # the one allreduce; GradSync's buckets are recorded by its on_span (comm_span); a
            # sharded step's two halves keep the prefix, so the trace colours them as comm
            name = ("allreduce: reduce-scatter" if self.sharded is not None
                    else "allreduce" if self.sync is None else "allreduce wait")
            timeline.record(name, reduce_start, reduced,
                            track="comm" if self.sync is None else None)
            timeline.record("clip + optimizer", reduced, gather_start or time.perf_counter())
            if gathered:
                timeline.record("allreduce: allgather", gather_start, gathered, track="comm")
        return StepResult(loss, correct, grad_norm, agreed_signal(self.extras[2:]), updated)
