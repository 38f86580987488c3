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
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from dpvit.checkpoint import Checkpoint, save_rolling
from dpvit.config import Config
from dpvit.data import (
    DATASETS,
    BatchIterator,
    eval_shard,
    load_split,
    normalize,
    prepare_dataset,
    train_batches,
)
from dpvit.dist import Comm
from dpvit.errors import UserError
from dpvit.nn.losses import CrossEntropyLoss
from dpvit.optim import build_optimizer, clip_grad_norm_, lr_at
from dpvit.report import build_report, confusion_matrix, write_report
from dpvit.vit import VisionTransformer

logger = logging.getLogger(__name__)

EVAL_BATCH = 500  # test images per forward pass: large enough for BLAS, small in memory


class Trainer:
    """Owns the model, optimizer, data and position of one run, on one rank.

    Args:
        cfg: the resolved configuration (identical on every rank).
        comm: the job's communicator.
        run_dir: where rank 0 writes metrics, reports and checkpoints.
    """

    def __init__(self, cfg: Config, comm: Comm, run_dir: Path) -> None:
        self.cfg, self.comm, self.run_dir = cfg, comm, run_dir
        t = cfg.train
        self.dtype = np.dtype(t.dtype)
        self.model = VisionTransformer(cfg.model, self.dtype, seed=t.seed)
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
        if t.max_steps is not None:
            self.total_steps = min(self.total_steps, t.max_steps)
        self.step = self.epoch = self.position = 0
        self.best_accuracy = -1.0
        self.history: list[dict[str, Any]] = []
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
            if name not in ckpt.params or ckpt.params[name].shape != view.shape:
                raise UserError(f"checkpoint parameter {name} is missing or has a wrong shape")
            view[...] = ckpt.params[name]
        buffers = {}
        for state, arrays in ckpt.optimizer.items():
            flat = np.zeros_like(self.store.flat_params)
            for name, view in self.store.named_views(flat).items():
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

    def train_step(self, indices: np.ndarray, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
        """Forward/backward on this rank's share, allreduce, clip, optimizer step."""
        t = self.cfg.train
        self.store.zero_grad()
        loss = correct = 0.0
        if len(indices):  # a rank can get no samples when batch_size < world size
            self.model.set_dropout_keys(t.seed, self.step, indices)
            logits = self.model.forward(x.astype(self.dtype, copy=False), train=True)
            loss, dlogits = self.loss_fn(logits, y, denominator=t.batch_size)
            correct = float(np.count_nonzero(logits.argmax(axis=1) == y))
            self.model.backward(dlogits)
        self.comm.allreduce_sum_(self.store.flat_grads)
        loss, correct = self.comm.allreduce_sum(np.array([loss, correct]))
        grad_norm = clip_grad_norm_(self.store.flat_grads, t.grad_clip)
        if not math.isfinite(grad_norm):
            raise UserError(f"non-finite gradient norm at step {self.step}; lower --lr")
        lr = lr_at(self.step, t.lr, t.warmup_steps, self.schedule_steps, t.min_lr)
        self.optimizer.lr = lr
        self.optimizer.step()
        self.step += 1
        return {"loss": float(loss), "accuracy": correct / t.batch_size, "lr": lr,
                "grad_norm": grad_norm}

    # -- evaluation ----------------------------------------------------------------------------

    def evaluate(self) -> dict[str, Any]:
        """Score this rank's exact shard of the test split; return the summed report."""
        k = self.cfg.model.num_classes
        cm = np.zeros((k, k), dtype=np.int64)
        loss_sum = 0.0
        plain_ce = CrossEntropyLoss()
        shard = eval_shard(len(self.test_y), self.comm.rank, self.comm.size)
        for start in range(0, len(shard), EVAL_BATCH):
            idx = shard[start : start + EVAL_BATCH]
            x = normalize(self.test_x[idx], self.info.mean, self.info.std).astype(self.dtype)
            logits = self.model.forward(x, train=False)
            loss_sum += plain_ce(logits, self.test_y[idx], denominator=1)[0]
            cm += confusion_matrix(self.test_y[idx], logits.argmax(axis=1), k)
        cm = self.comm.allreduce_sum(cm)
        loss_sum = float(self.comm.allreduce_sum(np.array([loss_sum]))[0])
        return build_report(cm, loss_sum, dataset=self.cfg.train.dataset, split="test",
                            epoch=self.epoch, step=self.step, world_size=self.comm.size,
                            class_names=list(self.info.class_names))

    # -- the loop ------------------------------------------------------------------------------

    def log_metrics(self, record: dict[str, Any]) -> None:
        """Append one JSON object to metrics.jsonl (rank 0 only)."""
        if self.comm.is_root:
            with open(self.run_dir / "metrics.jsonl", "a") as fh:
                fh.write(json.dumps(record) + "\n")

    def save(self, is_best: bool) -> None:
        if self.comm.is_root:
            path = save_rolling(self.run_dir / "checkpoints", self.checkpoint(),
                                self.cfg.train.keep, is_best)
            logger.info("saved checkpoint %s", path)

    def end_of_epoch(self, epoch_done: bool) -> dict[str, Any]:
        """Evaluate, report, checkpoint; advance to the next epoch if this one is done."""
        self.comm.check_identical(self.store.flat_params, f"parameters at step {self.step}")
        report = self.evaluate()
        if epoch_done:
            self.epoch, self.position = self.epoch + 1, 0
        record = {"kind": "epoch", "epoch": self.epoch, "step": self.step,
                  "test_loss": report["loss"], "test_accuracy": report["accuracy"],
                  "macro_f1": report["macro_f1"], "time": time.time()}
        self.history.append(record)
        self.log_metrics(record)
        is_best = report["accuracy"] > self.best_accuracy
        self.best_accuracy = max(self.best_accuracy, report["accuracy"])
        if self.comm.is_root:
            write_report(report, self.run_dir / "report")
        logger.info("epoch %d step %d: test loss %.4f, test accuracy %.2f%%, macro F1 %.4f",
                    self.epoch, self.step, report["loss"], 100 * report["accuracy"],
                    report["macro_f1"])
        self.save(is_best)
        return report

    def fit(self) -> dict[str, Any] | None:
        """Train until ``total_steps``; returns the last evaluation report."""
        t = self.cfg.train
        report = None
        images_done, window_start = 0, time.perf_counter()
        logger.info("training %d steps (%d per epoch) at global batch %d on %d rank(s)",
                    self.total_steps, self.steps_per_epoch, t.batch_size, self.comm.size)
        while self.step < self.total_steps:
            batches = train_batches(len(self.train_y), t.batch_size, t.seed, self.epoch,
                                    self.comm.rank, self.comm.size)
            batches = batches[self.position : self.position + self.total_steps - self.step]
            loader = BatchIterator(self.train_x, self.train_y, batches, self.info.mean,
                                   self.info.std, train=True, augment=t.augment, seed=t.seed,
                                   epoch=self.epoch)
            for indices, (x, y) in zip(batches, loader, strict=True):
                stats = self.train_step(indices, x, y)
                self.position += 1
                images_done += t.batch_size
                if self.step % t.log_every == 0 or self.step == self.total_steps:
                    elapsed = time.perf_counter() - window_start
                    stats.update(kind="step", step=self.step, epoch=self.epoch,
                                 images_per_s=images_done / elapsed)
                    self.log_metrics(stats)
                    logger.info("epoch %d step %d/%d: loss %.4f, lr %.2e, %.0f images/s",
                                self.epoch, self.step, self.total_steps, stats["loss"],
                                stats["lr"], stats["images_per_s"])
                    images_done, window_start = 0, time.perf_counter()
                    self.comm.check_identical(self.store.flat_params,
                                              f"parameters after step {self.step}")
                at_epoch_end = self.position == self.steps_per_epoch
                if (t.checkpoint_every and self.step % t.checkpoint_every == 0
                        and not at_epoch_end and self.step < self.total_steps):
                    self.save(is_best=False)  # epoch ends and the last step save anyway
            epoch_done = self.position == self.steps_per_epoch
            if epoch_done or self.step == self.total_steps:
                report = self.end_of_epoch(epoch_done)
        return report


def _subset(split: tuple[np.ndarray, np.ndarray], n: int | None):
    """The first ``n`` samples of a split (all of them when ``n`` is None)."""
    images, labels = split
    return (images, labels) if n is None else (images[:n], labels[:n])
