"""``python -m dpvit.export``: a checkpoint's weights as a timm ViT state dict in safetensors.

    python -m dpvit.export --checkpoint runs/x/checkpoints/best.h5 --out vit-mnist.safetensors

Writes the parameters in the layout of ``timm.models.vision_transformer.VisionTransformer``'s
state dict (``dpvit.interop.timm_layout``: names, shapes, float32) with the ``safetensors``
package (the optional extra ``export``: ``pip install -e ".[export]"``), and as metadata (JSON
strings) the timm constructor arguments, the GELU approximation and LayerNorm eps, the input
normalisation and the dpvit model config; then prints Python that builds the timm model and
loads the file with ``strict=True``. The same file starts a new dpvit run:
``python -m dpvit.train --init-from FILE``.

A model timm cannot compute (``--patch-embed stem``, ``--patch-overlap``) is refused with one
line; no file is written. Only rank 0 of an mpirun job does anything.
"""

from __future__ import annotations

import argparse
import logging
import sys
from functools import partial
from pathlib import Path

from dpvit import __version__
from dpvit.cli import CliParser, run_main
from dpvit.data import DATASETS
from dpvit.errors import ConfigError
from dpvit.inference import load_model
from dpvit.interop.timm_layout import loading_snippet, metadata, to_timm, unsupported
from dpvit.interop.weights import save_weights
from dpvit.parallel.comm import Comm

logger = logging.getLogger("dpvit.export")


def build_parser() -> CliParser:
    """The command's flags (errors raise ConfigError: one line, no usage dump)."""
    parser = CliParser(prog="dpvit.export",
                       description="Write a checkpoint's weights as a timm VisionTransformer "
                                   "state dict in a .safetensors file.")
    parser.add_argument("--checkpoint", required=True, type=Path, help="checkpoint .h5 file")
    parser.add_argument("--out", required=True, type=Path,
                        help="the .safetensors file to write (replaced if it exists)")
    parser.add_argument("--quiet", action="store_true",
                        help="do not print the Python snippet that loads the file")
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.out.suffix != ".safetensors":
        raise ConfigError(f"--out must name a .safetensors file, got {args.out}")
    if not args.out.resolve().parent.is_dir():
        raise ConfigError(f"--out {args.out}: directory {args.out.parent} does not exist")
    return args


def export(checkpoint: Path, out: Path) -> dict[str, str]:
    """Write ``out`` from ``checkpoint``; returns the metadata written.

    Raises:
        CheckpointError: the checkpoint is missing or damaged.
        ConfigError: its model is one timm cannot express (nothing is written).
        UserError: safetensors is not installed, or ``out`` cannot be written.
    """
    model, cfg, ckpt = load_model(checkpoint)
    reason = unsupported(cfg.model)
    if reason:
        raise ConfigError(f"cannot export {checkpoint}: {reason}; no file written")
    tensors = to_timm(model.store.named_params(), cfg.model)
    meta = metadata(cfg.model, DATASETS[cfg.train.dataset],
                    {"checkpoint": str(checkpoint), "step": ckpt.step, "epoch": ckpt.epoch,
                     "dpvit_version": __version__})
    save_weights(out, tensors, meta)
    return meta


def run(comm: Comm, argv: list[str] | None) -> int:
    """The command body (rank 0 only does the work)."""
    args = parse_args(argv)
    if not comm.is_root:
        return 0
    export(args.checkpoint, args.out)
    logger.info("wrote %s (timm VisionTransformer state dict, float32)", args.out)
    if not args.quiet:
        print("# load it into timm (pip install timm safetensors):")
        print(loading_snippet(str(args.out)), end="")
    return 0


def main(argv: list[str] | None = None) -> None:
    """Console entry point (``dpvit-export``)."""
    sys.exit(run_main(partial(run, argv=argv), argv, parse_args=parse_args))


if __name__ == "__main__":
    main()
