"""``python -m dpvit.predict``: classify image files with a trained checkpoint.

    python -m dpvit.predict --checkpoint runs/x/checkpoints/best.h5 digit.png scan.jpg
    python -m dpvit.predict --checkpoint CKPT t10k-images-idx3-ubyte.gz --index 0 7 --json

Reads PNG/JPEG (Pillow, the optional extra ``predict``), ``.npy`` arrays and idx files; every
image is prepared as MNIST digits were (``dpvit.data.imageio``: grayscale, light-on-dark, fitted
into 20x20 and centred by mass in 28x28), then the top-k classes and their probabilities are
printed, or with ``--json`` one JSON object. A file that cannot be read gets one error line
and the others are still classified; the exit status is then 1. The work runs on rank 0 (other
ranks of an mpirun job do nothing), in batches of ``EVAL_BATCH`` images spread over the rank's
model replicas, so a lone process scores a whole idx file on every core.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from dpvit.cli import CliParser, run_main
from dpvit.data import DATASETS, normalize
from dpvit.data.imageio import prepare_digit, read_images
from dpvit.errors import ConfigError, InputError
from dpvit.inference import EVAL_BATCH, load_model
from dpvit.parallel.comm import Comm
from dpvit.parallel.replicas import Replicas

logger = logging.getLogger("dpvit.predict")


def build_parser() -> CliParser:
    """The command's flags (errors raise ConfigError: one line, no usage dump)."""
    parser = CliParser(prog="dpvit.predict",
                       description="Classify PNG/JPEG images, .npy arrays or idx files.")
    parser.add_argument("--checkpoint", required=True, type=Path, help="checkpoint .h5 file")
    parser.add_argument("files", nargs="+", type=Path, metavar="FILE", help="images to classify")
    parser.add_argument("--top-k", type=int, default=3, help="classes to show (default: 3)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--index", type=int, nargs="+", action="extend", metavar="I",
                        help="records to classify in multi-image files (idx, stacked .npy); "
                             "give it after the files (default: every record)")
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line, checked (ConfigError for a bad flag or value)."""
    args = build_parser().parse_args(argv)
    if args.top_k < 1:
        raise ConfigError(f"--top-k must be a positive integer, got {args.top_k}")
    return args


def classify(replicas: Replicas, names: list[str], mean: float, std: float,
             images: list[tuple[str, np.ndarray]], top_k: int) -> list[dict[str, Any]]:
    """Top-k classes for prepared (28, 28) uint8 images: [{"file", "top_k": [...]}, ...]."""
    x = normalize(np.stack([image for _, image in images]), mean, std)
    x = x.astype(replicas.model.dtype)
    probs = np.concatenate(replicas.map_batches(lambda model, batch: model.predict_proba(batch),
                                                x, EVAL_BATCH))
    results = []
    for (name, _), p in zip(images, probs, strict=True):
        best = np.argsort(-p, kind="stable")[:top_k]
        results.append({"file": name, "top_k": [
            {"class": int(k), "name": names[k], "probability": float(p[k])} for k in best]})
    return results


def run(comm: Comm, argv: list[str] | None) -> int:
    """The command body (rank 0 only does the work)."""
    args = parse_args(argv)
    if not comm.is_root:
        return 0
    model, cfg, _ = load_model(args.checkpoint)
    info = DATASETS[cfg.train.dataset]
    names = list(info.class_names)
    prepared, errors = [], []
    for path in args.files:
        try:
            for name, gray in read_images(path, args.index):
                try:
                    prepared.append((name, prepare_digit(gray)))
                except InputError as exc:
                    raise InputError(f"{name}: {exc}") from None
        except InputError as exc:
            logger.error("%s", exc)
            errors.append({"file": str(path), "error": str(exc)})
    results = classify(Replicas(model, comm.threads), names, info.mean, info.std, prepared,
                       min(args.top_k, len(names))) if prepared else []
    if args.json:
        print(json.dumps({"checkpoint": str(args.checkpoint), "predictions": results,
                          "errors": errors}, indent=2))
    else:
        for r in results:
            best = ", ".join(f"{t['name']} ({100 * t['probability']:.1f}%)" for t in r["top_k"])
            print(f"{r['file']}: {best}")
    return 1 if errors else 0


def main(argv: list[str] | None = None) -> None:
    """Console entry point (``dpvit-predict``)."""
    sys.exit(run_main(partial(run, argv=argv), argv, parse_args=parse_args))


if __name__ == "__main__":
    main()
