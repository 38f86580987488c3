"""The data-parallel training loop (docs/design.md, "The data-parallel step").

Every rank holds the whole model and runs the same number of steps. Per step, rank ``r``
computes the loss gradient of its part of the global batch, divided by the *global* batch size;
one in-place ``Allreduce`` sums the ranks' gradients into the gradient of the global mean; then
every rank clips and steps the optimizer on identical numbers, so the parameters stay
identical (checked by checksum every ``log_every`` steps and at each epoch end).
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dpvit.checkpoint import Checkpoint, restore_arrays, save_rolling
from dpvit.config import Config
from dpvit.data import (
    DATASETS,
    BatchIterator,
    load_split,
    prepare_dataset,
    train_batches,
)
from dpvit.flops import training_compute
from dpvit.inference import Evaluation, evaluate_model
from dpvit.nn.losses import CrossEntropyLoss
from dpvit.optim import build_optimizer
from dpvit.parallel.comm import Comm
from dpvit.parallel.shard import Shard, gather_state, spread_state
from dpvit.report import ReportContext, write_report
from dpvit.training import timeline
from dpvit.training.debug import gradient_spot_check, watch_non_finite
from dpvit.training.ema import WeightAverage
from dpvit.training.guard import StopSignals, preempted
from dpvit.training.metrics_log import MetricsLog
from dpvit.training.nonfinite import NonFiniteSteps, check_finite
from dpvit.training.progress import TrainingProgress, choose_mode
from dpvit.training.schedule import Schedule
from dpvit.training.step import TrainStep
from dpvit.training.tensorboard import TensorBoardLog
from dpvit.vit import VisionTransformer

logger = logging.getLogger(__name__)

#: Optimizer-state name prefix of a rank's error-feedback residual in checkpoints
#: (``/optimizer/grad_residual_rank0/...``, laid out like the parameters, float32).
RESIDUAL_PREFIX = "grad_residual_rank"


@dataclass
class RunState:
    """Where a run is: what a checkpoint restores besides the parameters and optimizer."""

    step: int = 0  # optimizer steps taken (skipped ones included)
    epoch: int = 0  # epochs completed
    step_in_epoch: int = 0  # steps taken inside the current epoch
    best_accuracy: float = -1.0  # best test accuracy so far (decides best.h5)
    history: list[dict[str, Any]] = field(default_factory=list)  # the epoch records


class Trainer:
    """Owns the model, optimizer, data and run state of one run, on one rank.

    Args:
        cfg: the resolved configuration (identical on every rank).
        comm: the job's communicator.
        run_dir: where rank 0 writes metrics, reports and checkpoints.
        stop: the job's SIGTERM/SIGINT flag; agreed across ranks at every step (its votes
            travel in the gradient allreduce).
        store_path: the dataset's store, already prepared on every rank (``prepare_dataset``;
            ``python -m dpvit.train`` prepares it before creating the run directory);
            prepared here when None.
        init_weights: rank 0's starting parameters by name (``--init-from``, read and
            shape-checked by ``dpvit.interop.weights.load_init_weights``), copied over the
            initialisation and broadcast; the optimizer starts fresh. None elsewhere.
    """

    def __init__(self, cfg: Config, comm: Comm, run_dir: Path,
                 stop: StopSignals | None = None, store_path: Path | None = None,
                 init_weights: dict[str, np.ndarray] | None = None) -> None:
        self.cfg, self.comm, self.run_dir, self.stop = cfg, comm, run_dir, stop
        t = cfg.train
        self.dtype = np.dtype(t.dtype)
        self.model = VisionTransformer(cfg.model, self.dtype, seed=t.seed)
        self.store = self.model.store
        if init_weights is not None:  # sync_parameters below spreads rank 0's to every rank
            views = self.store.named_params()
            for name, value in init_weights.items():
                views[name][...] = value
        self.optimizer = build_optimizer(
            t.optimizer, self.store, t.lr, t.weight_decay, momentum=t.momentum,
            nesterov=t.nesterov, betas=(t.beta1, t.beta2),  # --shard-optimizer: a slice's state
            shard=Shard.of(self.store.numel, comm.rank, comm.size) if t.shard_optimizer else None)
        self.loss_fn = CrossEntropyLoss(t.label_smoothing)
        # the step, also what `python -m dpvit.bench` times; it builds the replicas
        self.parallel_step = TrainStep(self.model, comm, self.optimizer, self.loss_fn,
                                       batch_size=t.batch_size, grad_clip=t.grad_clip,
                                       seed=t.seed, bucket_mb=t.bucket_mb,
                                       grad_compression=t.grad_compression,
                                       on_span=timeline.comm_span if t.timeline else None)
        self.sync = self.parallel_step.sync  # None: one blocking allreduce per step
        self._saved_residuals: np.ndarray | None = None  # rank 0, from `restore`
        self._saved_optimizer: dict[str, np.ndarray] | None = None  # rank 0, from `restore`
        self.replicas = self.parallel_step.replicas
        # --timeline: this rank's spans of a few steps (None: nothing records, nothing costs)
        self.timeline = (timeline.Timeline(t.timeline, t.timeline_steps, comm.rank,
                                           self.replicas.models) if t.timeline else None)
        if t.debug:
            for model in self.replicas.models:
                watch_non_finite(model)
        self.info = DATASETS[t.dataset]
        if store_path is None:
            store_path = prepare_dataset(t.dataset, t.data_dir, comm, store_dir=t.store_dir)
        self.train_x, self.train_y = _subset(load_split(store_path, "train"), t.train_subset)
        self.test_x, self.test_y = _subset(load_split(store_path, "test"), t.test_subset)
        self.schedule = Schedule.for_run(t, len(self.train_y))
        self.state = RunState()
        self.stop_signal = 0  # the signal the ranks agreed on in the last step (0: none)
        self.metrics = MetricsLog(run_dir / "metrics.jsonl", comm.is_root)
        self.tensorboard = TensorBoardLog(t.tensorboard, comm.is_root)  # --tensorboard
        self.bad_steps = NonFiniteSteps(t.max_bad_steps, self.metrics.append)
        # --ema-decay: the weights' moving average, the model every evaluation scores
        self.ema = WeightAverage(self.store, t.ema_decay) if t.ema_decay else None
        self.sync_parameters("initial parameters")

    # -- state ---------------------------------------------------------------------------------

    def sync_parameters(self, what: str) -> None:
        """Broadcast parameters and optimizer state from rank 0 (a sharded optimizer: each
        rank's slice of it) and prove all ranks agree."""
        self.comm.broadcast_(self.store.flat_params)
        if self.ema is not None:
            self.comm.broadcast_(self.ema.flat)
        spread_state(self.comm, self.optimizer, self._saved_optimizer)
        self._saved_optimizer = None
        self.comm.check_identical(self.store.flat_params, what)

    def checkpoint(self, optimizer_state: dict[str, np.ndarray],
                   residuals: np.ndarray | None = None) -> Checkpoint:
        """Everything needed to continue exactly (nothing in it depends on the rank count,
        except the error-feedback residuals of compressed gradients, one per rank:
        ``residuals`` from `GradSync.gather_residuals`, stored like optimizer state as
        ``grad_residual_rank<r>``). ``optimizer_state`` is the whole optimizer state from
        `gather_state` (sharded or not)."""
        _, scalars = self.optimizer.state_dict()
        buffers = optimizer_state
        if residuals is not None:
            buffers = {**buffers, **{f"{RESIDUAL_PREFIX}{r}": row
                                     for r, row in enumerate(residuals)}}
        return Checkpoint(
            params={n: v.copy() for n, v in self.store.named_params().items()},
            optimizer={k: self.store.named_views(v) for k, v in buffers.items()},
            optimizer_scalars=scalars,
            # all randomness is keyed, not stateful: shuffling by (seed, epoch), augmentation
            # by (seed, epoch, sample index), dropout by (seed, step, layer, sample index)
            rng={"scheme": "keyed", "seed": self.cfg.train.seed},
            step=self.state.step, epoch=self.state.epoch, step_in_epoch=self.state.step_in_epoch,
            world_size=self.comm.size, config=self.cfg.to_dict(),
            metrics=[*self.state.history, {"best_accuracy": self.state.best_accuracy}],
            ema={} if self.ema is None else {n: v.copy() for n, v in self.ema.named().items()},
        )

    def restore(self, ckpt: Checkpoint) -> None:
        """Load a checkpoint's state (on rank 0; ``sync_parameters`` then spreads it)."""
        restore_arrays(ckpt, "params", ckpt.params, self.store.named_params())
        if self.ema is not None and ckpt.ema:
            restore_arrays(ckpt, "ema", ckpt.ema, self.ema.named())
        elif self.ema is not None:
            logger.info("the checkpoint has no weight average: it starts at its weights")
            self.ema.flat[...] = self.store.flat_params
        buffers, residuals = {}, {}
        for state, arrays in ckpt.optimizer.items():
            if state.startswith(RESIDUAL_PREFIX):  # compressed gradients' error feedback
                rank = int(state.removeprefix(RESIDUAL_PREFIX))
                residuals[rank] = np.zeros(self.store.numel, dtype=np.float32)
                restore_arrays(ckpt, f"optimizer/{state}", arrays,
                               self.store.named_views(residuals[rank]))
                continue
            buffers[state] = np.zeros_like(self.store.flat_params)
            restore_arrays(ckpt, f"optimizer/{state}", arrays,
                           self.store.named_views(buffers[state]))
        self.optimizer.load_state_dict(buffers, ckpt.optimizer_scalars)
        self._saved_optimizer = buffers  # a sharded optimizer's other slices: sync_parameters
        self._saved_residuals = (np.stack([residuals[r] for r in sorted(residuals)])
                                 if residuals else None)
        self.state = RunState(
            step=ckpt.step, epoch=ckpt.epoch, step_in_epoch=ckpt.step_in_epoch,
            best_accuracy=next((m["best_accuracy"] for m in ckpt.metrics
                                if "best_accuracy" in m), -1.0),
            history=[m for m in ckpt.metrics if "best_accuracy" not in m])

    def restore_everywhere(self, ckpt: Checkpoint | None) -> None:
        """Rank 0 restores ``ckpt``; the state and buffers are then broadcast to every rank."""
        if self.comm.is_root and ckpt is not None:
            self.restore(ckpt)
        self.state, self.optimizer.steps = self.comm.broadcast_object(
            (self.state, self.optimizer.steps))
        self.sync_parameters(f"parameters resumed at step {self.state.step}")
        self.restore_residuals()

    def restore_residuals(self) -> None:
        """Give every rank its error-feedback residual from rank 0's checkpoint (zero from an
        uncompressed one; dropped when this run does not compress)."""
        saved = self._saved_residuals
        ranks = self.comm.broadcast_object(0 if saved is None else len(saved))
        if self.sync is None or self.sync.residual is None:
            if ranks:
                logger.info("the checkpoint's error-feedback residuals are not used: "
                            "--grad-compression none")
            return
        if not ranks:
            self.sync.load_residuals(None)
            return
        table = saved if saved is not None else np.zeros((ranks, self.store.numel), np.float32)
        self.comm.broadcast_(table)
        self.sync.load_residuals(table)
        if ranks != self.comm.size:
            logger.info("error-feedback residuals of %d rank(s) folded onto %d", ranks,
                        self.comm.size)
        self._saved_residuals = None

    # -- one step ------------------------------------------------------------------------------

    def check_gradients(self, indices: np.ndarray, x: np.ndarray, y: np.ndarray) -> None:
        """--debug: finite differences for a few gradient entries on this batch (one process)."""
        t = self.cfg.train
        self.model.set_dropout_keys(t.seed, self.state.step, indices)

        def loss_of() -> tuple[float, np.ndarray]:
            logits = self.model.forward(x.astype(self.dtype, copy=False), train=True)
            return self.loss_fn(logits, y, denominator=t.batch_size)

        worst = max(r["rel_err"] for r in gradient_spot_check(self.model, loss_of))
        logger.info("gradient check on the first batch: max relative error %.1e", worst)

    def train_step(self, indices: np.ndarray, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
        """One `TrainStep` (forward/backward on this rank's share, allreduce, clip, optimizer
        step) at the schedule's learning rate; a non-finite step is skipped (`NonFiniteSteps`)."""
        t, state = self.cfg.train, self.state
        self.comm.set_context(f"step {state.step + 1}")
        lr = self.schedule.lr(state.step)
        # a skipped step uses up its batch; the model and optimizer state stay as they were
        done = self.parallel_step(
            state.step, indices, x, y, lr, self.stop,
            may_update=lambda loss, norm: self.bad_steps.may_update(state.step + 1, state.epoch,
                                                                    loss, norm))
        self.stop_signal = done.stop_signal
        if self.ema is not None:
            self.ema.update()
        state.step += 1
        return {"loss": done.loss, "accuracy": done.correct / t.batch_size, "lr": lr,
                "grad_norm": done.grad_norm, "skipped_steps": self.bad_steps.total}

    # -- evaluation ----------------------------------------------------------------------------

    def evaluate(self) -> Evaluation:
        """Score the test split, each rank its exact shard (collectives: call on every rank);
        with ``--ema-decay`` the weights' average is scored."""
        with self.evaluated_weights():
            return evaluate_model(self.replicas, self.test_x, self.test_y, self.comm,
                                  self.info, epoch=self.state.epoch, step=self.state.step)

    def evaluated_weights(self) -> contextlib.AbstractContextManager:
        """Inside the block the model holds the weights evaluations score: the average with
        ``--ema-decay``, else the weights themselves."""
        return contextlib.nullcontext() if self.ema is None else self.ema.applied()

    def compute_spent(self) -> dict[str, int]:
        """Training FLOPs so far and per image (`dpvit.flops.training_compute`): forward and
        backward of every image of every step on all ranks, so any rank count logs the same."""
        return training_compute(self.cfg.model, self.state.step, self.cfg.train.batch_size)

    def report_context(self, evaluation: Evaluation) -> ReportContext:
        """What rank 0's HTML report draws: images, predictions, model, curves, LR schedule."""
        return ReportContext(images=self.test_x, labels=self.test_y,
                             predictions=evaluation.predictions,
                             confidences=evaluation.confidences, info=self.info,
                             model=self.model,
                             metrics=self.metrics.read(),
                             lr_schedule=self.schedule.all_lrs(),
                             run_name=self.run_dir.name, config=self.cfg.to_dict(),
                             # save() writes it right after the report
                             checkpoint=f"checkpoints/step-{self.state.step}.h5")

    # -- the loop ------------------------------------------------------------------------------

    def save(self, is_best: bool) -> None:
        """Check the whole state is finite, then rank 0 writes step-N.h5 (and last/best.h5)."""
        saving = timeline.begin("checkpoint", step=self.state.step)
        residuals = self.sync.gather_residuals() if self.sync is not None else None
        # the comm: a sharded optimizer's slices differ, so the ranks agree on the verdict
        check_finite({"parameters": self.store.flat_params,
                      **({} if self.ema is None else {"weight average": self.ema.flat}),
                      **{f"optimizer {k}": v for k, v in self.optimizer.state.items()},
                      **({} if residuals is None else {"error-feedback residuals": residuals})},
                     self.state.step, self.comm)
        optimizer_state = gather_state(self.comm, self.optimizer)  # the whole, on rank 0
        if self.comm.is_root:
            path = save_rolling(self.run_dir / "checkpoints",
                                self.checkpoint(optimizer_state, residuals),
                                self.cfg.train.keep, is_best)
            logger.info("saved checkpoint %s", path)
        timeline.end(saving)

    def end_of_epoch(self, epoch_done: bool) -> dict[str, Any]:
        """Evaluate, report, checkpoint; advance to the next epoch if this one is done."""
        state = self.state
        self.comm.check_identical(self.store.flat_params, f"parameters at step {state.step}")
        if epoch_done:
            state.epoch, state.step_in_epoch = state.epoch + 1, 0
        self.comm.set_context(f"the evaluation after step {state.step}")
        with timeline.span("evaluation", step=state.step):
            evaluation = self.evaluate()  # reports the epochs completed, as the checkpoint does
        report = evaluation.report
        report.update(self.compute_spent())
        record = {"kind": "epoch", "epoch": state.epoch, "step": state.step,
                  "test_loss": report["loss"], "test_accuracy": report["accuracy"],
                  "macro_f1": report["macro_f1"], "train_flops": report["train_flops"],
                  "time": time.time()}
        state.history.append(record)
        self.metrics.append(record)
        self.tensorboard.record(record)
        is_best = report["accuracy"] > state.best_accuracy
        state.best_accuracy = max(state.best_accuracy, report["accuracy"])
        if self.comm.is_root:
            with timeline.span("report", step=state.step), self.evaluated_weights():
                write_report(report, self.run_dir / "report", self.report_context(evaluation))
            self.tensorboard.confusion(np.array(report["confusion_matrix"]), state.step,
                                       self.run_dir / "report")
        logger.info("epoch %d step %d: test loss %.4f, test accuracy %.2f%%, macro F1 %.4f",
                    state.epoch, state.step, report["loss"], 100 * report["accuracy"],
                    report["macro_f1"])
        self.save(is_best)
        self.comm.sleeping_barrier()  # rank 0 alone wrote the report and the checkpoint
        return report

    def epoch_batches(self) -> tuple[list[np.ndarray], BatchIterator]:
        """The rest of the current epoch: this rank's sample indices per step, and the loader."""
        t, state, total = self.cfg.train, self.state, self.schedule.total_steps
        batches = train_batches(len(self.train_y), t.batch_size, t.seed, state.epoch,
                                self.comm.rank, self.comm.size)
        batches = batches[state.step_in_epoch : state.step_in_epoch + total - state.step]
        loader = BatchIterator(self.train_x, self.train_y, batches, self.info.mean,
                               self.info.std, augment=t.augmentation(state.epoch),
                               seed=t.seed, epoch=state.epoch)
        return batches, loader

    def after_step(self, stats: dict[str, Any], meter: ThroughputMeter,
                   progress: TrainingProgress) -> None:
        """Log, check the ranks agree, honour an agreed stop signal, checkpoint on schedule."""
        t, state, total = self.cfg.train, self.state, self.schedule.total_steps
        progress.update(state.step, state.epoch + 1, stats["loss"], stats["lr"])
        if state.step % t.log_every == 0 or state.step == total:
            stats.update(kind="step", step=state.step, epoch=state.epoch,
                         images_per_s=meter.rate_and_restart(),
                         train_flops=self.compute_spent()["train_flops"])
            self.metrics.append(stats)
            self.tensorboard.record(stats)
            logger.log(logging.INFO if progress.plain else logging.DEBUG, "%s",
                       progress.line(state.step, state.epoch + 1, stats["loss"], stats["lr"],
                                     stats["images_per_s"]))
            self.comm.check_identical(self.store.flat_params,
                                      f"parameters after step {state.step}")
        if signum := self.stop_signal:
            self.save(is_best=False)
            self.comm.barrier()  # every rank waits until the checkpoint is on disk
            raise preempted(signum, state.step,
                            self.run_dir / "checkpoints" / f"step-{state.step}.h5")
        at_epoch_end = state.step_in_epoch == self.schedule.steps_per_epoch
        if (t.checkpoint_every and state.step % t.checkpoint_every == 0
                and not at_epoch_end and state.step < total):
            self.save(is_best=False)  # epoch ends and the last step save anyway

    def fit(self) -> dict[str, Any] | None:
        """Train until the schedule's ``total_steps``; returns the last evaluation report."""
        t, state, schedule = self.cfg.train, self.state, self.schedule
        report = None
        meter = ThroughputMeter()
        logger.info("training %d steps (%d per epoch) at global batch %d on %d rank(s)",
                    schedule.total_steps, schedule.steps_per_epoch, t.batch_size,
                    self.comm.size)
        # rank 0: a bar when a terminal shows it, else plain per-step lines (--progress)
        progress = TrainingProgress(choose_mode(t.progress, t.no_progress, self.comm.is_root),
                                    schedule.total_steps, state.step, t.batch_size)
        if self.timeline is not None:  # a barrier: every rank's clock zero
            self.timeline.start(self.comm, state.step, schedule.total_steps)
        try:
            while state.step < schedule.total_steps:
                batches, loader = self.epoch_batches()
                if self.timeline is not None:  # the data wait and each step; opens the window
                    loader = self.timeline.batches(loader, state.step, self.comm)
                for indices, (x, y) in zip(batches, loader, strict=True):
                    if t.debug and state.step == 0:
                        self.check_gradients(indices, x, y)
                    stats = self.train_step(indices, x, y)
                    state.step_in_epoch += 1
                    meter.add(t.batch_size)
                    self.after_step(stats, meter, progress)
                epoch_done = state.step_in_epoch == schedule.steps_per_epoch
                if epoch_done or state.step == schedule.total_steps:
                    report = self.end_of_epoch(epoch_done)
                    progress.resume()
            if self.timeline is not None:  # every rank finished the loop: gather, write
                self.timeline.finish(self.comm)
        finally:
            progress.close()
            self.tensorboard.close()
            if self.timeline is not None:  # stops recording after an error too
                self.timeline.close()
        return report


class ThroughputMeter:
    """Images per second since the last logged step."""

    def __init__(self) -> None:
        self.images, self.start = 0, time.perf_counter()

    def add(self, images: int) -> None:
        self.images += images

    def rate_and_restart(self) -> float:
        """The rate since the last restart; then start a new window."""
        now = time.perf_counter()
        rate = self.images / (now - self.start)
        self.images, self.start = 0, now
        return rate


def _subset(split: tuple[np.ndarray, np.ndarray], n: int | None):
    """The first ``n`` samples of a split (all of them when ``n`` is None)."""
    images, labels = split
    return (images, labels) if n is None else (images[:n], labels[:n])
