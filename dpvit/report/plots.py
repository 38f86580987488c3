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


def compute_figure(flops: np.ndarray, accuracy: np.ndarray) -> Figure:
    """Test accuracy (each evaluation) against the training FLOPs spent before it, on a log
    axis: compute, not steps or epochs, is what runs of different model sizes and lengths
    share, so their curves compare on this axis."""
    fig, ax = plt.subplots(figsize=(4.2, 2.7))
    ax.plot(flops, accuracy, "o-", color="C1", label="test")
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs (forward + backward)")
    ax.set_title("test accuracy against training compute", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def compute(flops: np.ndarray, accuracy: np.ndarray) -> bytes:
    return _png(compute_figure(flops, accuracy))


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


#: Colours of the timeline's span categories (``dpvit.training.timeline.CATEGORIES``).
TIMELINE_COLOURS = {"data": "0.55", "compute": "#c6dbef", "forward": "C0", "backward": "C1",
                    "comm": "C3", "optimizer": "C2", "evaluation": "C4", "checkpoint": "C5",
                    "report": "C6", "other": "C8"}


def timeline_figure(trace: dict[str, Any], steps: int | None = None,
                    title: str | None = None) -> Figure:
    """A ``--timeline`` trace (Chrome trace JSON) as horizontal bars: one row per rank and
    track, time in ms from the first recorded step; each step a grey band labelled with its
    number; nested spans (blocks inside forward/backward) drawn thinner on top of their
    parents. ``steps`` keeps the first N recorded steps (rank 0's) and what overlaps them.
    Spans shorter than 0.2% of the axis are widened to it, so that a 5 us allreduce shows."""
    spans = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
    names = {(e["pid"], e["tid"]): e["args"]["name"] for e in trace["traceEvents"]
             if e.get("ph") == "M" and e["name"] == "thread_name"}
    step_spans = sorted((e for e in spans if e.get("cat") == "step" and e["pid"] == 0),
                        key=lambda e: e["ts"])
    start = min((e["ts"] for e in spans), default=0.0)
    stop = max((e["ts"] + e["dur"] for e in spans), default=1.0)
    if step_spans:
        start = step_spans[0]["ts"]
        if steps is not None:
            last = step_spans[: max(steps, 1)][-1]
            stop = last["ts"] + last["dur"]
    spans = [e for e in spans if e["ts"] < stop and e["ts"] + e["dur"] > start]
    rows = sorted({(e["pid"], e["tid"]) for e in spans})
    fig, ax = plt.subplots(figsize=(10, 0.55 * len(rows) + 1.4))
    scale = 1e-3  # us -> ms
    width = (stop - start) * scale
    least = 0.002 * width
    seen: dict[str, Any] = {}
    for y, row in enumerate(rows):
        mine = sorted((e for e in spans if (e["pid"], e["tid"]) == row),
                      key=lambda e: (e["ts"], -e["dur"]))
        open_ends: list[float] = []
        for e in mine:
            while open_ends and open_ends[-1] <= e["ts"]:
                open_ends.pop()
            depth = len(open_ends)
            open_ends.append(e["ts"] + e["dur"])
            x0, w = (e["ts"] - start) * scale, e["dur"] * scale
            if e.get("cat") == "step":
                ax.barh(y, w, left=x0, height=0.9, color="0.93", edgecolor="0.6", lw=0.6,
                        zorder=0)
                if row[0] == 0 and row == rows[0]:
                    ax.text(x0 + w / 2, y - 0.5, e["name"], ha="center", va="bottom",
                            fontsize=7, color="0.3")
                continue
            category = e.get("cat", "other")
            colour = TIMELINE_COLOURS.get(category, TIMELINE_COLOURS["other"])
            bar = ax.barh(y, max(w, least), left=x0, height=max(0.75 - 0.2 * depth, 0.25),
                          color=colour, edgecolor="white" if depth else "none", lw=0.3,
                          zorder=1 + depth)
            seen.setdefault(category, bar)
    ax.set_yticks(range(len(rows)), [f"rank {pid} {names.get((pid, tid), tid)}"
                                     for pid, tid in rows])
    ax.set_ylim(len(rows) - 0.4, -0.7)
    ax.set_xlim(0, width)
    ax.set_xlabel("ms (each rank's clock, zeroed at a common barrier)")
    ax.grid(axis="x", alpha=0.3)
    order = [c for c in TIMELINE_COLOURS if c in seen]
    ax.legend([seen[c] for c in order], order, fontsize=7, ncol=min(len(order), 9),
              loc="upper center", bbox_to_anchor=(0.5, -0.28 if len(rows) > 2 else -0.4),
              frameon=False)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def timeline(trace: dict[str, Any], steps: int | None = None, title: str | None = None) -> bytes:
    return _png(timeline_figure(trace, steps, title))
