"""``--tensorboard DIR``: rank 0's metrics as TensorBoard event files, beside metrics.jsonl.

Every record the trainer appends to metrics.jsonl (the source of truth) is also written here
as scalars, so ``tensorboard --logdir DIR`` shows a dpvit run like any PyTorch run:

    train/loss, train/accuracy, train/lr, train/grad_norm, train/images_per_s   (logged steps)
    test/loss, test/accuracy, test/macro_f1                                     (each epoch)
    test/confusion_matrix                                                       (image, each epoch)

The confusion image is the report's ``confusion_matrix.png`` when matplotlib drew one (the
``plots`` extra), else a plain heatmap drawn here (one cell per class pair, shaded by the
share of the true class, encoded by ``dpvit.data.imageio.encode_png``). It goes into the
event file as PNG bytes, so neither Pillow nor matplotlib is needed. ``tensorboardX`` is the
optional extra ``tensorboard`` (``pip install -e ".[tensorboard]"``); only rank 0 imports it.
"""

from __future__ import annotations

import struct
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import numpy as np

from dpvit.data.imageio import encode_png
from dpvit.errors import UserError

INSTALL = 'pip install "tensorboardX>=2.6"  (or: pip install -e ".[tensorboard]")'

#: metrics.jsonl key -> TensorBoard tag, for step records and epoch records
STEP_TAGS = {"loss": "train/loss", "accuracy": "train/accuracy", "lr": "train/lr",
             "grad_norm": "train/grad_norm", "images_per_s": "train/images_per_s",
             "skipped_steps": "train/skipped_steps"}
EPOCH_TAGS = {"test_loss": "test/loss", "test_accuracy": "test/accuracy",
              "macro_f1": "test/macro_f1"}
CONFUSION_TAG = "test/confusion_matrix"


def require_tensorboardx() -> None:
    """Raise one line with the pip command when tensorboardX is not installed."""
    try:
        import tensorboardX  # noqa: F401
    except ImportError:
        raise UserError("--tensorboard needs the optional package tensorboardX, which is not "
                        f"installed; install it with: {INSTALL}") from None


def confusion_heatmap(cm: np.ndarray, cell: int = 16) -> np.ndarray:
    """(k*cell, k*cell, 3) uint8: white (0%) to blue (100%) by share of the true class (row)."""
    cm = np.asarray(cm, dtype=np.float64)
    share = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    white, blue = np.array([255.0, 255.0, 255.0]), np.array([8.0, 48.0, 107.0])
    rgb = (white + share[..., None] * (blue - white)).round().astype(np.uint8)
    return np.repeat(np.repeat(rgb, cell, axis=0), cell, axis=1)


def _png_size(png: bytes) -> tuple[int, int]:
    """(height, width) from a PNG's IHDR chunk."""
    width, height = struct.unpack(">II", png[16:24])
    return height, width


class TensorBoardLog:
    """Event files in ``logdir`` on the writing rank; does nothing when ``logdir`` is None or
    on other ranks (``enabled`` False).

    Raises:
        UserError: tensorboardX is not installed (on the writing rank).
    """

    def __init__(self, logdir: str | Path | None, enabled: bool) -> None:
        self.writer = None
        if logdir is None or not enabled:
            return
        require_tensorboardx()
        from tensorboardX import FileWriter

        self.logdir = Path(logdir)
        self.writer = FileWriter(str(self.logdir), flush_secs=30)

    def record(self, record: dict[str, Any]) -> None:
        """Write a metrics.jsonl record's numbers as scalars at its step."""
        if self.writer is None:
            return
        tags = {"step": STEP_TAGS, "epoch": EPOCH_TAGS}.get(record.get("kind"))
        if tags is None or "step" not in record:
            return
        from tensorboardX.summary import scalar

        for key, tag in tags.items():
            value = record.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_summary(scalar(tag, float(value)), int(record["step"]),
                                        walltime=record.get("time"))

    def confusion(self, cm: np.ndarray, step: int, report_dir: Path | None = None) -> None:
        """The epoch's confusion matrix as an image: the report's figure in ``report_dir`` when
        matplotlib drew it (it has just written the report), else a heatmap of ``cm``; then
        flush, so each epoch is on disk."""
        if self.writer is None:
            return
        from tensorboardX.proto.summary_pb2 import Summary

        figure = None if report_dir is None else Path(report_dir) / "confusion_matrix.png"
        # without matplotlib the report draws no figure: a file there would be an older run's
        fresh = figure is not None and find_spec("matplotlib") is not None and figure.is_file()
        png = figure.read_bytes() if fresh else encode_png(confusion_heatmap(cm))
        height, width = _png_size(png)
        # PNG colour type -> TensorBoard colorspace (grey, grey+alpha, RGB, RGBA)
        colorspace = {0: 1, 4: 2, 2: 3, 6: 4}.get(png[25], 3)
        image = Summary.Image(height=height, width=width, colorspace=colorspace,
                              encoded_image_string=png)
        self.writer.add_summary(Summary(value=[Summary.Value(tag=CONFUSION_TAG, image=image)]),
                                int(step))
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
