"""Evaluation reports: metrics from a confusion matrix, written as JSON, Markdown and HTML.

Every rank scores its shard of the test split (``dpvit.evaluate.evaluate_model``, used by the
trainer and the evaluate command alike); the confusion matrices are summed across ranks and
rank 0 calls ``write_report`` with the total, so the numbers never depend on how the split was
sharded. ``report.json`` keeps exactly the keys DESIGN.md fixes; with a ``ReportContext`` (the
images, per-image predictions, model and metrics history) rank 0 also writes
``predictions.csv`` and the plots of ``report.html`` (see ``dpvit.report_html``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dpvit.data import DatasetInfo
from dpvit.errors import UserError
from dpvit.report_html import render_html


def confusion_matrix(targets: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts (K, K) int64: rows are true classes, columns predicted classes."""
    flat = np.asarray(targets, np.int64) * num_classes + np.asarray(predictions, np.int64)
    return np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def per_class_metrics(cm: np.ndarray) -> list[dict[str, Any]]:
    """Precision, recall, F1 and support per class; 0.0 where a ratio has no denominator
    (a class never predicted has precision 0, as scikit-learn's ``zero_division=0``)."""
    cm = np.asarray(cm, dtype=np.int64)
    tp = np.diag(cm).astype(np.float64)
    predicted = cm.sum(axis=0)
    support = cm.sum(axis=1)
    rows = []
    for k in range(cm.shape[0]):
        precision = tp[k] / predicted[k] if predicted[k] else 0.0
        recall = tp[k] / support[k] if support[k] else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        rows.append({"class": k, "precision": float(precision), "recall": float(recall),
                     "f1": float(f1), "support": int(support[k])})
    return rows


def build_report(cm: np.ndarray, loss_sum: float, *, dataset: str, split: str, epoch: int,
                 step: int, world_size: int, class_names: list[str] | None = None
                 ) -> dict[str, Any]:
    """The report.json dictionary (keys fixed by DESIGN.md) from summed counts."""
    cm = np.asarray(cm, dtype=np.int64)
    n = int(cm.sum())
    per_class = per_class_metrics(cm)
    if class_names:
        for row in per_class:
            row["name"] = class_names[row["class"]]
    return {
        "dataset": dataset,
        "split": split,
        "epoch": int(epoch),
        "step": int(step),
        "world_size": int(world_size),
        "num_samples": n,
        "loss": float(loss_sum / n) if n else float("nan"),
        "accuracy": float(np.trace(cm) / n) if n else 0.0,
        "macro_f1": float(np.mean([row["f1"] for row in per_class])),
        "per_class": per_class,
        "confusion_matrix": cm.tolist(),
    }


def render_markdown(report: dict[str, Any]) -> str:
    """A human-readable summary: headline numbers, per-class table, confusion matrix."""
    lines = [
        f"# {report['dataset']} {report['split']} report",
        "",
        f"epoch {report['epoch']}, step {report['step']}, {report['world_size']} rank(s), "
        f"{report['num_samples']} images",
        "",
        "| metric | value |",
        "| --- | --- |",
        f"| accuracy | {100 * report['accuracy']:.2f}% |",
        f"| macro F1 | {report['macro_f1']:.4f} |",
        f"| loss | {report['loss']:.4f} |",
        "",
        "| class | precision | recall | F1 | support |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for row in report["per_class"]:
        label = row.get("name", row["class"])
        lines.append(f"| {label} | {row['precision']:.4f} | {row['recall']:.4f} | "
                     f"{row['f1']:.4f} | {row['support']} |")
    cm = report["confusion_matrix"]
    lines += ["", "Confusion matrix (rows: true class, columns: predicted):", "",
              "| true \\ pred | " + " | ".join(str(k) for k in range(len(cm))) + " |",
              "| --- |" + " ---: |" * len(cm)]
    lines += [f"| {k} | " + " | ".join(str(v) for v in row) + " |" for k, row in enumerate(cm)]
    return "\n".join(lines) + "\n"


@dataclass
class ReportContext:
    """What the HTML report shows beyond the numbers of report.json (rank 0 only).

    Attributes:
        images: (N, H, W) uint8 images of the evaluated split, in split order.
        labels: (N,) true classes.
        predictions: (N,) predicted classes.
        confidences: (N,) probability of the predicted class.
        info: the dataset (normalisation constants and class names).
        model: the evaluated model, for attention-rollout maps (None: no maps).
        metrics: the run's metrics.jsonl records, for the training curves.
        lr_schedule: learning rate of every scheduled step (None: the logged values).
    """

    images: np.ndarray
    labels: np.ndarray
    predictions: np.ndarray
    confidences: np.ndarray
    info: DatasetInfo
    model: Any = None
    metrics: list[dict[str, Any]] = field(default_factory=list)
    lr_schedule: np.ndarray | None = None


def render_predictions_csv(context: ReportContext) -> str:
    """One line per image: index, true class, predicted class, confidence."""
    lines = ["index,label,prediction,confidence"]
    lines += [f"{i},{t},{p},{c:.6f}" for i, (t, p, c) in enumerate(zip(
        context.labels.tolist(), context.predictions.tolist(), context.confidences.tolist(),
        strict=True))]
    return "\n".join(lines) + "\n"


def _write_atomic(path: Path, data: str | bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, then rename it over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data)
        os.replace(tmp, path)
    except OSError as err:  # a full or read-only disk: one line, not a traceback
        tmp.unlink(missing_ok=True)
        raise UserError(f"could not write report file {path}: {err.strerror or err}") from err


def write_report(report: dict[str, Any], report_dir: str | os.PathLike,
                 context: ReportContext | None = None) -> Path:
    """Write report.json, report.md and report.html into ``report_dir`` (each atomically).

    With a ``context`` also predictions.csv and the plots (PNG files, embedded in the HTML).

    Returns:
        The path of report.json.
    """
    out = Path(report_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_atomic(out / "report.json", json.dumps(report, indent=2) + "\n")
    _write_atomic(out / "report.md", render_markdown(report))
    if context is not None:
        _write_atomic(out / "predictions.csv", render_predictions_csv(context))
    html, pngs = render_html(report, context)
    for name, data in pngs.items():
        _write_atomic(out / name, data)
    _write_atomic(out / "report.html", html)
    return out / "report.json"
