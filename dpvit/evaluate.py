"""``python -m dpvit.evaluate``: score a checkpoint on the test split and write its report.

    python -m dpvit.evaluate --checkpoint runs/x/checkpoints/best.h5
    mpirun -n 4 python -m dpvit.evaluate --checkpoint runs/x/checkpoints/last.h5 --run-dir out

``evaluate_model`` is the scoring code the trainer uses after every epoch too, so a report
written during training and one written here from the same checkpoint agree exactly. Each
rank scores its exact shard of the split (``eval_shard``: every image once, no padding); the
confusion matrix and loss are summed with collectives on every rank, and the per-image
predictions (one int and one float each) are gathered once per evaluation so rank 0 can list
the misclassified images. Rank 0 writes ``<run-dir>/report/`` (default: the run directory the
checkpoint lives in, ``CKPT/../..``).
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from dpvit.checkpoint import load_checkpoint
from dpvit.config import CliParser, Config
from dpvit.data import DATASETS, DatasetInfo, eval_shard, load_split, normalize, prepare_dataset
from dpvit.dist import Comm, run_main
from dpvit.errors import ConfigError, UserError
from dpvit.nn.losses import CrossEntropyLoss
from dpvit.replicas import Replicas
from dpvit.report import ReportContext, build_report, confusion_matrix, write_report
from dpvit.vit import VisionTransformer

logger = logging.getLogger("dpvit.evaluate")

# test images per forward pass: small batches keep a block's temporaries in cache. Scoring the
# 10k MNIST test images on one thread: 128 runs 1.4x faster than 500 (peak memory per rank
# 270 MB instead of 850 MB); 32 took 14.2-15.0 s against 17.0-17.3 s for 128 (incl. start-up)
EVAL_BATCH = 32


@dataclass
class Evaluation:
    """The outcome of scoring a split, identical on every rank.

    Attributes:
        report: the report.json dictionary (DESIGN.md keys).
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
        # softmax of the top class: exp(0) over the row sum of exp(logits - row max)
        shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
        return (plain_ce(logits, labels[idx], denominator=1)[0],
                logits.argmax(axis=1).astype(np.int64), 1.0 / np.exp(shifted).sum(axis=1))

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


def build_parser() -> CliParser:
    """The command's flags (errors raise ConfigError: one line, no usage dump)."""
    parser = CliParser(prog="dpvit.evaluate",
                     description="Score a checkpoint on the test split and write a report.")
    parser.add_argument("--checkpoint", required=True, type=Path, help="checkpoint .h5 file")
    parser.add_argument("--dataset", choices=sorted(DATASETS),
                        help="dataset to score on (default: the checkpoint's)")
    parser.add_argument("--data-dir", help="dataset directory (default: the checkpoint's, "
                                           "else $DPVIT_DATA_DIR, else data/<dataset>)")
    parser.add_argument("--run-dir", type=Path,
                        help="write <run-dir>/report/ (default: the checkpoint's run directory)")
    parser.add_argument("--batch-size", type=int, default=EVAL_BATCH,
                        help=f"images per forward pass on each rank (default: {EVAL_BATCH})")
    parser.add_argument("--test-subset", type=int,
                        help="score only the first N test images (default: all)")
    return parser


def load_model(path: Path) -> tuple[VisionTransformer, Config, Any]:
    """Build the checkpoint's model with its parameters (float32) and return its config too.

    Returns:
        (model, config, checkpoint).
    """
    ckpt = load_checkpoint(path)
    cfg = Config.from_dict(ckpt.config)
    model = VisionTransformer(cfg.model, np.float32)
    for name, view in model.store.named_params().items():
        if name not in ckpt.params or ckpt.params[name].shape != view.shape:
            raise UserError(f"{path}: parameter {name} is missing or has a wrong shape")
        view[...] = ckpt.params[name]
    return model, cfg, ckpt


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file (an empty list when there is none)."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            logger.warning("%s: skipping a line that is not JSON (a run killed mid-write?)", path)
    return records


def run(comm: Comm, argv: list[str] | None) -> int:
    """The command body, run on every rank by ``run_main``."""
    args = build_parser().parse_args(argv)
    if args.batch_size < 1 or (args.test_subset is not None and args.test_subset < 1):
        raise ConfigError("--batch-size and --test-subset must be positive integers")
    loaded = None
    if comm.is_root:  # one rank reads the file; a bad checkpoint is one error, then abort-all
        model, cfg, ckpt = load_model(args.checkpoint)
        loaded = (cfg.to_dict(), model.store.flat_params, ckpt.epoch, ckpt.step, ckpt.world_size)
    cfg_dict, flat, epoch, step, saved_ranks = comm.broadcast_object(loaded)
    cfg = Config.from_dict(cfg_dict)
    model = VisionTransformer(cfg.model, np.float32)
    model.store.flat_params[...] = flat
    dataset = args.dataset or cfg.train.dataset
    info = DATASETS[dataset]
    if (model.cfg.num_classes, model.cfg.img_size) != (info.num_classes, info.image_shape[0]):
        raise ConfigError(f"the checkpoint's model does not fit {dataset} images and classes")
    store = prepare_dataset(dataset, args.data_dir or cfg.train.data_dir, comm)
    images, labels = load_split(store, "test")
    if args.test_subset is not None:
        images, labels = images[: args.test_subset], labels[: args.test_subset]
    logger.info("scoring %s (step %d, trained on %d rank(s)) on %d %s test images, %d rank(s)",
                args.checkpoint, step, saved_ranks, len(labels), dataset, comm.size)
    result = evaluate_model(Replicas(model, comm.threads), images, labels, comm, info,
                            epoch=epoch, step=step, batch_size=args.batch_size)
    run_dir = args.run_dir or args.checkpoint.resolve().parent.parent
    if comm.is_root:
        context = ReportContext(images=images, labels=labels, predictions=result.predictions,
                                confidences=result.confidences, model=model, info=info,
                                metrics=read_metrics(run_dir / "metrics.jsonl"))
        write_report(result.report, run_dir / "report", context)
    r = result.report
    logger.info("test loss %.4f, accuracy %.2f%%, macro F1 %.4f; report in %s", r["loss"],
                100 * r["accuracy"], r["macro_f1"], run_dir / "report")
    return 0


def main(argv: list[str] | None = None) -> None:
    """Console entry point (``dpvit-evaluate``)."""
    sys.exit(run_main(partial(run, argv=argv), argv))


if __name__ == "__main__":
    main()
