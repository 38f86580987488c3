"""Report numbers on hand-made confusion matrices, the files written, rollout maps, and the page
without matplotlib."""

from __future__ import annotations

import errno
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from dpvit.data import DATASETS
from dpvit.errors import UserError
from dpvit.report import (
    ReportContext,
    build_report,
    confusion_matrix,
    per_class_metrics,
    write_report,
)
from dpvit.report.rollout import attention_rollout
from dpvit.report.writer import render_markdown
from dpvit.vit import VisionTransformer, ViTConfig


def test_confusion_matrix_counts_rows_true_columns_predicted():
    cm = confusion_matrix(np.array([0, 0, 1, 2, 2, 2]), np.array([0, 1, 1, 2, 0, 2]), 3)
    assert cm.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]


def test_per_class_metrics_by_hand_including_a_class_never_predicted():
    # class 2 is never predicted: precision 0 by convention, recall 0, F1 0
    cm = np.array([[5, 1, 0],
                   [2, 6, 0],
                   [1, 3, 0]])
    rows = per_class_metrics(cm)
    assert rows[0] == pytest.approx({"class": 0, "precision": 5 / 8, "recall": 5 / 6,
                                     "f1": 2 * (5 / 8) * (5 / 6) / (5 / 8 + 5 / 6),
                                     "support": 6})
    assert rows[1]["precision"] == pytest.approx(6 / 10)
    assert rows[1]["recall"] == pytest.approx(6 / 8)
    assert rows[2] == {"class": 2, "precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 4}


def test_a_class_with_no_samples_has_zero_recall_and_support():
    rows = per_class_metrics(np.array([[3, 0], [0, 0]]))
    assert rows[1] == {"class": 1, "precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert rows[0]["f1"] == 1.0


def test_build_report_headline_numbers():
    cm = np.array([[5, 1, 0], [2, 6, 0], [1, 3, 0]])
    report = build_report(cm, loss_sum=9.0, dataset="mnist", split="test", epoch=2, step=40,
                          world_size=2, class_names=["a", "b", "c"])
    assert report["num_samples"] == 18
    assert report["accuracy"] == pytest.approx(11 / 18)
    assert report["loss"] == pytest.approx(0.5)
    f1 = [2 * (5 / 8) * (5 / 6) / (5 / 8 + 5 / 6), 2 * 0.6 * 0.75 / 1.35, 0.0]
    assert report["macro_f1"] == pytest.approx(np.mean(f1))
    assert [row["name"] for row in report["per_class"]] == ["a", "b", "c"]
    assert report["confusion_matrix"] == cm.tolist()
    md = render_markdown(report)
    assert "| accuracy | 61.11% |" in md and "| c | 0.0000 | 0.0000 | 0.0000 | 4 |" in md


def _context(n: int = 20, model=None) -> ReportContext:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, n)
    predictions = labels.copy()
    predictions[:3] = (labels[:3] + 1) % 10
    return ReportContext(images=rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
                         labels=labels, predictions=predictions,
                         confidences=rng.uniform(0.1, 1.0, n), info=DATASETS["mnist"],
                         model=model, metrics=[
                             {"kind": "step", "step": 5, "loss": 2.0, "accuracy": 0.2, "lr": 1e-3},
                             {"kind": "epoch", "step": 5, "test_loss": 1.9,
                              "test_accuracy": 0.3}])


def _report(context: ReportContext) -> dict:
    cm = confusion_matrix(context.labels, context.predictions, 10)
    return build_report(cm, 1.0, dataset="mnist", split="test", epoch=1, step=5, world_size=1,
                        class_names=list(DATASETS["mnist"].class_names))


def test_write_report_files_and_predictions_csv(tmp_path):
    pytest.importorskip("matplotlib")
    model = VisionTransformer(ViTConfig(embed_dim=8, depth=2, num_heads=2, patch_size=7))
    context = _context(model=model)
    write_report(_report(context), tmp_path, context)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["confusion_matrix.png", "curves.png", "lr_schedule.png", "predictions.csv",
                     "report.html", "report.json", "report.md"]
    lines = (tmp_path / "predictions.csv").read_text().splitlines()
    assert lines[0] == "index,label,prediction,confidence" and len(lines) == 21
    assert lines[1].split(",")[:3] == ["0", str(context.labels[0]), str(context.predictions[0])]
    html = (tmp_path / "report.html").read_text()
    # 3 figures, 3 misclassified images, 8 images with their rollout overlays; no scripts
    assert html.count("data:image/png;base64,") == 3 + 3 + 8 and "<script" not in html
    assert "3 of 20; the 3 most confident mistakes" in html
    assert set(json.loads((tmp_path / "report.json").read_text())) == {
        "dataset", "split", "epoch", "step", "world_size", "num_samples", "loss", "accuracy",
        "macro_f1", "per_class", "confusion_matrix"}


def test_a_full_disk_is_one_clear_error_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    """The disk fills after the temporary file was written, at the rename: the error names
    the report file, and the temporary file that already exists is removed."""
    context = _context(model=None)
    written = []
    real_replace = os.replace

    def disk_full(src, dst):
        written.append(Path(src))
        assert Path(src).exists()  # the temporary file is on disk when the failure comes
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))

    monkeypatch.setattr(os, "replace", disk_full)
    with pytest.raises(UserError, match=r"could not write report file .*report\.json: No space"):
        write_report(_report(context), tmp_path, context)
    monkeypatch.setattr(os, "replace", real_replace)
    assert written and written[0].parent == tmp_path
    assert list(tmp_path.iterdir()) == []


def test_without_matplotlib_json_and_markdown_are_written_and_the_page_says_why(
        tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    monkeypatch.delitem(sys.modules, "dpvit.report.plots", raising=False)
    context = _context()
    write_report(_report(context), tmp_path, context)
    html = (tmp_path / "report.html").read_text()
    assert "matplotlib, which is not installed" in html and 'pip install -e ".[plots]"' in html
    assert html.count("data:image/png") == 3 and "<table>" in html  # the misclassified only
    assert (tmp_path / "report.json").is_file() and (tmp_path / "report.md").is_file()
    assert not list(tmp_path.glob("*.png"))


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_attention_rollout_maps(pool):
    cfg = ViTConfig(embed_dim=8, depth=2, num_heads=2, patch_size=7, pool=pool)
    model = VisionTransformer(cfg, np.float64, seed=1)
    x = np.random.default_rng(0).normal(size=(3, 1, 28, 28))
    maps = attention_rollout(model, x)
    assert maps.shape == (3, 4, 4) and np.all(maps >= 0)
    np.testing.assert_allclose(maps.max(axis=(1, 2)), 1.0)


def test_rollout_of_one_block_is_the_mixed_class_token_row():
    """Depth 1: the map is the head-averaged cls attention to the patches (the 0.5 I of the
    residual only touches the cls column, which the map leaves out), scaled to max 1."""
    model = VisionTransformer(ViTConfig(embed_dim=8, depth=1, num_heads=2, patch_size=7),
                              np.float64, seed=2)
    x = np.random.default_rng(1).normal(size=(2, 1, 28, 28))
    maps = attention_rollout(model, x)
    attn = model.blocks[0].attn.cache[3].mean(axis=1)[:, 0, 1:]  # (B, 16)
    expected = attn / attn.max(axis=1, keepdims=True)
    np.testing.assert_allclose(maps.reshape(2, -1), expected, rtol=1e-12)
