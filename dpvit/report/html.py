"""report.html: one self-contained page (every image embedded as a base64 PNG, no scripts).

Sections: the headline numbers, training and test curves, the learning-rate schedule, the
confusion matrix (heatmap and table), per-class metrics, a grid of misclassified test images
with true/predicted class and confidence, and attention-rollout maps for a few test images.
The curves, learning-rate and confusion-matrix figures need matplotlib (optional extra
``plots``); without it the page keeps everything else and says what is missing and how to get
it. Those PNGs are also returned so that the report directory holds them as files. The test
images (misclassified ones, attention overlays) are small PNGs encoded with zlib alone
(``dpvit.data.imageio.encode_png``) and laid out by the page itself, so they need neither
matplotlib nor Pillow and cost milliseconds.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dpvit.data import DatasetInfo, normalize
from dpvit.data.imageio import encode_png, resize_matrix
from dpvit.report.rollout import attention_rollout

MAX_MISCLASSIFIED = 32  # images in the misclassified grid
NUM_ATTENTION = 8  # test images with attention-rollout maps
THUMB = 84  # displayed height of a test image in pixels (3x, pixelated)
MISSING_MATPLOTLIB = ('The curves, learning-rate and confusion-matrix figures need matplotlib, '
                      'which is not installed: <code>pip install -e ".[plots]"</code>, then '
                      'evaluate again (<code>python -m dpvit.evaluate --checkpoint ...</code>).')

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f3f3f3; }
td.diag { background: #dbeafe; font-weight: bold; }
img { max-width: 100%; display: block; margin: 0.5em 0 1.5em; }
.grid { display: flex; flex-wrap: wrap; gap: 10px; margin-bottom: 1.5em; }
.grid figure { margin: 0; font-size: 12px; text-align: center; width: min-content; }
.grid img { image-rendering: pixelated; margin: 0 auto 2px; max-width: none; }
.missing { background: #fff4e5; border-left: 4px solid #f0a020; padding: 0.5em 1em; }
"""


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


def _figures(report: dict[str, Any], context: ReportContext | None) -> dict[str, bytes]:
    """Draw every figure the context allows; raises ImportError without matplotlib."""
    from dpvit.report import plots

    names = [row.get("name", str(row["class"])) for row in report["per_class"]]
    figures = {"confusion_matrix.png": plots.confusion(np.array(report["confusion_matrix"]),
                                                       names)}
    if context is None:
        return figures
    if context.metrics or context.lr_schedule is not None:
        figures["curves.png"] = plots.curves(context.metrics)
        figures["lr_schedule.png"] = plots.lr_schedule(context.lr_schedule, context.metrics)
    return figures


def _thumb(image: np.ndarray, caption: str) -> str:
    """A test image as an embedded PNG, shown enlarged with sharp pixels, with a caption
    (HTML, already escaped)."""
    data = base64.b64encode(encode_png(image)).decode("ascii")
    h, w = image.shape[:2]
    return (f'<figure><img src="data:image/png;base64,{data}" width="{round(THUMB * w / h)}" '
            f'height="{THUMB}" alt="{caption.replace("<br>", " ")}">'
            f"<figcaption>{caption}</figcaption></figure>")


