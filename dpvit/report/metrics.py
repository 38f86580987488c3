"""Classification metrics from a confusion matrix: the numbers of report.json.

The confusion matrix is what ranks sum (it does not depend on how the split was sharded), and
every other number is derived from the total on rank 0 and every other rank alike.
"""

from __future__ import annotations

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
