"""report.html: one self-contained page (every image embedded as a base64 PNG, no scripts).

The header says what was evaluated (run, date, checkpoint, dpvit version, data, model and
training settings, how far the schedule got, the training compute spent) beside the headline
numbers, and a table of contents links the sections: training curves and the learning rate (the
steps run solid, the rest of the planned schedule faint), test accuracy against training FLOPs
(the axis on which runs of any model size or length compare), the confusion matrix (a heatmap
with the counts in its cells) beside the per-class metrics, a grid of misclassified test images
with true/predicted class and confidence, and attention-rollout maps for a few test images,
wrong predictions marked. The curves, learning-rate, compute and confusion-matrix figures need
matplotlib (optional extra ``plots``); without it the page keeps everything else (the confusion
matrix as a table) and says what is missing and how to get it. Those PNGs are also returned so
that the report directory holds them as files. The test images (misclassified ones, attention
overlays) are small PNGs encoded with zlib alone (``dpvit.data.imageio.encode_png``) and laid
out by the page itself, so they need neither matplotlib nor Pillow and cost milliseconds.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np

from dpvit.data import DatasetInfo, normalize
from dpvit.data.imageio import encode_png, resize_matrix
from dpvit.flops import format_flops
from dpvit.report.rollout import attention_rollout

MAX_MISCLASSIFIED = 32  # images in the misclassified grid
NUM_ATTENTION = 8  # test images with attention-rollout maps (up to half of them mistakes)
THUMB = 56  # displayed height of a misclassified test image in pixels (2x, pixelated)
ATTENTION_THUMB = 64  # displayed height of an attention overlay
MISSING_MATPLOTLIB = ('The curves, learning-rate, compute and confusion-matrix figures need '
                      'matplotlib, which is not installed: <code>pip install -e ".[plots]"'
                      '</code>, then evaluate again (<code>python -m dpvit.evaluate '
                      '--checkpoint ...</code>).')

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1em auto; max-width: 1160px; padding: 0 1em;
       color: #222; font-size: 15px; }
h1 { font-size: 1.5em; margin: 0.2em 0; }
h1 .run { color: #555; font-weight: normal; }
h2 { font-size: 1.15em; margin: 0.8em 0 0.3em; scroll-margin-top: 2.6em; }
p { margin: 0.3em 0; }
.note { color: #555; font-size: 0.9em; }
table { border-collapse: collapse; margin: 0.3em 0 0.8em; }
th, td { border: 1px solid #ccc; padding: 0.15em 0.5em; text-align: right; }
th { background: #f3f3f3; }
td.diag { background: #dbeafe; font-weight: bold; }
header { display: flex; gap: 1.5em; align-items: flex-start; }
.headline { display: flex; gap: 0.6em; }
.headline div { border: 1px solid #ccc; border-radius: 6px; padding: 0.3em 0.8em;
                text-align: center; color: #555; font-size: 0.85em; white-space: nowrap; }
.headline b { display: block; font-size: 1.7em; color: #222; }
table.meta { margin: 0; font-size: 0.88em; }
table.meta th, table.meta td { border: none; background: none; text-align: left;
                               padding: 0.05em 0.6em 0.05em 0; vertical-align: top; }
table.meta th { color: #666; font-weight: normal; white-space: nowrap; }
nav.toc { position: sticky; top: 0; background: #fff; border-bottom: 1px solid #ddd;
          padding: 0.35em 0; margin: 0.6em 0 0; font-size: 0.9em; z-index: 1; }
nav.toc a { margin-right: 1.1em; color: #1a5fb4; text-decoration: none; }
.row { display: flex; gap: 1.5em; align-items: flex-start; }
.row > section, .row > .stack { flex: 0 1 auto; min-width: 0; }
.row > .stack { max-width: 460px; }
@media (max-width: 900px) { .row, header { flex-wrap: wrap; } }
img { max-width: 100%; display: block; margin: 0.3em 0; }
.grid { display: flex; flex-wrap: wrap; gap: 6px 8px; }
.grid figure { margin: 0; font-size: 11px; text-align: center; width: min-content;
               line-height: 1.25; }
.grid figcaption { white-space: nowrap; }
.grid img { image-rendering: pixelated; margin: 0 auto 2px; max-width: none; }
.grid figure.wrong img { outline: 3px solid #d62728; outline-offset: -3px; }
.grid figure.wrong figcaption { color: #b00; }
.grid figure.right figcaption { color: #2a7a2a; }
.missing { background: #fff4e5; border-left: 4px solid #f0a020; padding: 0.5em 1em; }
"""


