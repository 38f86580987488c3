"""Report numbers on hand-made confusion matrices, the files written, rollout maps, what the page
shows (header, table of contents, figures' data, marked mistakes), and the page without
matplotlib."""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from helpers import missing

from dpvit.data import DATASETS
from dpvit.errors import UserError
from dpvit.flops import format_flops, training_compute
from dpvit.report import (
    ReportContext,
    build_report,
    confusion_matrix,
    per_class_metrics,
    write_report,
)
from dpvit.report.html import attention_picks, compute_points, lr_parts, render_html
from dpvit.report.rollout import attention_rollout
from dpvit.report.writer import render_markdown
from dpvit.vit import VisionTransformer, ViTConfig


def _plots():
    """dpvit.report.plots, which needs matplotlib: missing under CI fails, elsewhere skips."""
    if importlib.util.find_spec("matplotlib") is None:
        missing("matplotlib", 'pip install -e ".[plots]"')
    from dpvit.report import plots

    return plots


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
    _plots()
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
    # no heatmap: the confusion counts as a table instead
    assert '<section id="confusion"><h2>Confusion matrix</h2>' in html
    assert html.count("true \\ predicted") == 1
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


# -- what the page shows -----------------------------------------------------------------------


class _Page(HTMLParser):
    """The ids of a page, the links of its table of contents, and its figures' captions."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.ids: list[str] = []
        self.toc: list[str] = []
        self.sections: list[str] = []
        self.in_toc = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.append(attrs["id"])
        if tag == "section":
            self.sections.append(attrs["id"])
        if tag == "nav" and attrs.get("class") == "toc":
            self.in_toc = True
        if tag == "a" and self.in_toc:
            self.toc.append(attrs["href"])

    def handle_endtag(self, tag):
        if tag == "nav":
            self.in_toc = False


def _page(context: ReportContext, report: dict | None = None) -> str:
    return render_html(report or _report(context), context)[0]


def _full_context(**fields) -> ReportContext:
    model = VisionTransformer(ViTConfig(embed_dim=8, depth=2, num_heads=2, patch_size=7))
    context = _context(model=model)
    context.lr_schedule = np.linspace(1e-3, 0.0, 40)
    for name, value in fields.items():
        setattr(context, name, value)
    return context


def test_the_header_names_the_run_date_checkpoint_version_data_model_and_training():
    from dpvit import __version__
    from dpvit.config import Config

    cfg = Config()
    cfg.model.embed_dim, cfg.train.train_subset, cfg.train.max_steps = 8, 256, 5
    context = _full_context(run_name="mnist-run-7", checkpoint="checkpoints/step-5.h5",
                            config=cfg.to_dict(), created="2025-01-02 03:04 UTC")
    page = _page(context)
    header = page[page.index("<h1>"):page.index('<nav class="toc">')]
    assert "mnist-run-7" in header and "2025-01-02 03:04 UTC" in header
    assert "checkpoints/step-5.h5" in header and f"dpvit {__version__}" in header
    assert "first 256 mnist training images" in header
    assert "dim 8, depth 6, 4 heads" in header
    assert f"{context.model.num_params():,} parameters" in header
    assert "adamw" in header and "batch 64" in header and "8 epochs" in header
    # how far the schedule got: step 5 of the 40 scheduled, stopped by --max-steps
    assert "step 5 of 40 scheduled (stopped there by --max-steps 5)" in header
    # defaults: written now, by this version
    assert f"by dpvit {__version__}" in _page(_context())


def test_lr_parts_split_the_steps_run_from_the_rest_of_the_planned_schedule():
    schedule = np.arange(10) / 10  # step s (from 1) uses schedule[s - 1]
    (run_x, run_y), (plan_x, plan_y) = lr_parts(schedule, 3)
    assert run_x.tolist() == [1, 2, 3] and run_y.tolist() == [0.0, 0.1, 0.2]
    # the planned part starts at the last step run, so the two lines join
    assert plan_x.tolist() == list(range(3, 11)) and plan_y.tolist() == schedule[2:].tolist()
    (run_x, run_y), (plan_x, _) = lr_parts(schedule, 10)  # the whole schedule ran
    assert run_x.tolist() == list(range(1, 11)) and len(plan_x) == 0
    (run_x, _), (plan_x, _) = lr_parts(schedule, 0)  # nothing ran yet
    assert len(run_x) == 0 and plan_x.tolist() == list(range(1, 11))


def test_the_page_cuts_the_lr_schedule_at_the_step_it_evaluates(monkeypatch):
    plots = _plots()
    drawn = {}
    monkeypatch.setattr(plots, "lr_schedule", lambda run, planned, logged: drawn.update(
        run=run, planned=planned, logged=logged) or b"")
    context = _context()
    context.lr_schedule = np.linspace(1e-3, 0.0, 40)
    render_html(_report(context), context)  # step 5 of the 40 scheduled
    assert drawn["run"][0].tolist() == [1, 2, 3, 4, 5]
    assert drawn["planned"][0][0] == 5 and drawn["planned"][0][-1] == 40
    assert drawn["logged"][0].tolist() == [5] and drawn["logged"][1].tolist() == [1e-3]


def test_the_lr_figure_draws_the_steps_run_solid_and_the_planned_rest_faint():
    plots = _plots()
    run, planned = lr_parts(np.linspace(1e-3, 0.0, 100), 5)  # a run stopped at step 5
    fig = plots.lr_figure(run, planned, (np.array([5]), np.array([run[1][-1]])))
    lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    solid = lines["run: steps 1-5"]
    faint = lines["planned, not run: to step 100"]
    assert solid.get_xdata().tolist() == [1, 2, 3, 4, 5] and solid.get_linestyle() == "-"
    assert faint.get_xdata()[0] == 5 and faint.get_xdata()[-1] == 100
    assert (faint.get_alpha() or 1.0) < 0.5 and faint.get_linestyle() == "--"
    assert (solid.get_alpha() or 1.0) == 1.0
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_the_confusion_heatmap_has_the_counts_and_upright_class_names():
    plots = _plots()
    cm = np.array([[5, 1, 0], [2, 6, 0], [1, 3, 0]])
    fig = plots.confusion_figure(cm, ["zero", "one", "two"])
    ax = fig.axes[0]
    assert sorted(t.get_text() for t in ax.texts) == sorted(str(v) for v in cm.flat if v)
    assert [t.get_rotation() for t in ax.get_xticklabels()] == [0.0, 0.0, 0.0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["zero", "one", "two"]
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_the_confusion_counts_are_shown_once():
    """The heatmap carries the counts: no second table of them (without matplotlib the table
    takes its place, see the test below)."""
    _plots()
    page = _page(_context())
    confusion = page[page.index('<section id="confusion">'):]
    confusion = confusion[:confusion.index("</section>")]
    assert "<img" in confusion and "<table" not in confusion
    assert "true \\ predicted" not in page and page.count("Confusion matrix</h2>") == 1


def test_attention_examples_include_and_mark_the_wrong_predictions():
    labels = np.zeros(20, int)
    predictions = labels.copy()
    predictions[[12, 15, 16, 17, 19]] = 1
    # the first 4 mistakes and the first 4 correct images, in test order
    assert attention_picks(labels, predictions).tolist() == [0, 1, 2, 3, 12, 15, 16, 17]
    assert attention_picks(labels, labels).tolist() == list(range(8))

    context = _full_context()
    context.predictions = context.labels.copy()
    context.predictions[[1, 12, 15]] = (context.labels[[1, 12, 15]] + 1) % 10
    page = _page(context)
    names = DATASETS["mnist"].class_names
    attention = page[page.index('<section id="attention">'):]
    assert attention.count('<figure class="wrong">') == 3
    assert attention.count('<figure class="right">') == 5
    for i in (1, 12, 15):  # 12 and 15 are not among the first 8 images, and still shown
        assert (f"#{i} true {names[context.labels[i]]}<br>\u2717 predicted "
                f"{names[context.predictions[i]]}") in attention
    assert f"#0 {names[context.labels[0]]}<br>\u2713 correct" in attention
    assert "3 wrong prediction(s), outlined in red" in attention


def test_the_table_of_contents_links_every_section_and_every_link_resolves():
    _plots()
    page = _Page(_page(_full_context()))
    assert len(page.ids) == len(set(page.ids))  # ids are unique
    assert page.sections == ["curves", "learning-rate", "confusion", "per-class",
                             "misclassified", "attention"]
    assert page.toc == ["#summary", *(f"#{s}" for s in page.sections)]
    assert all(link[1:] in page.ids for link in page.toc)


# -- training compute ---------------------------------------------------------------------------


def _compute_context() -> tuple[ReportContext, dict]:
    """A context whose two evaluations logged their training FLOPs (the default model, batch
    64, 937 steps an epoch), and the report of the second, carrying its compute."""
    context = _full_context(lr_schedule=None)
    spent = [training_compute(ViTConfig(), step, 64) for step in (937, 2 * 937)]
    context.metrics = [
        {"kind": "step", "step": 5, "loss": 2.0, "accuracy": 0.2, "lr": 1e-3,
         "train_flops": 5 * 64 * spent[0]["train_flops_per_image"]},
        {"kind": "epoch", "step": 937, "test_loss": 0.3, "test_accuracy": 0.9,
         "train_flops": spent[0]["train_flops"]},
        {"kind": "epoch", "step": 1874, "test_loss": 0.2, "test_accuracy": 0.95,
         "train_flops": spent[1]["train_flops"]}]
    return context, {**_report(context), "epoch": 2, "step": 1874, **spent[1]}


def test_flops_read_with_an_si_prefix():
    assert format_flops(33_969_375_412_224) == "34.0 TFLOP"
    assert format_flops(70_807_296) == "70.8 MFLOP"
    assert format_flops(2.5e15) == "2.5 PFLOP" and format_flops(512) == "512 FLOP"


def test_compute_points_are_the_evaluations_that_logged_their_flops():
    metrics = [{"kind": "epoch", "step": 8, "test_accuracy": 0.5},  # before train_flops existed
               {"kind": "epoch", "step": 24, "test_accuracy": 0.8, "train_flops": 3e9},
               {"kind": "step", "step": 16, "accuracy": 0.6, "train_flops": 2e9},
               {"kind": "epoch", "step": 16, "test_accuracy": 0.7, "train_flops": 2e9}]
    flops, accuracy = compute_points(metrics)
    assert flops.tolist() == [2e9, 3e9] and accuracy.tolist() == [0.7, 0.8]
    assert len(compute_points(metrics[:1])[0]) == 0


def test_the_compute_figure_draws_test_accuracy_on_a_log_flops_axis():
    plots = _plots()
    fig = plots.compute_figure(np.array([1e12, 2e12, 4e12]), np.array([0.9, 0.95, 0.97]))
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and "FLOPs" in ax.get_xlabel()
    (line,) = ax.get_lines()
    assert line.get_xdata().tolist() == [1e12, 2e12, 4e12]
    assert line.get_ydata().tolist() == [0.9, 0.95, 0.97]
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_the_report_carries_the_training_compute_and_plots_accuracy_against_it(tmp_path,
                                                                                monkeypatch):
    plots = _plots()
    drawn = {}
    real = plots.compute
    monkeypatch.setattr(plots, "compute", lambda flops, accuracy: drawn.update(
        flops=flops, accuracy=accuracy) or real(flops, accuracy))
    context, report = _compute_context()
    write_report(report, tmp_path, context)
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["train_flops"] == 2 * 937 * 64 * saved["train_flops_per_image"]
    assert saved["train_flops_per_image"] == 70_807_296
    assert "| training compute | 8.5 TFLOP |" in (tmp_path / "report.md").read_text()
    # the two evaluations, on the FLOPs axis; the logged step is not an evaluation
    assert drawn["flops"].tolist() == [937 * 64 * 70_807_296, 1874 * 64 * 70_807_296]
    assert drawn["accuracy"].tolist() == [0.9, 0.95]
    assert (tmp_path / "accuracy_vs_compute.png").is_file()
    text = (tmp_path / "report.html").read_text()
    header = text[text.index("<h1>"):text.index('<nav class="toc">')]
    assert "<b>8.5 TFLOP</b>training compute" in header
    assert "70.8 MFLOP per image (forward + backward) \u00d7 119,936 images seen" in header
    page = _Page(text)
    assert page.sections == ["curves", "learning-rate", "confusion", "per-class", "compute",
                             "misclassified", "attention"]
    assert page.toc == ["#summary", *(f"#{s}" for s in page.sections)]
    compute = text[text.index('<section id="compute">'):]
    assert compute[:compute.index("</section>")].count("data:image/png;base64,") == 1
