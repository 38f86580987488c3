"""``python -m dpvit.evaluate`` agrees with the report training wrote, on 1 and 2 ranks, for
a float64 checkpoint, and on Fashion-MNIST end to end."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from helpers import missing, run_dpvit, train

from dpvit.checkpoint import load_checkpoint
from dpvit.data import DATASETS

SUBSET = ["--test-subset", "200"]  # what TINY_ARGS evaluates during training


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One tiny training run (8 steps, evaluated on 200 test images)."""
    run_dir = tmp_path_factory.mktemp("evaluate") / "run"
    train(run_dir, "--epochs", "1", "--log-every", "4")
    return run_dir


def _evaluate(args: list[str], ranks: int | None = None):
    result = run_dpvit("evaluate", args, ranks)
    assert result.returncode == 0, result.stderr
    return result


def _same_report(trained: dict, evaluated: dict, world_size: int) -> None:
    assert evaluated["world_size"] == world_size
    assert evaluated["loss"] == pytest.approx(trained["loss"], rel=1e-6)
    for key in trained:
        if key not in ("world_size", "loss"):
            assert evaluated[key] == trained[key], key


def _same_predictions(evaluated: Path, trained: Path) -> None:
    rows = [list(csv.reader(path.open())) for path in (evaluated, trained)]
    assert rows[0][0] == rows[1][0] and len(rows[0]) == len(rows[1]) == 201
    for got, want in zip(rows[0][1:], rows[1][1:], strict=True):
        assert got[:-1] == want[:-1]
        assert float(got[-1]) == pytest.approx(float(want[-1]), abs=1e-5)


@pytest.mark.parametrize("ranks", [None, pytest.param(2, marks=pytest.mark.mpi)])
def test_evaluate_agrees_with_the_training_report(run, tmp_path, ranks):
    out = tmp_path / "eval"
    _evaluate(["--checkpoint", str(run / "checkpoints" / "last.h5"), "--run-dir", str(out),
               *SUBSET], ranks)
    trained = json.loads((run / "report" / "report.json").read_text())
    evaluated = json.loads((out / "report" / "report.json").read_text())
    assert trained["num_samples"] == 200 and trained["epoch"] == 1 and trained["step"] == 8
    _same_report(trained, evaluated, world_size=ranks or 1)
    # the per-image predictions too: shards gathered in order give the same list (the
    # confidences to float32 rounding: a different batch split changes the BLAS summation)
    _same_predictions(out / "report" / "predictions.csv", run / "report" / "predictions.csv")
    assert (out / "report" / "report.html").is_file()


def test_default_report_dir_is_the_checkpoints_run(run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "report" / "report.json").unlink()
    result = _evaluate(["--checkpoint", str(copy / "checkpoints" / "best.h5"), *SUBSET])
    assert f"report in {copy / 'report'}" in result.stderr
    assert (copy / "report" / "report.json").is_file()
    assert (copy / "report" / "curves.png").is_file()  # from the run's metrics.jsonl


@pytest.mark.parametrize("ranks", [None, pytest.param(2, marks=pytest.mark.mpi)])
def test_damaged_checkpoint_is_one_clear_error(run, tmp_path, ranks):
    bad = tmp_path / "bad.h5"
    data = bytearray((run / "checkpoints" / "last.h5").read_bytes())
    bad.write_bytes(bytes(data[: len(data) // 2]))
    result = run_dpvit("evaluate", ["--checkpoint", str(bad)], ranks, timeout=60)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and str(bad) in errors[0], result.stderr
    assert "Traceback" not in result.stderr


def test_float64_checkpoint_evaluates_as_trained(tmp_path):
    """A run trained with --dtype float64 saves float64 arrays; evaluate scores them (as every
    checkpoint, in float32) and agrees with the float64 evaluation training reported."""
    run = tmp_path / "run"
    train(run, "--dtype", "float64", "--max-steps", "8")
    ckpt = load_checkpoint(run / "checkpoints" / "last.h5")
    assert {a.dtype.name for a in ckpt.params.values()} == {"float64"}
    out = tmp_path / "eval"
    _evaluate(["--checkpoint", str(run / "checkpoints" / "last.h5"), "--run-dir", str(out),
               *SUBSET])
    trained = json.loads((run / "report" / "report.json").read_text())
    assert trained["num_samples"] == 200 and trained["step"] == 8
    _same_report(trained, json.loads((out / "report" / "report.json").read_text()), 1)
    _same_predictions(out / "report" / "predictions.csv", run / "report" / "predictions.csv")


FASHION_DIR = Path(DATASETS["fashion-mnist"].system_dirs[0])


def test_fashion_mnist_end_to_end(tmp_path):
    """Train a few steps on Fashion-MNIST (its preset: learning rate, flips; the files from the
    Debian package), then evaluate the checkpoint: its report names Fashion-MNIST's classes."""
    if not FASHION_DIR.is_dir():
        missing("Fashion-MNIST", "apt-get install dataset-fashion-mnist")
    run = tmp_path / "run"
    data_dir = tmp_path / "fashion-mnist"  # empty: the files come from the system directory
    result = train(run, "--dataset", "fashion-mnist", "--data-dir", str(data_dir),
                   "--patch-size", "4", "--max-steps", "3")
    assert "fashion-mnist" in result.stderr
    ckpt = load_checkpoint(run / "checkpoints" / "last.h5")
    assert ckpt.step == 3 and ckpt.config["train"]["dataset"] == "fashion-mnist"
    assert ckpt.config["train"]["lr"] == 2e-3  # the preset, under the flags
    assert ckpt.config["train"]["aug_hflip"]
    out = tmp_path / "eval"
    _evaluate(["--checkpoint", str(run / "checkpoints" / "last.h5"), "--run-dir", str(out),
               *SUBSET])
    trained = json.loads((run / "report" / "report.json").read_text())
    evaluated = json.loads((out / "report" / "report.json").read_text())
    assert trained["dataset"] == evaluated["dataset"] == "fashion-mnist"
    assert [c["name"] for c in evaluated["per_class"]] == list(
        DATASETS["fashion-mnist"].class_names)
    _same_report(trained, evaluated, 1)
    _same_predictions(out / "report" / "predictions.csv", run / "report" / "predictions.csv")
