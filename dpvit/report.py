"""Evaluation reports: metrics from a confusion matrix, written as JSON and Markdown.

Every rank scores its shard of the test split; the trainer sums the confusion matrices across
ranks and rank 0 calls ``write_report`` with the total, so the numbers never depend on how the
split was sharded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np


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


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_report(report: dict[str, Any], report_dir: str | os.PathLike) -> Path:
    """Write report.json and report.md into ``report_dir`` (each replaced atomically)."""
    out = Path(report_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_atomic(out / "report.json", json.dumps(report, indent=2) + "\n")
    _write_atomic(out / "report.md", render_markdown(report))
    return out / "report.json"
