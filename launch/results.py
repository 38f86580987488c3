"""Train the recipes' results runs, print their tables, and keep launch/results/*.csv current.

    python launch/results.py                       # mpirun -n 4, seeds 0 and 1, MNIST
    python launch/results.py --ranks 4 --seeds 0 1 -- --dataset fashion-mnist
    python launch/results.py --from-runs runs/results-mnist-n4-seed0 ...   # no training

Each run is ``mpirun -n RANKS python -m dpvit.train --seed S --run-dir runs/results-...``
plus the arguments after ``--``, timed from launch to exit (so the wall time includes start-up,
data loading and every evaluation). The script prints a Markdown block (one row per run:
accuracy, macro F1, wall time, median training images/s; the per-class table of the first
run) for docs/results.md, copies the first run's loss/accuracy curves next to the CSVs, and
updates ``<out-dir>/<dataset>.csv`` (default ``launch/results/``): one row per run, replaced
when a run of the same name is already there, as timm keeps its result tables. The CSV
columns are ``CSV_COLUMNS``.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from dpvit.parallel.launcher import find_mpirun

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "launch" / "results"
CSV_COLUMNS = ("run", "dataset", "seed", "ranks", "epochs", "test_accuracy", "macro_f1",
               "wall_time_s", "images_per_s", "commit", "date")


def train(ranks: int, seed: int, extra: list[str], run_dir: Path) -> float:
    """Run one training job; returns its wall time in seconds."""
    cmd = [find_mpirun(), "-n", str(ranks), sys.executable, "-m", "dpvit.train", "--no-progress",
           "--seed", str(seed), "--run-dir", str(run_dir), *extra]
    print("$", " ".join(cmd[1:]).replace(sys.executable, "python"), file=sys.stderr)
    start = time.monotonic()
    subprocess.run(cmd, check=True, cwd=REPO)
    elapsed = time.monotonic() - start
    (run_dir / "wall_time_s.txt").write_text(f"{elapsed:.1f}\n")
    return elapsed


def summarize(run_dir: Path) -> dict:
    """Accuracy, macro F1, wall time, median images/s and the date of a finished run."""
    report = json.loads((run_dir / "report" / "report.json").read_text())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").open() if line.strip()]
    speeds = [r["images_per_s"] for r in records if r.get("kind") == "step"]
    finished = [r["time"] for r in records if r.get("kind") == "epoch" and "time" in r]
    config = json.loads((run_dir / "config.json").read_text())
    wall = run_dir / "wall_time_s.txt"
    return {"run": run_dir.name, "report": report, "seed": config["train"]["seed"],
            "epochs": config["train"]["epochs"],
            "wall_s": float(wall.read_text()) if wall.exists() else float("nan"),
            "images_per_s": statistics.median(speeds) if speeds else float("nan"),
            "date": time.strftime("%Y-%m-%d", time.localtime(finished[-1] if finished
                                                              else time.time()))}


def markdown(runs: list[dict]) -> str:
    """The results table of ``runs`` and the per-class table of the first one."""
    lines = ["| run | seed | ranks | epochs | test accuracy | macro F1 | wall time | images/s |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in runs:
        rep = r["report"]
        lines.append(f"| {r['run']} | {r['seed']} | {rep['world_size']} | {r['epochs']} | "
                     f"{100 * rep['accuracy']:.2f}% | {rep['macro_f1']:.4f} | "
                     f"{r['wall_s'] / 60:.1f} min | {r['images_per_s']:.0f} |")
    first = runs[0]["report"]
    lines += ["", f"Per class ({runs[0]['run']}):", "",
              "| class | precision | recall | F1 | support |",
              "| --- | ---: | ---: | ---: | ---: |"]
    for row in first["per_class"]:
        lines.append(f"| {row.get('name', row['class'])} | {row['precision']:.4f} | "
                     f"{row['recall']:.4f} | {row['f1']:.4f} | {row['support']} |")
    return "\n".join(lines)


def csv_row(run: dict, commit: str, date: str | None = None) -> dict[str, str]:
    """One CSV row (all values as the file holds them) for a summarized run."""
    rep = run["report"]
    return {"run": run["run"], "dataset": rep["dataset"], "seed": str(run["seed"]),
            "ranks": str(rep["world_size"]), "epochs": str(run["epochs"]),
            "test_accuracy": f"{rep['accuracy']:.4f}", "macro_f1": f"{rep['macro_f1']:.4f}",
            "wall_time_s": f"{run['wall_s']:.1f}", "images_per_s": f"{run['images_per_s']:.0f}",
            "commit": commit, "date": date or run["date"]}


def read_csv(path: Path) -> list[dict[str, str]]:
    """The rows of a results CSV ([] when it does not exist yet)."""
    if not path.is_file():
        return []
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        if tuple(reader.fieldnames or ()) != CSV_COLUMNS:
            raise SystemExit(f"{path} has columns {reader.fieldnames}, expected "
                             f"{list(CSV_COLUMNS)}; fix or move it before updating it")
        return list(reader)


def update_csv(path: Path, rows: list[dict[str, str]]) -> None:
    """Replace the rows of ``path`` whose run names match, append the others; atomically."""
    kept = read_csv(path)
    new = {row["run"]: row for row in rows}
    merged = [new.pop(row["run"], row) for row in kept] + list(new.values())
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(merged)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(out.getvalue())
    os.replace(tmp, path)


def write_csvs(runs: list[dict], out_dir: Path, commit: str) -> list[Path]:
    """Update ``out_dir/<dataset>.csv`` with every run; returns the files written."""
    by_dataset: dict[str, list[dict[str, str]]] = {}
    for run in runs:
        row = csv_row(run, commit)
        by_dataset.setdefault(row["dataset"], []).append(row)
    paths = []
    for dataset, rows in by_dataset.items():
        path = out_dir / f"{dataset}.csv"
        update_csv(path, rows)
        paths.append(path)
    return paths


def git_commit() -> str:
    """The short hash of the checked-out commit ("unknown" outside a git checkout)."""
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                              capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return done.stdout.strip()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--from-runs", type=Path, nargs="+", help="summarize finished runs only")
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR,
                   help="where the CSVs and curves go (default: launch/results)")
    p.add_argument("--commit", help="commit to record (default: git rev-parse --short HEAD)")
    p.add_argument("--no-csv", action="store_true", help="print the tables only")
    p.add_argument("extra", nargs="*", help="arguments for dpvit.train (after --)")
    args = p.parse_args(argv)
    if args.from_runs:
        run_dirs = args.from_runs
    else:
        name = "fashion-mnist" if "fashion-mnist" in args.extra else "mnist"
        run_dirs = [REPO / "runs" / f"results-{name}-n{args.ranks}-seed{s}" for s in args.seeds]
        for seed, run_dir in zip(args.seeds, run_dirs, strict=True):
            train(args.ranks, seed, args.extra, run_dir)
    runs = [summarize(d) for d in run_dirs]
    curves = run_dirs[0] / "report" / "curves.png"
    if curves.exists():
        out = args.out_dir / f"{run_dirs[0].name}-curves.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(curves, out)
        print(f"curves: {out}", file=sys.stderr)
    if not args.no_csv:
        for path in write_csvs(runs, args.out_dir, args.commit or git_commit()):
            print(f"results: {path}", file=sys.stderr)
    print(markdown(runs))


if __name__ == "__main__":
    main()
