"""Evaluation reports: metrics from the summed confusion matrix, and the files rank 0 writes.

``metrics`` derives the report.json numbers, ``writer`` writes the report directory,
``html`` renders report.html (with ``plots`` for the matplotlib figures and ``rollout`` for
the attention maps).
"""

from dpvit.report.html import ReportContext
from dpvit.report.metrics import build_report, confusion_matrix, per_class_metrics
from dpvit.report.writer import write_report

__all__ = ["ReportContext", "build_report", "confusion_matrix", "per_class_metrics",
           "write_report"]
