"""The report's figures as PNG bytes, drawn with matplotlib's Agg backend (no display needed).

matplotlib is an optional extra (``pip install -e ".[plots]"``); importing this module without
it raises ImportError, which ``dpvit.report.html`` turns into a note in the page. Each
``*_figure`` function draws one figure from plain arrays (tests look at its artists), and the
function of the same name without the suffix returns it encoded as a PNG.
"""

from __future__ import annotations

import io
from typing import Any

import matplotlib

matplotlib.use("Agg")  # before pyplot: never try to open a window
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

DPI = 100
#: (steps, values) of one line of a figure
Line = tuple[np.ndarray, np.ndarray]


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def curves_figure(metrics: list[dict[str, Any]]) -> Figure:
    """Loss and accuracy against step: training (logged steps) and test (each evaluation)."""
    steps = [m for m in metrics if m.get("kind") == "step"]
    epochs = [m for m in metrics if m.get("kind") == "epoch"]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(7.2, 2.7))
    for ax, train_key, test_key, title in ((ax_loss, "loss", "test_loss", "loss"),
                                           (ax_acc, "accuracy", "test_accuracy", "accuracy")):
        train = [(m["step"], m[train_key]) for m in steps if train_key in m]
        test = [(m["step"], m[test_key]) for m in epochs if test_key in m]
        if train:
            ax.plot(*zip(*train, strict=True), ".-", label="train (batch)")
        if test:
            ax.plot(*zip(*test, strict=True), "o-", label="test")
        ax.set_xlim(left=0)  # a run starts at step 0: a single logged point is not centred
        ax.set_xlabel("step")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def curves(metrics: list[dict[str, Any]]) -> bytes:
    return _png(curves_figure(metrics))


def lr_figure(run: Line | None, planned: Line | None, logged: Line | None) -> Figure:
    """The learning rate against step: the steps run as a solid line, the rest of the
    schedule that was planned but not (yet) run faint and dashed, and the logged values as
    dots (step ``s``, counted from 1, uses the rate logged with it)."""
    fig, ax = plt.subplots(figsize=(4.2, 2.7))
    if run is not None and len(run[0]):
        ax.plot(run[0], run[1], "-", color="C0", lw=2,
                label=f"run: steps 1-{int(run[0][-1])}")
    if planned is not None and len(planned[0]):
        ax.plot(planned[0], planned[1], "--", color="C0", lw=1.2, alpha=0.45,
                label=f"planned, not run: to step {int(planned[0][-1])}")
        if run is not None and len(run[0]):
            ax.axvline(run[0][-1], color="0.4", lw=0.8, ls=":")
    if logged is not None and len(logged[0]):
        ax.plot(logged[0], logged[1], ".", color="C1", label="logged")
    ax.set_xlim(left=0)
    ax.set_xlabel("step")
    ax.set_title("learning rate", fontsize=10)
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig


def lr_schedule(run: Line | None, planned: Line | None, logged: Line | None) -> bytes:
    return _png(lr_figure(run, planned, logged))


def confusion_figure(cm: np.ndarray, class_names: list[str]) -> Figure:
    """Heatmap of the confusion matrix, coloured by row share, with the counts in the cells
    (an empty cell is 0); the class names upright on both axes."""
    cm = np.asarray(cm)
    k = len(cm)
    share = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    longest = max((len(n) for n in class_names), default=1)
    fig, ax = plt.subplots(figsize=(0.42 * k + 1.6 + 0.06 * longest, 0.42 * k + 0.9))
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            if cm[i, j]:
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if share[i, j] > 0.5 else "black")
    # upright labels; long names (Fashion-MNIST) alternate rows so that they do not collide
    ax.set_xticks(range(k), class_names)
    if longest > 3:
        for j, label in enumerate(ax.get_xticklabels()):
            label.set_y(-0.045 * (j % 2))
    ax.set_yticks(range(k), class_names)
    ax.tick_params(length=0)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.03, label="share of the true class")
    fig.tight_layout()
    return fig


def confusion(cm: np.ndarray, class_names: list[str]) -> bytes:
    return _png(confusion_figure(cm, class_names))
