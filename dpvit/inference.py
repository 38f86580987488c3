"""Running a trained model: loading a checkpoint's weights, and scoring a split on every rank.

``evaluate_model`` is the scoring code the trainer uses after every epoch and
``python -m dpvit.evaluate`` uses on a checkpoint, so a report written during training and one
written afterwards from the same checkpoint agree exactly. Each rank scores its exact shard of
the split (``eval_shard``: every image once, no padding); the confusion matrix and loss are
summed with collectives on every rank, and the per-image predictions (one int and one float
each) are gathered once per evaluation so rank 0 can list the misclassified images.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dpvit.checkpoint import Checkpoint, load_checkpoint, restore_arrays
from dpvit.config import Config
from dpvit.data import DatasetInfo, eval_shard, normalize
from dpvit.nn import functional as F
from dpvit.nn.losses import CrossEntropyLoss
from dpvit.parallel.comm import Comm
from dpvit.parallel.replicas import Replicas
from dpvit.report import build_report, confusion_matrix
from dpvit.vit import VisionTransformer

#: Test images per forward pass: small batches keep a block's temporaries in the caches
#: (docs/performance.md has the measurements).
EVAL_BATCH = 32


@dataclass
class Evaluation:
    """The outcome of scoring a split, identical on every rank.

    Attributes:
        report: the report.json dictionary (its keys: docs/design.md).
        predictions: (N,) int64 predicted class of every image, in split order.
        confidences: (N,) float64 softmax probability of the predicted class.
    """

    report: dict[str, Any]
    predictions: np.ndarray
    confidences: np.ndarray


def evaluate_model(replicas: Replicas, images: np.ndarray, labels: np.ndarray, comm: Comm,
                   info: DatasetInfo, *, epoch: int, step: int,
                   batch_size: int = EVAL_BATCH) -> Evaluation:
    """Score ``images`` on this rank's shard and combine the shards of every rank.

    Every rank must call this (it runs collectives); every rank gets the same result, which
    does not depend on the number of ranks or threads beyond float rounding in the loss.

    Args:
        replicas: the model and its replicas (the batches of the shard are spread over their
            threads), with identical parameters on every rank.
        images: (N, H, W) uint8, the whole split (each rank scores its own shard of it).
        labels: (N,) int64 true classes.
        comm: the job's communicator.
        info: the dataset (normalisation constants, class names).
        epoch, step: recorded in the report.
        batch_size: images per forward pass.

    Returns:
        The combined evaluation.
    """
    k = replicas.model.cfg.num_classes
    plain_ce = CrossEntropyLoss()
    shard = eval_shard(len(labels), comm.rank, comm.size)

    def score(model: VisionTransformer, idx: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
        x = normalize(images[idx], info.mean, info.std).astype(model.dtype)
        logits = model.forward(x, train=False)
        probs = F.softmax_fwd(logits.astype(np.float64))
        return (plain_ce(logits, labels[idx], denominator=1)[0],
                logits.argmax(axis=1).astype(np.int64), probs.max(axis=1))

    scored = replicas.map_batches(score, shard, batch_size)
    loss_sum = float(sum(loss for loss, _, _ in scored))
    preds = np.concatenate([np.zeros(0, np.int64), *(p for _, p, _ in scored)])
    confs = np.concatenate([np.zeros(0, np.float64), *(c for _, _, c in scored)])
    cm = confusion_matrix(labels[shard], preds, k)
    cm = comm.allreduce_sum(cm)
    loss_sum = float(comm.allreduce_sum(np.array([loss_sum]))[0])
    # shards are contiguous and in rank order, so concatenating restores the split order
    gathered = comm.allgather_object((preds, confs))
    report = build_report(cm, loss_sum, dataset=info.name, split="test", epoch=epoch, step=step,
                          world_size=comm.size, class_names=list(info.class_names))
    return Evaluation(report, np.concatenate([p for p, _ in gathered]),
                      np.concatenate([c for _, c in gathered]))


def load_model(path: Path) -> tuple[VisionTransformer, Config, Checkpoint]:
    """Build the checkpoint's model with its parameters (float32) and return its config too.

    A run with ``--ema-decay`` evaluated its weights' moving average, so that is the model
    loaded (the checkpoint's ``/ema``); otherwise its ``/params``.

    Returns:
        (model, config, checkpoint).

    Raises:
        CheckpointError: the file is missing or damaged, or its arrays do not fit its config.
    """
    ckpt = load_checkpoint(path)
    cfg = Config.from_dict(ckpt.config)
    model = VisionTransformer(cfg.model, np.float32)
    if ckpt.ema:
        restore_arrays(ckpt, "ema", ckpt.ema, model.store.named_params())
    else:
        restore_arrays(ckpt, "params", ckpt.params, model.store.named_params())
    return model, cfg, ckpt
