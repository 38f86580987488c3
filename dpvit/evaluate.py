"""``python -m dpvit.evaluate``: score a checkpoint on the test split and write its report.

    python -m dpvit.evaluate --checkpoint runs/x/checkpoints/best.h5
    mpirun -n 4 python -m dpvit.evaluate --checkpoint runs/x/checkpoints/last.h5 --run-dir out

Scoring is ``dpvit.inference.evaluate_model``, the code the trainer runs after every epoch,
so a report written during training and one written here from the same checkpoint agree
exactly. Rank 0 writes ``<run-dir>/report/`` (default: the run directory the checkpoint lives
in, ``CKPT/../..``).
"""

from __future__ import annotations

import logging
import sys
from functools import partial
from pathlib import Path

import numpy as np

from dpvit.cli import CliParser, agree, run_main
from dpvit.config import Config
from dpvit.data import DATASETS, load_split, prepare_dataset
from dpvit.errors import ConfigError
from dpvit.flops import training_compute
from dpvit.inference import EVAL_BATCH, evaluate_model, load_model
from dpvit.parallel.comm import Comm
from dpvit.parallel.replicas import Replicas
from dpvit.report import ReportContext, write_report
from dpvit.training.metrics_log import read_metrics
from dpvit.vit import VisionTransformer

logger = logging.getLogger("dpvit.evaluate")

def build_parser() -> CliParser:
    """The command's flags (errors raise ConfigError: one line, no usage dump)."""
    parser = CliParser(prog="dpvit.evaluate",
                     description="Score a checkpoint on the test split and write a report.")
    parser.add_argument("--checkpoint", required=True, type=Path, help="checkpoint .h5 file")
    parser.add_argument("--dataset", choices=sorted(DATASETS),
                        help="dataset to score on (default: the checkpoint's)")
    parser.add_argument("--data-dir", help="dataset directory (default: the checkpoint's, "
                                           "else $DPVIT_DATA_DIR, else data/<dataset>)")
    parser.add_argument("--store-dir", help="where the converted test-split store is written "
                                            "(default: the checkpoint's, else data/<dataset>/ "
                                            "when that is the data directory, else the cache)")
    parser.add_argument("--run-dir", type=Path,
                        help="write <run-dir>/report/ (default: the checkpoint's run directory)")
    parser.add_argument("--batch-size", type=int, default=EVAL_BATCH,
                        help=f"images per forward pass on each rank (default: {EVAL_BATCH})")
    parser.add_argument("--test-subset", type=int,
                        help="score only the first N test images (default: all)")
    return parser


def parse_args(argv: list[str] | None):
    """The command line, checked (ConfigError for a bad flag or value)."""
    args = build_parser().parse_args(argv)
    if args.batch_size < 1 or (args.test_subset is not None and args.test_subset < 1):
        raise ConfigError("--batch-size and --test-subset must be positive integers")
    return args


def run(comm: Comm, argv: list[str] | None) -> int:
    """The command body, run on every rank by ``run_main``."""
    args = parse_args(argv)
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
    # the test split alone: scoring never fetches or converts the training files
    store = agree(comm, partial(prepare_dataset, dataset, args.data_dir or cfg.train.data_dir,
                                comm, store_dir=args.store_dir or cfg.train.store_dir,
                                splits=("test",)))
    images, labels = load_split(store, "test")
    if args.test_subset is not None:
        images, labels = images[: args.test_subset], labels[: args.test_subset]
    logger.info("scoring %s (step %d, trained on %d rank(s)) on %d %s test images, %d rank(s)",
                args.checkpoint, step, saved_ranks, len(labels), dataset, comm.size)
    result = evaluate_model(Replicas(model, comm.threads), images, labels, comm, info,
                            epoch=epoch, step=step, batch_size=args.batch_size)
    # the checkpoint's training compute, as the report written during training has it
    result.report.update(training_compute(cfg.model, step, cfg.train.batch_size))
    run_dir = args.run_dir or args.checkpoint.resolve().parent.parent
    if comm.is_root:
        context = ReportContext(images=images, labels=labels, predictions=result.predictions,
                                confidences=result.confidences, model=model, info=info,
                                metrics=read_metrics(run_dir / "metrics.jsonl"),
                                run_name=run_dir.resolve().name, config=cfg_dict,
                                checkpoint=str(args.checkpoint))
        write_report(result.report, run_dir / "report", context)
    r = result.report
    logger.info("test loss %.4f, accuracy %.2f%%, macro F1 %.4f; report in %s", r["loss"],
                100 * r["accuracy"], r["macro_f1"], run_dir / "report")
    return 0


def main(argv: list[str] | None = None) -> None:
    """Console entry point (``dpvit-evaluate``)."""
    sys.exit(run_main(partial(run, argv=argv), argv, parse_args=parse_args))


if __name__ == "__main__":
    main()
