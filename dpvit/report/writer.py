"""Writing an evaluation report: report.json, report.md, predictions.csv and report.html.

Every rank scores its shard of the test split (``dpvit.inference.evaluate_model``, used by the
trainer and the evaluate command alike); the confusion matrices are summed across ranks and
rank 0 calls ``write_report`` with the total, so the numbers never depend on how the split was
sharded. ``report.json`` keeps the keys of docs/design.md; with a ``ReportContext`` (the
images, per-image predictions, model and metrics history) rank 0 also writes
``predictions.csv`` and the plots of ``report.html`` (see ``dpvit.report.html``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from dpvit.errors import UserError
from dpvit.files import write_atomic
from dpvit.flops import format_flops
from dpvit.report.html import ReportContext, render_html


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
        *([f"| training compute | {format_flops(report['train_flops'])} |"]
          if "train_flops" in report else []),
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


def render_predictions_csv(context: ReportContext) -> str:
    """One line per image: index, true class, predicted class, confidence."""
    lines = ["index,label,prediction,confidence"]
    lines += [f"{i},{t},{p},{c:.6f}" for i, (t, p, c) in enumerate(zip(
        context.labels.tolist(), context.predictions.tolist(), context.confidences.tolist(),
        strict=True))]
    return "\n".join(lines) + "\n"


def _write_atomic(path: Path, data: str | bytes) -> None:
    try:
        write_atomic(path, data)
    except OSError as err:  # a full or read-only disk: one line, not a traceback
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