def _now() -> str:
    return datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z").strip()


def _version() -> str:
    from dpvit import __version__  # not at import time: dpvit/__init__ imports this package

    return __version__


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
        run_name: the run's name (its directory), shown in the title ("": not shown).
        checkpoint: the checkpoint the report is about ("": not shown).
        config: the run's ``Config.to_dict()``, summarised in the header (None: not shown).
        created: when the report was written (default: now).
        version: the dpvit version that wrote it (default: this one).
    """

    images: np.ndarray
    labels: np.ndarray
    predictions: np.ndarray
    confidences: np.ndarray
    info: DatasetInfo
    model: Any = None
    metrics: list[dict[str, Any]] = field(default_factory=list)
    lr_schedule: np.ndarray | None = None
    run_name: str = ""
    checkpoint: str = ""
    config: dict[str, Any] | None = None
    created: str = field(default_factory=_now)
    version: str = field(default_factory=_version)


#: (steps, learning rates) of one part of the schedule
LrPart = tuple[np.ndarray, np.ndarray]


def lr_parts(schedule: np.ndarray, steps_run: int) -> tuple[LrPart, LrPart]:
    """The learning-rate schedule against step number, cut where the run got to.

    Step ``s`` (counted from 1, as the logged steps are) uses ``schedule[s - 1]``.

    Returns:
        ((steps, rates) of the steps run, (steps, rates) planned but not run). The planned part
        starts at the last step run, so that the two lines join; it is empty when the whole
        schedule ran.
    """
    schedule = np.asarray(schedule, dtype=np.float64)
    steps = np.arange(1, len(schedule) + 1)
    done = int(np.clip(steps_run, 0, len(schedule)))
    start = len(schedule) if done == len(schedule) else max(done - 1, 0)
    return (steps[:done], schedule[:done]), (steps[start:], schedule[start:])


def _logged_lr(metrics: list[dict[str, Any]]) -> LrPart:
    logged = [(m["step"], m["lr"]) for m in metrics if m.get("kind") == "step" and "lr" in m]
    return np.array([s for s, _ in logged]), np.array([lr for _, lr in logged])


def compute_points(metrics: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """(training FLOPs, test accuracy) of each evaluation that logged its compute, by FLOPs
    (records of runs from before ``train_flops`` existed are left out)."""
    points = sorted((m["train_flops"], m["test_accuracy"]) for m in metrics
                    if m.get("kind") == "epoch" and m.get("train_flops", 0) > 0
                    and "test_accuracy" in m)
    return np.array([f for f, _ in points]), np.array([a for _, a in points])


def _figures(report: dict[str, Any], context: ReportContext | None) -> dict[str, bytes]:
    """Draw every figure the context allows; raises ImportError without matplotlib."""
    from dpvit.report import plots

    figures = {"confusion_matrix.png": plots.confusion(np.array(report["confusion_matrix"]),
                                                       _names(report))}
    if context is None:
        return figures
    if context.metrics or context.lr_schedule is not None:
        figures["curves.png"] = plots.curves(context.metrics)
        run = planned = None
        if context.lr_schedule is not None:
            run, planned = lr_parts(context.lr_schedule, report["step"])
        figures["lr_schedule.png"] = plots.lr_schedule(run, planned,
                                                       _logged_lr(context.metrics))
    flops, accuracy = compute_points(context.metrics)
    if len(flops):
        figures["accuracy_vs_compute.png"] = plots.compute(flops, accuracy)
    return figures


def _names(report: dict[str, Any]) -> list[str]:
    return [row.get("name", str(row["class"])) for row in report["per_class"]]


def _thumb(image: np.ndarray, lines: list[str], height: int = THUMB, css: str = "") -> str:
    """A test image as an embedded PNG, shown enlarged with sharp pixels, with a caption of
    one or more lines of plain text."""
    data = base64.b64encode(encode_png(image)).decode("ascii")
    h, w = image.shape[:2]
    cls = f' class="{css}"' if css else ""
    return (f'<figure{cls}><img src="data:image/png;base64,{data}" '
            f'width="{round(height * w / h)}" height="{height}" '
            f'alt="{html.escape(" ".join(lines))}">'
            f'<figcaption>{"<br>".join(html.escape(line) for line in lines)}</figcaption>'
            "</figure>")


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


#: (id, heading, HTML) of one section of the page
Section = tuple[str, str, str]
#: one row of the page: sections side by side; a list of sections is one column of them
Row = list[Section | list[Section]]


def _section(sid: str, heading: str, body: str, intro: str = "") -> Section:
    """(id, heading, HTML) of one section of the page."""
    intro = f'<p class="note">{intro}</p>' if intro else ""
    return sid, heading, f'<section id="{sid}"><h2>{heading}</h2>{intro}{body}</section>'


def _figure(figures: dict[str, bytes], name: str, alt: str) -> str:
    """The embedded figure ("" when it was not drawn)."""
    if name not in figures:
        return ""
    data = base64.b64encode(figures[name]).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def _misclassified(context: ReportContext, names: list[str]) -> tuple[str, str, str]:
    all_wrong = np.flatnonzero(context.predictions != context.labels)
    # the most confident mistakes first: the most informative ones
    order = np.argsort(-context.confidences[all_wrong], kind="stable")
    wrong = all_wrong[order][:MAX_MISCLASSIFIED]
    cells = [_thumb(context.images[i],
                    [f"{names[context.labels[i]]} \u2192 {names[context.predictions[i]]}",
                     f"#{i} {100 * context.confidences[i]:.0f}%"]) for i in wrong]
    return _section("misclassified", "Misclassified test images",
                    f'<div class="grid">{"".join(cells)}</div>',
                    f"{len(all_wrong)} of {len(context.labels)}; the {len(wrong)} most "
                    "confident mistakes: true \u2192 predicted class, test index and the "
                    "predicted class's probability.")


def attention_picks(labels: np.ndarray, predictions: np.ndarray,
                    n: int = NUM_ATTENTION) -> np.ndarray:
    """The test images shown with rollout maps, in test order: the first misclassified ones
    (up to half of ``n``), the first correctly classified ones for the rest."""
    wrong = np.flatnonzero(predictions != labels)[: n // 2]
    right = np.flatnonzero(predictions == labels)[: n - len(wrong)]
    return np.sort(np.concatenate([wrong, right]))[:n]


def _attention(context: ReportContext, names: list[str]) -> tuple[str, str, str]:
    pick = attention_picks(context.labels, context.predictions)
    x = normalize(context.images[pick], context.info.mean, context.info.std)
    maps = attention_rollout(context.model, x.astype(context.model.dtype))
    cells = []
    for i, heat in zip(pick, maps, strict=True):
        true, pred = names[context.labels[i]], names[context.predictions[i]]
        if true == pred:
            lines, css = [f"#{i} {true}", "\u2713 correct"], "right"
        else:
            lines, css = [f"#{i} true {true}", f"\u2717 predicted {pred}"], "wrong"
        cells.append(_thumb(_overlay(context.images[i], heat), lines, ATTENTION_THUMB, css))
    wrong = int(np.count_nonzero(context.labels[pick] != context.predictions[pick]))
    return _section("attention", "Attention rollout", f'<div class="grid">{"".join(cells)}</div>',
                    "Where the class token looks, through all layers (Abnar &amp; Zuidema "
                    "2020): each image, and its rollout map over it (bright: more attention). "
                    f"The first test images{', and the first misclassified ones' if wrong else ''}"
                    f"; {wrong} wrong prediction(s), outlined in red.")


def _table(header: list[str], rows: list[list[str]], diag: bool = False) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = []
    for i, row in enumerate(rows):
        cells = [f"<th>{html.escape(row[0])}</th>"]
        cells += [f'<td class="diag">{c}</td>' if diag and j == i else f"<td>{c}</td>"
                  for j, c in enumerate(row[1:])]
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _settings(config: dict[str, Any], model: Any) -> list[tuple[str, str]]:
    """The header's one-line summaries of the data, model and training settings."""
    m, t = config.get("model", {}), config.get("train", {})
    rows = []
    if t:
        train = f"the first {t['train_subset']}" if t.get("train_subset") else "all"
        rows.append(("data", f"trained on {train} {t.get('dataset')} training images"))
    if m:
        params = f"; {model.num_params():,} parameters" if model is not None else ""
        rows.append(("model", f"ViT, {m.get('img_size')} px images in {m.get('patch_size')} px "
                              f"patches ({m.get('patch_embed')}), dim {m.get('embed_dim')}, "
                              f"depth {m.get('depth')}, {m.get('num_heads')} heads, MLP "
                              f"\u00d7{m.get('mlp_ratio'):g}, {m.get('pool')} pooling{params}"))
    if t:
        stop = f", --max-steps {t['max_steps']}" if t.get("max_steps") else ""
        momentum = (f" (momentum {t.get('momentum'):g})" if t.get("optimizer") == "sgd" else "")
        rows.append(("training", f"{t.get('optimizer')}{momentum}, lr {t.get('lr'):g} "
                                 f"\u2192 {t.get('min_lr'):g} (warmup "
                                 f"{t.get('warmup_epochs'):g} epoch(s)), batch "
                                 f"{t.get('batch_size')}, {t.get('epochs')} epochs{stop}, "
                                 f"weight decay {t.get('weight_decay'):g}, label smoothing "
                                 f"{t.get('label_smoothing'):g}, augmentation "
                                 f"{'on' if t.get('augment') else 'off'}, seed "
                                 f"{t.get('seed')}, {t.get('dtype')}"))
    return rows


