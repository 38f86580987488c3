"""How long a run is and what learning rate each step uses."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dpvit.config import TrainConfig
from dpvit.errors import ConfigError
from dpvit.optim import lr_at


@dataclass(frozen=True)
class Schedule:
    """Steps per epoch, the learning-rate curve's length and warmup, and where the run stops.

    The learning-rate curve always spans all ``epochs``; ``--max-steps`` only stops early, so a
    run stopped there and resumed follows exactly the same curve.
    """

    steps_per_epoch: int
    schedule_steps: int  # the learning-rate curve's length: epochs x steps_per_epoch
    warmup_steps: int
    total_steps: int  # where this run stops: schedule_steps, or --max-steps if smaller
    base_lr: float
    min_lr: float

    @classmethod
    def for_run(cls, train: TrainConfig, num_train_images: int) -> Schedule:
        """The schedule of ``train`` over a training split of ``num_train_images``."""
        steps_per_epoch = num_train_images // train.batch_size
        if steps_per_epoch == 0:
            raise ConfigError(
                f"--batch-size {train.batch_size} is larger than the {num_train_images} "
                "training images; lower --batch-size")
        schedule_steps = train.epochs * steps_per_epoch
        # capped so that short runs (--epochs 1) still spend most steps at the peak rate
        warmup = min(round(train.warmup_epochs * steps_per_epoch), schedule_steps // 5)
        total = schedule_steps if train.max_steps is None else min(schedule_steps,
                                                                   train.max_steps)
        return cls(steps_per_epoch, schedule_steps, warmup, total, train.lr, train.min_lr)

    def lr(self, step: int) -> float:
        """The learning rate of optimizer step ``step`` (counted from 0)."""
        return lr_at(step, self.base_lr, self.warmup_steps, self.schedule_steps, self.min_lr)

    def all_lrs(self) -> np.ndarray:
        """The learning rate of every scheduled step, for the report's figure."""
        return np.array([self.lr(s) for s in range(self.schedule_steps)])
