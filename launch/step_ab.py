"""Paired timing of the training step: the working tree's dpvit against a git revision's.

    python launch/step_ab.py --paths dpvit/nn dpvit/vit.py --rounds 300

Both versions run in one process, one BLAS thread: a copy of the working tree's package,
renamed ``dpvit_old``, gets the revision's (``--rev``, default HEAD) files under ``--paths``
(default: the whole package), so only those differ. Each round takes one `StepBench` step
(the default model, ``--batch-size`` images, forward, backward, AdamW) of each version, in
alternating order (ABBA), and times the step and every layer type's forward and backward
(containers include their children) in wall-clock time and in this thread's CPU time, which
leaves out the time other processes hold the core on a shared machine. Printed per row: the
median milliseconds of old and new, and the median of the rounds' old/new ratios with their
interquartile range.
"""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"  # before numpy loads its BLAS

import argparse  # noqa: E402
import importlib  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def old_package(root: Path, rev: str, paths: list[str]) -> None:
    """Write ``root/dpvit_old``: the working tree's package with ``paths`` as of ``rev``."""
    pkg = root / "dpvit_old"
    shutil.copytree(REPO / "dpvit", pkg, ignore=shutil.ignore_patterns("__pycache__"))
    for path in paths:
        listed = subprocess.run(["git", "ls-tree", "-r", "--name-only", rev, "--", path],
                                cwd=REPO, capture_output=True, text=True, check=True).stdout
        files = listed.split()
        if not files:
            sys.exit(f"{path} is not in {rev}")
        target = pkg / Path(path).relative_to("dpvit")
        if target.is_dir():  # files the working tree added there are not in the revision
            shutil.rmtree(target)
        for name in files:
            out = pkg / Path(name).relative_to("dpvit")
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(subprocess.run(["git", "show", f"{rev}:{name}"], cwd=REPO,
                                           capture_output=True, check=True).stdout)
    for py in pkg.rglob("*.py"):
        py.write_text(re.sub(r"\b(from|import) dpvit\b", r"\1 dpvit_old", py.read_text()))


def load(package: str, batch_size: int) -> tuple[object, dict[str, list[float]]]:
    """A warmed-up `StepBench` of ``package`` and the per-key [wall, cpu] seconds its layers
    add to (wrapped like ``dpvit.profiling.layer_timer``, with both clocks)."""
    prof = importlib.import_module(f"{package}.profiling")
    comm = importlib.import_module(f"{package}.parallel.comm").LocalComm()
    bench = prof.StepBench(importlib.import_module(f"{package}.vit").ViTConfig(), comm,
                           batch_size)
    for _ in range(5):
        bench.step()
    totals: dict[str, list[float]] = {}
    for cls in prof.TIMED_LAYERS:
        for kind in ("forward", "backward"):
            total = totals.setdefault(f"{cls.__name__}.{kind}", [0.0, 0.0])
            setattr(cls, kind, _timed(getattr(cls, kind), total))
    return bench, totals


def _timed(method, total: list[float]):
    """``method`` adding its wall-clock and CPU seconds to ``total``."""
    def timed(self, *args, **kwargs):
        wall, cpu = time.perf_counter(), time.thread_time()
        out = method(self, *args, **kwargs)
        total[0] += time.perf_counter() - wall
        total[1] += time.thread_time() - cpu
        return out
    return timed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rev", default="HEAD", help="the old version's git revision")
    p.add_argument("--paths", nargs="+", default=["dpvit"],
                   help="files or folders taken from --rev (the rest is the working tree's)")
    p.add_argument("--rounds", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=32)
    args = p.parse_args()
    sys.path.insert(0, str(REPO))
    from dpvit.parallel.allocator import keep_freed_memory

    keep_freed_memory()  # as the trainer does
    with tempfile.TemporaryDirectory() as tmp:
        old_package(Path(tmp), args.rev, args.paths)
        sys.path.insert(0, tmp)
        runs = {name: load(package, args.batch_size)
                for name, package in (("old", "dpvit_old"), ("new", "dpvit"))}
        rows: list[dict[str, dict[str, tuple[float, float]]]] = []
        for i in range(args.rounds):
            row = {}
            for name in ("old", "new") if i % 4 in (0, 3) else ("new", "old"):
                bench, totals = runs[name]
                for total in totals.values():
                    total[:] = [0.0, 0.0]
                wall, cpu = time.perf_counter(), time.thread_time()
                bench.step()
                row[name] = {"step": (time.perf_counter() - wall, time.thread_time() - cpu),
                             **{key: tuple(value) for key, value in totals.items()}}
            rows.append(row)
    print(f"{args.rounds} paired rounds, batch {args.batch_size}, one thread; old = {args.rev} "
          f"for {' '.join(args.paths)}. ms per step (median of rounds), old/new (median ratio, "
          "interquartile range)")
    def median_ms(key: str, name: str, clock: int) -> float:
        return 1e3 * statistics.median(r[name][key][clock] for r in rows)

    for key in sorted(rows[0]["old"], key=lambda k: (k != "step", -median_ms(k, "old", 1))):
        cells = []
        for clock, label in ((1, "cpu"), (0, "wall")):
            old = [r["old"][key][clock] for r in rows]
            new = [r["new"][key][clock] for r in rows]
            ratios = [a / b for a, b in zip(old, new, strict=True) if b > 0]
            q1, _, q3 = statistics.quantiles(ratios, n=4)
            cells.append(f"{label} {median_ms(key, 'old', clock):7.2f} -> "
                         f"{median_ms(key, 'new', clock):7.2f}  {statistics.median(ratios):.3f}x "
                         f"({q1:.2f}-{q3:.2f})")
        print(f"  {key:20s} " + "   ".join(cells))


if __name__ == "__main__":
    main()