def _compute(report: dict[str, Any]) -> list[tuple[str, str]]:
    """The header's line on training compute: total, per image, images seen (none for a
    report without ``train_flops``)."""
    if "train_flops" not in report:
        return []
    total, per_image = report["train_flops"], report.get("train_flops_per_image", 0)
    images = f" \u00d7 {total // per_image:,} images seen" if per_image else ""
    return [("compute", f"{format_flops(total)} of training: {format_flops(per_image)} per image "
                        f"(forward + backward){images}")]


def _header(report: dict[str, Any], context: ReportContext | None) -> str:
    title = f"{report['dataset']} {report['split']} report"
    run = f' <span class="run">{html.escape(context.run_name)}</span>' if (
        context is not None and context.run_name) else ""
    planned = ""
    if context is not None and context.lr_schedule is not None:
        planned = f" of {len(context.lr_schedule)} scheduled"
        max_steps = (context.config or {}).get("train", {}).get("max_steps")
        if max_steps == report["step"] < len(context.lr_schedule):
            planned += f" (stopped there by --max-steps {max_steps})"
    meta = [("evaluated", f"epoch {report['epoch']}, step {report['step']}{planned}, "
                          f"{report['num_samples']} {report['split']} images, "
                          f"{report['world_size']} rank(s)"), *_compute(report)]
    if context is not None:
        if context.checkpoint:
            meta.append(("checkpoint", context.checkpoint))
        if context.config:
            meta += _settings(context.config, context.model)
        meta.append(("written", f"{context.created} by dpvit {context.version}"))
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>"
                   for k, v in meta)
    numbers = [("accuracy", f"{100 * report['accuracy']:.2f}%"),
               ("macro F1", f"{report['macro_f1']:.4f}"), ("loss", f"{report['loss']:.4f}")]
    if "train_flops" in report:
        numbers.append(("training compute", format_flops(report["train_flops"])))
    headline = "".join(f"<div><b>{v}</b>{k}</div>" for k, v in numbers)
    return (f"<h1>{html.escape(title)}{run}</h1><header id=\"summary\">"
            f'<div class="headline">{headline}</div><table class="meta">{rows}</table></header>')


