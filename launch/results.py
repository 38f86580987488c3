"""Regenerate the README's results section: train with the defaults, print Markdown.

    python launch/results.py                       # mpirun -n 4, seeds 0 and 1, MNIST
    python launch/results.py --ranks 4 --seeds 0 1 -- --dataset fashion-mnist
    python launch/results.py --from-runs runs/results-mnist-n4-seed0 ...   # no training

Each run is ``mpirun -n RANKS python -m dpvit.train --seed S --run-dir runs/results-...``
plus the arguments after ``--``, timed from launch to exit (so the wall time includes start-up,
data loading and every evaluation). The Markdown block has one row per run (accuracy, macro
F1, wall time, median training images/s), the per-class table of the first run and its
loss/accuracy curves, copied to ``launch/results/`` for the README.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from dpvit.dist import find_mpirun

REPO = Path(__file__).resolve().parents[1]


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
    """Accuracy, macro F1, wall time and mean images/s of a finished run."""
    report = json.loads((run_dir / "report" / "report.json").read_text())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    speeds = [r["images_per_s"] for r in records if r.get("kind") == "step"]
    config = json.loads((run_dir / "config.json").read_text())
    wall = run_dir / "wall_time_s.txt"
    return {"run": run_dir.name, "report": report, "seed": config["train"]["seed"],
            "epochs": config["train"]["epochs"],
            "wall_s": float(wall.read_text()) if wall.exists() else float("nan"),
            "images_per_s": statistics.median(speeds)}


def markdown(runs: list[dict]) -> str:
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
        lines.append(f"| {row['name']} | {row['precision']:.4f} | {row['recall']:.4f} | "
                     f"{row['f1']:.4f} | {row['support']} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--from-runs", type=Path, nargs="+", help="summarize finished runs only")
    p.add_argument("extra", nargs="*", help="arguments for dpvit.train (after --)")
    args = p.parse_args()
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
        out = REPO / "launch" / "results" / f"{run_dirs[0].name}-curves.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(curves, out)
        print(f"curves: {out.relative_to(REPO)}", file=sys.stderr)
    print(markdown(runs))


if __name__ == "__main__":
    main()
