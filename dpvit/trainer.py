"""The data-parallel training loop (DESIGN.md, "Data parallel step").

Every rank holds the whole model and runs the same number of steps. Per step, rank ``r``
computes the loss gradient of its part of the global batch, divided by the *global* batch size;
one in-place ``Allreduce`` sums the ranks' gradients into the gradient of the global mean; then
every rank clips and steps the optimizer on identical numbers, so the parameters stay
identical (checked by checksum every ``log_every`` steps and at each epoch end).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from dpvit.checkpoint import Checkpoint, save_rolling
from dpvit.config import Config
from dpvit.data import (
    DATASETS,
    BatchIterator,
    load_split,
    prepare_dataset,
    train_batches,
)
from dpvit.debug import gradient_spot_check, watch_non_finite
from dpvit.dist import Comm
from dpvit.errors import UserError
from dpvit.evaluate import Evaluation, evaluate_model, read_metrics
from dpvit.guard import (
    NonFiniteSteps,
    StopSignals,
    agreed_signal,
    check_finite,
    preempted,
    stop_votes,
)
from dpvit.nn.losses import CrossEntropyLoss
from dpvit.optim import build_optimizer, clip_grad_norm_, lr_at
from dpvit.progress import ProgressBar, progress_wanted
from dpvit.replicas import Replicas
from dpvit.report import ReportContext, write_report
from dpvit.vit import VisionTransformer

logger = logging.getLogger(__name__)


class Trainer:
    """Owns the model, optimizer, data and position of one run, on one rank.

    Args:
        cfg: the resolved configuration (identical on every rank).
        comm: the job's communicator.
        run_dir: where rank 0 writes metrics, reports and checkpoints.
        stop: the job's SIGTERM/SIGINT flag; agreed across ranks at every step (its votes
            travel in the gradient allreduce).
    """

    def __init__(self, cfg: Config, comm: Comm, run_dir: Path,
                 stop: StopSignals | None = None) -> None:
        self.cfg, self.comm, self.run_dir, self.stop = cfg, comm, run_dir, stop
        t = cfg.train
        self.dtype = np.dtype(t.dtype)
        self.model = VisionTransformer(cfg.model, self.dtype, seed=t.seed)
        self.replicas = Replicas(self.model, comm.threads)
        if t.debug:
            for model in self.replicas.models:
                watch_non_finite(model)
        self.store = self.model.store
        self.optimizer = build_optimizer(
            t.optimizer, self.store, t.lr, t.weight_decay, momentum=t.momentum,
            nesterov=t.nesterov, betas=(t.beta1, t.beta2))
        self.loss_fn = CrossEntropyLoss(t.label_smoothing)
        self.info = DATASETS[t.dataset]
        store_path = prepare_dataset(t.dataset, t.data_dir, comm)
        self.train_x, self.train_y = _subset(load_split(store_path, "train"), t.train_subset)
        self.test_x, self.test_y = _subset(load_split(store_path, "test"), t.test_subset)
        self.steps_per_epoch = len(self.train_y) // t.batch_size
        if self.steps_per_epoch == 0:
            raise UserError(
                f"batch_size {t.batch_size} is larger than the {len(self.train_y)} training "
                "images; lower --batch-size")
        # the schedule always spans all epochs; --max-steps only stops early, so a run stopped
        # there and resumed follows exactly the same learning-rate curve
        self.schedule_steps = t.epochs * self.steps_per_epoch
        self.total_steps = self.schedule_steps
        # capped so that short runs (--epochs 1) still spend most steps at the peak rate
        self.warmup_steps = min(round(t.warmup_epochs * self.steps_per_epoch),
                                self.schedule_steps // 5)
        if t.max_steps is not None:
            self.total_steps = min(self.total_steps, t.max_steps)
        self.step = self.epoch = self.position = 0
        self.stop_signal = 0  # the signal the ranks agreed on in the last step (0: none)
        self.best_accuracy = -1.0
        self.history: list[dict[str, Any]] = []
        self.bad_steps = NonFiniteSteps(t.max_bad_steps, self.log_metrics)
        self.sync_parameters("initial parameters")

    # -- state ---------------------------------------------------------------------------------

    def sync_parameters(self, what: str) -> None:
        """Broadcast parameters and optimizer state from rank 0 and prove all ranks agree."""
        self.comm.broadcast_(self.store.flat_params)
        for buf in self.optimizer.state.values():
            self.comm.broadcast_(buf)
        self.comm.check_identical(self.store.flat_params, what)

    def checkpoint(self) -> Checkpoint:
        """Everything needed to continue exactly (nothing in it depends on the rank count)."""
        buffers, scalars = self.optimizer.state_dict()
        return Checkpoint(
            params={n: v.copy() for n, v in self.store.named_params().items()},
            optimizer={k: self.store.named_views(v) for k, v in buffers.items()},
            optimizer_scalars=scalars,
            # all randomness is keyed, not stateful: shuffling by (seed, epoch), augmentation
            # by (seed, epoch, sample index), dropout by (seed, step, layer, sample index)
            rng={"scheme": "keyed", "seed": self.cfg.train.seed},
            step=self.step, epoch=self.epoch, position=self.position,
            world_size=self.comm.size, config=self.cfg.to_dict(),
            metrics=[*self.history, {"best_accuracy": self.best_accuracy}],
        )

    def restore(self, ckpt: Checkpoint) -> None:
        """Load a checkpoint's state (on rank 0; ``sync_parameters`` then spreads it)."""
        params = self.store.named_params()
        for name, view in params.items():
            _check_saved_shape(ckpt, "params", name, ckpt.params.get(name), view)
            view[...] = ckpt.params[name]
        buffers = {}
        for state, arrays in ckpt.optimizer.items():
            flat = np.zeros_like(self.store.flat_params)
            for name, view in self.store.named_views(flat).items():
                _check_saved_shape(ckpt, f"optimizer/{state}", name, arrays.get(name), view)
                view[...] = arrays[name]
            buffers[state] = flat
        self.optimizer.load_state_dict(buffers, ckpt.optimizer_scalars)
        self.step, self.epoch, self.position = ckpt.step, ckpt.epoch, ckpt.position
        self.history = [m for m in ckpt.metrics if "best_accuracy" not in m]
        self.best_accuracy = next((m["best_accuracy"] for m in ckpt.metrics
                                   if "best_accuracy" in m), -1.0)

    def restore_everywhere(self, ckpt: Checkpoint | None) -> None:
        """Rank 0 restores ``ckpt``; counters and buffers are then broadcast to every rank."""
        if self.comm.is_root and ckpt is not None:
            self.restore(ckpt)
        counters = self.comm.broadcast_object(
            (self.step, self.epoch, self.position, self.optimizer.steps, self.best_accuracy,
             self.history))
        (self.step, self.epoch, self.position, self.optimizer.steps, self.best_accuracy,
         self.history) = counters
        self.sync_parameters(f"parameters resumed at step {self.step}")

    # -- one step ------------------------------------------------------------------------------

    def check_gradients(self, indices: np.ndarray, x: np.ndarray, y: np.ndarray) -> None:
        """--debug: finite differences for a few gradient entries on this batch (one process)."""
        t = self.cfg.train
        self.model.set_dropout_keys(t.seed, self.step, indices)

        def loss_of() -> tuple[float, np.ndarray]:
            logits = self.model.forward(x.astype(self.dtype, copy=False), train=True)
            return self.loss_fn(logits, y, denominator=t.batch_size)

        worst = max(r["rel_err"] for r in gradient_spot_check(self.model, loss_of))
        logger.info("gradient check on the first batch: max relative error %.1e", worst)

    def share_step(self, model: VisionTransformer, indices: np.ndarray, x: np.ndarray,
                   y: np.ndarray) -> tuple[float, float]:
        """Forward/backward of one part of this rank's share on one replica (its thread).

        Returns the part's loss (over the global batch size) and its correct count.
        """
        t = self.cfg.train
        model.set_dropout_keys(t.seed, self.step, indices)
        logits = model.forward(x.astype(self.dtype, copy=False), train=True)
        loss, dlogits = self.loss_fn(logits, y, denominator=t.batch_size)
        model.backward(dlogits, input_grad=False)
        return loss, float(np.count_nonzero(logits.argmax(axis=1) == y))

    def train_step(self, indices: np.ndarray, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
        """Forward/backward on this rank's share, allreduce, clip, optimizer step."""
        t = self.cfg.train
        # a rank can get no samples when batch_size < world size: its gradients stay zero
        loss, correct = self.replicas.forward_backward(self.share_step, indices, x, y)
        # one Allreduce per step: the gradients, then loss, correct count and stop votes
        self.store.step_extras[:] = [loss, correct, *stop_votes(self.stop)]
        self.comm.allreduce_sum_(self.store.reduce_buffer)
        loss, correct = float(self.store.step_extras[0]), float(self.store.step_extras[1])
        self.stop_signal = agreed_signal(self.store.step_extras[2:])
        grad_norm = clip_grad_norm_(self.store.flat_grads, t.grad_clip)
        lr = lr_at(self.step, t.lr, self.warmup_steps, self.schedule_steps, t.min_lr)
        # a skipped step uses up its batch; the model and optimizer state stay as they were
        if self.bad_steps.ok(self.step + 1, self.epoch, float(loss), grad_norm):
            self.optimizer.lr = lr
            self.optimizer.step()
            check_finite({"parameters": self.store.flat_params}, self.step + 1)
        self.step += 1
        return {"loss": float(loss), "accuracy": correct / t.batch_size, "lr": lr,
                "grad_norm": grad_norm, "skipped_steps": self.bad_steps.total}

    # -- evaluation ----------------------------------------------------------------------------

    def evaluate(self) -> Evaluation:
        """Score the test split, each rank its exact shard (collectives: call on every rank)."""
        return evaluate_model(self.replicas, self.test_x, self.test_y, self.comm, self.info,
                              epoch=self.epoch, step=self.step)

    def report_context(self, evaluation: Evaluation) -> ReportContext:
        """What rank 0's HTML report draws: images, predictions, model, curves, LR schedule."""
        t = self.cfg.train
        schedule = np.array([lr_at(s, t.lr, self.warmup_steps, self.schedule_steps, t.min_lr)
                             for s in range(self.schedule_steps)])
        return ReportContext(images=self.test_x, labels=self.test_y,
                             predictions=evaluation.predictions,
                             confidences=evaluation.confidences, info=self.info,
                             model=self.model,
                             metrics=read_metrics(self.run_dir / "metrics.jsonl"),
                             lr_schedule=schedule)

    # -- the loop ------------------------------------------------------------------------------

    def log_metrics(self, record: dict[str, Any]) -> None:
        """Append one JSON object to metrics.jsonl (rank 0 only)."""
        if self.comm.is_root:
            path = self.run_dir / "metrics.jsonl"
            try:
                with open(path, "a") as fh:
                    fh.write(json.dumps(record) + "\n")
            except OSError as err:  # a full or read-only disk: one line, not a traceback
                raise UserError(f"could not append to {path}: {err.strerror or err}") from err

    def save(self, is_best: bool) -> None:
        check_finite({"parameters": self.store.flat_params,
                      **{f"optimizer {k}": v for k, v in self.optimizer.state.items()}},
                     self.step)
        if self.comm.is_root:
            path = save_rolling(self.run_dir / "checkpoints", self.checkpoint(),
                                self.cfg.train.keep, is_best)
            logger.info("saved checkpoint %s", path)

    def end_of_epoch(self, epoch_done: bool) -> dict[str, Any]:
        """Evaluate, report, checkpoint; advance to the next epoch if this one is done."""
        self.comm.check_identical(self.store.flat_params, f"parameters at step {self.step}")
        if epoch_done:
            self.epoch, self.position = self.epoch + 1, 0
        evaluation = self.evaluate()  # reports the epochs completed, as the checkpoint does
        report = evaluation.report
        record = {"kind": "epoch", "epoch": self.epoch, "step": self.step,
                  "test_loss": report["loss"], "test_accuracy": report["accuracy"],
                  "macro_f1": report["macro_f1"], "time": time.time()}
        self.history.append(record)
        self.log_metrics(record)
        is_best = report["accuracy"] > self.best_accuracy
        self.best_accuracy = max(self.best_accuracy, report["accuracy"])
        if self.comm.is_root:
            write_report(report, self.run_dir / "report", self.report_context(evaluation))
        logger.info("epoch %d step %d: test loss %.4f, test accuracy %.2f%%, macro F1 %.4f",
                    self.epoch, self.step, report["loss"], 100 * report["accuracy"],
                    report["macro_f1"])
        self.save(is_best)
        self.comm.sleeping_barrier()  # rank 0 alone wrote the report and the checkpoint
        return report

    def fit(self) -> dict[str, Any] | None:
        """Train until ``total_steps``; returns the last evaluation report."""
        t = self.cfg.train
        report = None
        images_done, window_start = 0, time.perf_counter()
        logger.info("training %d steps (%d per epoch) at global batch %d on %d rank(s)",
                    self.total_steps, self.steps_per_epoch, t.batch_size, self.comm.size)
        bar = None  # rank 0 on a terminal: a progress bar instead of the per-step log lines
        if progress_wanted(t.no_progress, self.comm.is_root):
            bar = ProgressBar(self.total_steps)
        while self.step < self.total_steps:
            batches = train_batches(len(self.train_y), t.batch_size, t.seed, self.epoch,
                                    self.comm.rank, self.comm.size)
            batches = batches[self.position : self.position + self.total_steps - self.step]
            loader = BatchIterator(self.train_x, self.train_y, batches, self.info.mean,
                                   self.info.std, augment=t.augmentation(self.epoch),
                                   seed=t.seed, epoch=self.epoch)
            for indices, (x, y) in zip(batches, loader, strict=True):
                if t.debug and self.step == 0:
                    self.check_gradients(indices, x, y)
                stats = self.train_step(indices, x, y)
                self.position += 1
                images_done += t.batch_size
                if bar is not None:
                    bar.update(self.step, self.epoch, stats["loss"], stats["lr"], t.batch_size)
                if self.step % t.log_every == 0 or self.step == self.total_steps:
                    elapsed = time.perf_counter() - window_start
                    stats.update(kind="step", step=self.step, epoch=self.epoch,
                                 images_per_s=images_done / elapsed)
                    self.log_metrics(stats)
                    logger.log(logging.INFO if bar is None else logging.DEBUG,
                               "epoch %d step %d/%d: loss %.4f, lr %.2e, %.0f images/s",
                               self.epoch, self.step, self.total_steps, stats["loss"],
                               stats["lr"], stats["images_per_s"])
                    images_done, window_start = 0, time.perf_counter()
                    self.comm.check_identical(self.store.flat_params,
                                              f"parameters after step {self.step}")
                if signum := self.stop_signal:
                    self.save(is_best=False)
                    self.comm.barrier()  # every rank waits until the checkpoint is on disk
                    raise preempted(signum, self.step,
                                    self.run_dir / "checkpoints" / f"step-{self.step}.h5")
                at_epoch_end = self.position == self.steps_per_epoch
                if (t.checkpoint_every and self.step % t.checkpoint_every == 0
                        and not at_epoch_end and self.step < self.total_steps):
                    self.save(is_best=False)  # epoch ends and the last step save anyway
            epoch_done = self.position == self.steps_per_epoch
            if epoch_done or self.step == self.total_steps:
                report = self.end_of_epoch(epoch_done)
                if bar is not None:
                    bar.pause()
        if bar is not None:
            bar.close()
        return report


def _check_saved_shape(ckpt: Checkpoint, group: str, name: str, saved: np.ndarray | None,
                       view: np.ndarray) -> None:
    """A checkpoint array must exist and fit the model built from the checkpoint's config."""
    if saved is None or saved.shape != view.shape:
        found = "nothing" if saved is None else f"shape {saved.shape}"
        raise UserError(f"checkpoint {ckpt.path}: /{group}/{name} should have shape "
                        f"{view.shape} for its model config but has {found}")


def _subset(split: tuple[np.ndarray, np.ndarray], n: int | None):
    """The first ``n`` samples of a split (all of them when ``n`` is None)."""
    images, labels = split
    return (images, labels) if n is None else (images[:n], labels[:n])