def _curves_row(figures: dict[str, bytes]) -> Row:
    """The training curves beside the learning rate (those drawn)."""
    row: Row = []
    if "curves.png" in figures:
        row.append(_section("curves", "Training curves",
                            _figure(figures, "curves.png", "Training curves"),
                            "Training loss and accuracy of the logged batches; test after "
                            "each evaluation."))
    if "lr_schedule.png" in figures:
        row.append(_section("learning-rate", "Learning rate",
                            _figure(figures, "lr_schedule.png", "Learning rate"),
                            "Solid: the steps run; faint: the rest of the planned schedule."))
    return row


def _compute_sections(figures: dict[str, bytes]) -> list[Section]:
    """Test accuracy against training compute (none when not drawn)."""
    if "accuracy_vs_compute.png" not in figures:
        return []
    return [_section("compute", "Accuracy against compute",
                     _figure(figures, "accuracy_vs_compute.png",
                             "Test accuracy against training FLOPs"),
                     "Test accuracy after each evaluation against the training FLOPs spent "
                     "before it (forward + backward of every image seen; log axis), the axis "
                     "on which runs of any model size or length compare.")]


def _columns(row: Row) -> list[list[Section]]:
    return [item if isinstance(item, list) else [item] for item in row]


def _body(rows: list[Row]) -> list[str]:
    """The HTML of each row that has sections: a lone section as it is, else a flex row whose
    columns of more than one section are stacked."""
    body = []
    for columns in (_columns(row) for row in rows if row):
        if len(columns) == 1 and len(columns[0]) == 1:
            body.append(columns[0][0][2])
            continue
        cells = [column[0][2] if len(column) == 1 else
                 '<div class="stack">' + "".join(s[2] for s in column) + "</div>"
                 for column in columns]
        body.append('<div class="row">' + "".join(cells) + "</div>")
    return body