def _overlay(image: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """(H, 2W + 1, 3) uint8: the grayscale image, then the image dimmed under the (g, g) heat
    map (upsampled, black-red-yellow), side by side."""
    h, w = image.shape
    g = heat.shape[0]
    heat = np.clip(resize_matrix(g, h) @ heat @ resize_matrix(g, w).T, 0.0, 1.0)
    colour = np.stack([np.clip(2 * heat, 0, 1), np.clip(2 * heat - 1, 0, 1),
                       np.zeros_like(heat)], axis=-1)
    over = np.rint(255 * (0.45 * image[..., None] / 255 + 0.55 * colour)).astype(np.uint8)
    plain = np.repeat(image[..., None], 3, axis=-1)
    return np.concatenate([plain, np.full((h, 1, 3), 255, np.uint8), over], axis=1)


def _misclassified(context: ReportContext, names: list[str]) -> str:
    all_wrong = np.flatnonzero(context.predictions != context.labels)
    # the most confident mistakes first: the most informative ones
    order = np.argsort(-context.confidences[all_wrong], kind="stable")
    wrong = all_wrong[order][:MAX_MISCLASSIFIED]
    cells = [_thumb(context.images[i], f"#{i} true {html.escape(names[context.labels[i]])}<br>"
                    f"pred {html.escape(names[context.predictions[i]])} "
                    f"{100 * context.confidences[i]:.0f}%") for i in wrong]
    return (f"<h2>Misclassified test images</h2><p>{len(all_wrong)} of {len(context.labels)}; "
            f"the {len(wrong)} most confident mistakes (test index, "
            "true class, predicted class and its probability).</p>"
            f'<div class="grid">{"".join(cells)}</div>')


def _attention(context: ReportContext, names: list[str]) -> str:
    pick = np.arange(min(NUM_ATTENTION, len(context.images)))
    x = normalize(context.images[pick], context.info.mean, context.info.std)
    maps = attention_rollout(context.model, x.astype(context.model.dtype))
    cells = [_thumb(_overlay(context.images[i], heat),
                    f"#{i} true {html.escape(names[context.labels[i]])}, "
                    f"pred {html.escape(names[context.predictions[i]])}")
             for i, heat in zip(pick, maps, strict=True)]
    return ("<h2>Attention rollout</h2><p>Where the class token looks, through all layers "
            "(Abnar &amp; Zuidema 2020), for the first test images: each image, and its "
            f'rollout map over it (bright: more attention).</p><div class="grid">{"".join(cells)}'
            "</div>")


def _section(figures: dict[str, bytes], name: str, heading: str, intro: str = "") -> str:
    """A heading, an optional paragraph and the embedded figure ("" when it was not drawn)."""
    if name not in figures:
        return ""
    data = base64.b64encode(figures[name]).decode("ascii")
    intro = f"<p>{intro}</p>" if intro else ""
    return (f"<h2>{heading}</h2>{intro}"
            f'<img src="data:image/png;base64,{data}" alt="{html.escape(heading)}">')


def _table(header: list[str], rows: list[list[str]], diag: bool = False) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = []
    for i, row in enumerate(rows):
        cells = [f"<th>{html.escape(row[0])}</th>"]
        cells += [f'<td class="diag">{c}</td>' if diag and j == i else f"<td>{c}</td>"
                  for j, c in enumerate(row[1:])]
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def render_html(report: dict[str, Any], context: ReportContext | None
                ) -> tuple[str, dict[str, bytes]]:
    """The page and its figures.

    Args:
        report: the report.json dictionary.
        context: images, predictions, model and metrics (None: numbers only).

    Returns:
        (HTML text, {PNG file name: PNG bytes}).
    """
    try:
        figures = _figures(report, context)
        missing = ""
    except ImportError:
        figures, missing = {}, f'<p class="missing">{MISSING_MATPLOTLIB}</p>'
    names = [row.get("name", str(row["class"])) for row in report["per_class"]]
    title = html.escape(f"{report['dataset']} {report['split']} report")
    per_class = _table(["class", "precision", "recall", "F1", "support"], [
        [names[r["class"]], f"{r['precision']:.4f}", f"{r['recall']:.4f}", f"{r['f1']:.4f}",
         str(r["support"])] for r in report["per_class"]])
    cm_table = _table(["true \\ predicted", *names], [
        [names[i], *map(str, row)] for i, row in enumerate(report["confusion_matrix"])],
        diag=True)
    samples = ""
    if context is not None and len(context.labels):
        samples = _misclassified(context, names)
        if context.model is not None:
            samples += _attention(context, names)
    parts = [
        f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{title}</title>",
        f"<style>{STYLE}</style></head><body><h1>{title}</h1>",
        f"<p>epoch {report['epoch']}, step {report['step']}, {report['world_size']} rank(s), "
        f"{report['num_samples']} images</p>", missing,
        _table(["metric", "value"], [["accuracy", f"{100 * report['accuracy']:.2f}%"],
                                     ["macro F1", f"{report['macro_f1']:.4f}"],
                                     ["loss", f"{report['loss']:.4f}"]]),
        _section(figures, "curves.png", "Training curves",
                 "Training loss and accuracy of the logged batches; test after each epoch."),
        _section(figures, "lr_schedule.png", "Learning rate"),
        _section(figures, "confusion_matrix.png", "Confusion matrix",
                 "Rows: true class; columns: predicted class."),
        "<h2>Confusion matrix counts</h2>", cm_table, "<h2>Per-class metrics</h2>", per_class,
        samples, "</body></html>",
    ]
    return "\n".join(p for p in parts if p) + "\n", figures
