"""Running dpvit commands as real processes (optionally under mpirun) from tests."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]

#: A model and data small enough for an mpirun job to finish in a few seconds.
TINY_ARGS = [
    "--dim", "16", "--depth", "1", "--heads", "2", "--mlp-ratio", "2", "--patch-size", "7",
    "--train-subset", "256", "--test-subset", "200", "--batch-size", "32",
    "--warmup-epochs", "0.25", "--no-progress",
]


def missing(what: str, install: str) -> None:
    """A tool or dataset a test needs is absent: fail under CI (which installs it), else skip."""
    if os.environ.get("CI"):
        pytest.fail(f"{what} is missing; CI must install it: {install}")
    pytest.skip(f"{what} is not installed ({install})")


def real_data_dir() -> Path:
    """The real MNIST files: $DPVIT_DATA_DIR, else ../shared/datasets/mnist beside the repo."""
    path = Path(os.environ.get("DPVIT_DATA_DIR") or REPO.parent / "shared" / "datasets" / "mnist")
    if not path.is_dir():
        pytest.fail(f"real MNIST not found at {path}; set DPVIT_DATA_DIR to its directory")
    return path


def mpirun() -> str:
    """The mpirun of this environment (the mpich wheel installs it beside python)."""
    found = shutil.which("mpirun", path=str(Path(sys.executable).parent)) or shutil.which("mpirun")
    if found is None:
        pytest.fail("mpirun not found; install the mpich wheel (pip install mpich)")
    return found


def run_dpvit(module: str, args: list[str], ranks: int | None = None, timeout: float = 180,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m dpvit.<module> args``; under ``mpirun -n ranks`` when ranks is given."""
    cmd = [sys.executable, "-m", f"dpvit.{module}", *args]
    if ranks is not None:
        cmd = [mpirun(), "-n", str(ranks), *cmd]
    full_env = {**os.environ, "DPVIT_DATA_DIR": str(real_data_dir()), **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env,
                          cwd=REPO)


def train(run_dir: Path, *extra: str, ranks: int | None = None,
          threads: int | None = None) -> subprocess.CompletedProcess:
    """A tiny training run into ``run_dir`` (``threads`` per rank: DPVIT_NUM_THREADS); fails
    the test with the output if it fails."""
    env = None if threads is None else {"DPVIT_NUM_THREADS": str(threads)}
    result = run_dpvit("train", [*TINY_ARGS, "--run-dir", str(run_dir), *extra], ranks, env=env)
    if result.returncode != 0:
        pytest.fail(f"training failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result


def load_params(path: Path) -> dict[str, np.ndarray]:
    from dpvit.checkpoint import load_checkpoint

    return load_checkpoint(path).params