def _toc(sections: list[tuple[str, str, str]]) -> str:
    """Links to the summary and to every section of the page."""
    links = [("summary", "Summary"), *((sid, heading) for sid, heading, _ in sections)]
    return '<nav class="toc">' + "".join(f'<a href="#{sid}">{heading}</a>'
                                         for sid, heading in links) + "</nav>"


def render_html(report: dict[str, Any], context: ReportContext | None
                ) -> tuple[str, dict[str, bytes]]:
    """The page and its figures.

    Args:
        report: the report.json dictionary.
        context: images, predictions, model, metrics and run details (None: numbers only).

    Returns:
        (HTML text, {PNG file name: PNG bytes}).
    """
    try:
        figures = _figures(report, context)
        missing = ""
    except ImportError:
        figures, missing = {}, f'<p class="missing">{MISSING_MATPLOTLIB}</p>'
    names = _names(report)
    title = html.escape(f"{report['dataset']} {report['split']} report")
    per_class = _table(["class", "precision", "recall", "F1", "support"], [
        [names[r["class"]], f"{r['precision']:.4f}", f"{r['recall']:.4f}", f"{r['f1']:.4f}",
         str(r["support"])] for r in report["per_class"]])
    if "confusion_matrix.png" in figures:  # the heatmap has the counts in its cells
        confusion = _figure(figures, "confusion_matrix.png", "Confusion matrix")
    else:  # no matplotlib: the counts as a table
        confusion = _table(["true \\ predicted", *names], [
            [names[i], *map(str, row)] for i, row in enumerate(report["confusion_matrix"])],
            diag=True)
    # rows of sections side by side: figures that are narrow enough to share the width; the
    # compute figure fits under the per-class table, beside the taller confusion heatmap
    rows: list[Row] = [
        _curves_row(figures),
        [_section("confusion", "Confusion matrix", confusion,
                  "Rows: true class; columns: predicted class; counts in the cells."),
         [_section("per-class", "Per-class metrics", per_class), *_compute_sections(figures)]]]
    if context is not None and len(context.labels):
        rows.append([_misclassified(context, names)])
        if context.model is not None:
            rows.append([_attention(context, names)])
    sections = [s for row in rows for column in _columns(row) for s in column]
    body = _body(rows)
    parts = [
        f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{title}</title>",
        f"<style>{STYLE}</style></head><body>", _header(report, context), _toc(sections),
        missing, *body, "</body></html>",
    ]
    return "\n".join(p for p in parts if p) + "\n", figures
