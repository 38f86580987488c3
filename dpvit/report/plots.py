"""The report's figures as PNG bytes, drawn with matplotlib's Agg backend (no display needed).

matplotlib is an optional extra (``pip install -e ".[plots]"``); importing this module without
it raises ImportError, which ``dpvit.report.html`` turns into a note in the page. Each function
draws one figure from plain arrays and returns the encoded PNG.
"""

from __future__ import annotations

import io
from typing import Any

import matplotlib

matplotlib.use("Agg")  # before pyplot: never try to open a window
import matplotlib.pyplot as plt
import numpy as np

DPI = 100


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def curves(metrics: list[dict[str, Any]]) -> bytes:
    """Loss and accuracy against step: training (logged steps) and test (each evaluation)."""
    steps = [m for m in metrics if m.get("kind") == "step"]
    epochs = [m for m in metrics if m.get("kind") == "epoch"]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, train_key, test_key, title in ((ax_loss, "loss", "test_loss", "loss"),
                                           (ax_acc, "accuracy", "test_accuracy", "accuracy")):
        train = [(m["step"], m[train_key]) for m in steps if train_key in m]
        test = [(m["step"], m[test_key]) for m in epochs if test_key in m]
        if train:
            ax.plot(*zip(*train, strict=True), ".-", label="train (batch)")
        if test:
            ax.plot(*zip(*test, strict=True), "o-", label="test")
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    return _png(fig)


def lr_schedule(schedule: np.ndarray | None, metrics: list[dict[str, Any]]) -> bytes:
    """The learning rate per step: the whole schedule when known, and the logged values."""
    fig, ax = plt.subplots(figsize=(10, 2.8))
    if schedule is not None:
        ax.plot(np.arange(len(schedule)), schedule, "-", label="schedule")
    logged = [(m["step"], m["lr"]) for m in metrics if m.get("kind") == "step" and "lr" in m]
    if logged:
        ax.plot(*zip(*logged, strict=True), ".", label="logged (lr of the step before)")
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    ax.grid(alpha=0.3)
    ax.legend()
    return _png(fig)


def confusion(cm: np.ndarray, class_names: list[str]) -> bytes:
    """Heatmap of the confusion matrix, coloured by row share, annotated with counts."""
    cm = np.asarray(cm)
    k = len(cm)
    share = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(0.55 * k + 2.5, 0.55 * k + 1.8))
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            if cm[i, j]:
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if share[i, j] > 0.5 else "black")
    ax.set_xticks(range(k), class_names, rotation=45, ha="right")
    ax.set_yticks(range(k), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.colorbar(image, ax=ax, fraction=0.046, label="share of the true class")
    return _png(fig)
