"""launch/results.py: the tables and CSVs it makes from finished run directories.

No training: the run directories are written by hand here, shaped as dpvit.train writes them
(config.json sections, metrics.jsonl step/epoch/skipped records, report/report.json with the
keys of dpvit.report, wall_time_s.txt from results.py's own timing).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from helpers import load_launch_script

REPO = Path(__file__).resolve().parents[1]


results = load_launch_script("results")

MNIST_CLASSES = [str(k) for k in range(10)]


def fake_run(root: Path, name: str, *, dataset: str = "mnist", seed: int = 0, ranks: int = 4,
             epochs: int = 2, accuracy: float = 0.9876, macro_f1: float = 0.9865,
             speeds: tuple[float, ...] = (500.0, 610.0, 590.0), wall_s: float | None = 123.4,
             finished: float = 1_796_000_000.0) -> Path:
    """A finished run directory as dpvit.train leaves it (plus results.py's wall time)."""
    run = root / name
    (run / "report").mkdir(parents=True)
    config = {"model": {"embed_dim": 64, "depth": 6, "patch_size": 4},
              "train": {"dataset": dataset, "seed": seed, "epochs": epochs, "batch_size": 64,
                        "lr": 0.004, "run_dir": str(run)}}
    (run / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    records = []
    for i, speed in enumerate(speeds, start=1):
        records.append({"loss": 2.0 / i, "accuracy": 0.5, "lr": 0.004, "grad_norm": 1.2,
                        "skipped_steps": 0, "kind": "step", "step": 50 * i, "epoch": 0,
                        "images_per_s": speed})
    records.append({"kind": "skipped", "step": 151, "epoch": 0, "loss": "nan",
                    "grad_norm": "nan", "in_a_row": 1})
    records.append({"kind": "epoch", "epoch": epochs, "step": 150, "test_loss": 0.05,
                    "test_accuracy": accuracy, "macro_f1": macro_f1, "time": finished})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    classes = MNIST_CLASSES if dataset == "mnist" else [f"c{k}" for k in range(10)]
    per_class = [{"class": k, "precision": 0.99, "recall": 0.98, "f1": 0.985, "support": 100,
                  "name": classes[k]} for k in range(10)]
    report = {"dataset": dataset, "split": "test", "epoch": epochs, "step": 150,
              "world_size": ranks, "num_samples": 1000, "loss": 0.05, "accuracy": accuracy,
              "macro_f1": macro_f1, "per_class": per_class,
              "confusion_matrix": [[100 if i == j else 0 for j in range(10)] for i in range(10)]}
    (run / "report" / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    if wall_s is not None:
        (run / "wall_time_s.txt").write_text(f"{wall_s:.1f}\n")
    return run


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames) == results.CSV_COLUMNS
        return list(reader)


def test_summarize_reads_what_training_writes(tmp_path):
    run = fake_run(tmp_path, "results-mnist-n4-seed3", seed=3, speeds=(500.0, 610.0, 590.0))
    summary = results.summarize(run)
    assert summary["run"] == "results-mnist-n4-seed3"
    assert summary["seed"] == 3 and summary["epochs"] == 2
    assert summary["wall_s"] == pytest.approx(123.4)
    assert summary["images_per_s"] == 590.0  # the median of the step records only


def test_markdown_table_and_per_class(tmp_path):
    runs = [results.summarize(fake_run(tmp_path, "a", accuracy=0.99234, macro_f1=0.99221)),
            results.summarize(fake_run(tmp_path, "b", seed=1, ranks=2, wall_s=None))]
    text = results.markdown(runs)
    lines = text.splitlines()
    assert lines[2] == "| a | 0 | 4 | 2 | 99.23% | 0.9922 | 2.1 min | 590 |"
    assert lines[3] == "| b | 1 | 2 | 2 | 98.76% | 0.9865 | nan min | 590 |"
    assert "Per class (a):" in text
    assert "| 7 | 0.9900 | 0.9800 | 0.9850 | 100 |" in lines


def test_csv_rows_are_written_replaced_and_kept(tmp_path):
    out = tmp_path / "results"
    runs = tmp_path / "runs"
    first = [results.summarize(fake_run(runs, "results-mnist-n4-seed0", accuracy=0.99)),
             results.summarize(fake_run(runs, "results-fashion-mnist-n4-seed0",
                                        dataset="fashion-mnist", epochs=10, accuracy=0.91))]
    written = results.write_csvs(first, out, commit="abc1234")
    assert sorted(p.name for p in written) == ["fashion-mnist.csv", "mnist.csv"]
    rows = read_rows(out / "mnist.csv")
    assert rows == [{"run": "results-mnist-n4-seed0", "dataset": "mnist", "seed": "0",
                     "ranks": "4", "epochs": "2", "test_accuracy": "0.9900",
                     "macro_f1": "0.9865", "wall_time_s": "123.4", "images_per_s": "590",
                     "commit": "abc1234", "date": rows[0]["date"]}]
    assert len(rows[0]["date"]) == 10 and rows[0]["date"].startswith("2026-")
    assert [r["test_accuracy"] for r in read_rows(out / "fashion-mnist.csv")] == ["0.9100"]

    # a rerun of one run replaces its row in place; another run is appended; others stay
    again = [results.summarize(fake_run(runs / "again", "results-mnist-n4-seed0",
                                        accuracy=0.9912, wall_s=200.0)),
             results.summarize(fake_run(runs, "results-mnist-n4-seed1", seed=1))]
    results.write_csvs(again, out, commit="def5678")
    rows = read_rows(out / "mnist.csv")
    assert [(r["run"], r["test_accuracy"], r["wall_time_s"], r["commit"]) for r in rows] == [
        ("results-mnist-n4-seed0", "0.9912", "200.0", "def5678"),
        ("results-mnist-n4-seed1", "0.9876", "123.4", "def5678")]
    assert len(read_rows(out / "fashion-mnist.csv")) == 1
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary left


def test_csv_with_other_columns_is_refused(tmp_path):
    path = tmp_path / "mnist.csv"
    path.write_text("run,accuracy\nx,0.9\n")
    run = results.summarize(fake_run(tmp_path, "results-mnist-n4-seed0"))
    with pytest.raises(SystemExit, match="columns"):
        results.write_csvs([run], tmp_path, commit="abc1234")
    assert path.read_text() == "run,accuracy\nx,0.9\n"


def test_main_from_runs_prints_tables_and_updates_csv(tmp_path, capsys):
    runs = [fake_run(tmp_path / "runs", f"results-mnist-n2-seed{s}", seed=s, ranks=2)
            for s in (0, 1)]
    (runs[0] / "report" / "curves.png").write_bytes(b"\x89PNG fake")
    out = tmp_path / "out"
    results.main(["--from-runs", *map(str, runs), "--out-dir", str(out), "--commit", "0123abc"])
    printed = capsys.readouterr().out
    assert "| results-mnist-n2-seed1 | 1 | 2 | 2 | 98.76% |" in printed
    assert [(r["run"], r["ranks"], r["commit"]) for r in read_rows(out / "mnist.csv")] == [
        ("results-mnist-n2-seed0", "2", "0123abc"), ("results-mnist-n2-seed1", "2", "0123abc")]
    assert (out / "results-mnist-n2-seed0-curves.png").read_bytes() == b"\x89PNG fake"


def test_checked_in_csvs_have_the_columns_results_py_writes():
    """The tables under launch/results/ can be updated by the script (same columns), and every
    row names a run, a commit and a date."""
    paths = sorted((REPO / "launch" / "results").glob("*.csv"))
    assert {p.name for p in paths} >= {"mnist.csv", "fashion-mnist.csv"}
    for path in paths:
        rows = read_rows(path)
        assert rows, f"{path} has no rows"
        for row in rows:
            assert row["dataset"] == path.stem
            assert 0.0 < float(row["test_accuracy"]) <= 1.0
            assert row["commit"] and len(row["date"]) == 10
