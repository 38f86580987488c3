"""Running dpvit commands as real processes (optionally under mpirun) from tests."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]

#: A model and data small enough for an mpirun job to finish in a few seconds.
TINY_ARGS = [
    "--dim", "16", "--depth", "1", "--heads", "2", "--mlp-ratio", "2", "--patch-size", "7",
    "--train-subset", "256", "--test-subset", "200", "--batch-size", "32",
    "--warmup-epochs", "0.25", "--no-progress",
    "--patch-embed", "linear",  # the MNIST preset's stem needs a power-of-2 patch
]


def under_ci() -> bool:
    """True when $CI is set to a true value (``CI=1``, ``CI=true``); ``CI=0``, ``CI=false``,
    ``CI=no``, ``CI=off`` or an empty value are not CI."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no", "off")


def missing(what: str, install: str) -> None:
    """A tool or dataset a test needs is absent: fail under CI (which installs it), else skip.

    Usable at module level too (a module that cannot import its reference)."""
    if under_ci():
        pytest.fail(f"{what} is missing; CI must install it: {install}", pytrace=False)
    pytest.skip(f"{what} is not installed ({install})", allow_module_level=True)


#: Where ``python -m dpvit.train`` puts MNIST when no directory is given: dpvit's own cache.
OWN_MNIST = REPO / "data" / "mnist"
_FETCH_FAILED: list[str] = []  # the download's failure, so it is tried once per session


def real_data_dir() -> Path:
    """The real MNIST files, where the training command finds them: ``$DPVIT_DATA_DIR`` if set,
    else ``data/mnist/`` in this repository, downloaded there first with dpvit's own
    downloader (``python -m dpvit.data fetch mnist``) when it is not there yet.

    When neither has MNIST and the download fails, the session stops with one message saying
    what to do (the tests that need MNIST cannot run; the others have run by then or are
    skipped together).
    """
    from dpvit.data.idx import DATASETS, find_idx_file
    from dpvit.data.store import resolve_data_dir

    names = DATASETS["mnist"].file_names
    env = os.environ.get("DPVIT_DATA_DIR")
    path = resolve_data_dir("mnist", env) if env else OWN_MNIST
    absent = [n for n in names if find_idx_file(path, n) is None]
    if not absent:
        return path
    if env:
        pytest.exit(f"DPVIT_DATA_DIR={env} lacks the MNIST files {', '.join(absent)}; point it "
                    f"at a directory holding all four idx files, or unset it so the tests use "
                    f"(and download into) {OWN_MNIST}", returncode=1)
    if not _FETCH_FAILED:
        done = subprocess.run(
            [sys.executable, "-m", "dpvit.data", "fetch", "mnist", "--data-dir", str(path)],
            capture_output=True, text=True, cwd=REPO, timeout=900,
            env={k: v for k, v in os.environ.items() if k != "DPVIT_DATA_DIR"})
        if done.returncode == 0:
            return path
        lines = done.stderr.strip().splitlines() or [f"exit status {done.returncode}"]
        _FETCH_FAILED.append(lines[-1].removeprefix("error: "))
    # dpvit's message names the missing files, where to put them, DPVIT_DATA_DIR and the README
    pytest.exit(f"the tests need MNIST: {_FETCH_FAILED[0]}", returncode=1)


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
    # every rank computes its own share even where ranks outnumber the cores, so that the
    # N-rank tests shard N ways on any machine (tests/test_spare_ranks.py tests the default)
    full_env = {**os.environ, "DPVIT_DATA_DIR": str(real_data_dir()),
                "DPVIT_SPARE_RANKS": "compute", **(env or {})}
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


def assert_bitwise_same_state(path_a: Path, path_b: Path, step: int) -> None:
    """Two checkpoints of step ``step`` hold bitwise the same parameters, optimizer state and
    weight average (``--ema-decay``)."""
    from dpvit.checkpoint import load_checkpoint

    a, b = load_checkpoint(path_a), load_checkpoint(path_b)
    assert a.step == b.step == step
    for name in a.params:
        assert a.params[name].tobytes() == b.params[name].tobytes(), name
    assert a.optimizer.keys() == b.optimizer.keys()
    for state in a.optimizer:
        for name in a.optimizer[state]:
            assert a.optimizer[state][name].tobytes() == b.optimizer[state][name].tobytes(), name
    assert a.ema.keys() == b.ema.keys()
    for name in a.ema:
        assert a.ema[name].tobytes() == b.ema[name].tobytes(), f"ema {name}"


def rank_pids(job: int | str, ranks: int, timeout: float = 60) -> dict[int, int]:
    """PMI rank -> pid of the dpvit.train processes whose environment holds
    ``DPVIT_TEST_JOB=<job>`` (read from /proc); fails the test unless all ``ranks`` appear."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        found = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmd = (entry / "cmdline").read_bytes().split(b"\0")
                env = (entry / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"dpvit.train" not in cmd or not cmd[0].endswith(b"python"):
                continue
            marker = next((e for e in env if e.startswith(b"DPVIT_TEST_JOB=")), None)
            if marker != f"DPVIT_TEST_JOB={job}".encode():
                continue
            rank = next((e for e in env if e.startswith(b"PMI_RANK=")), None)
            if rank is not None:
                found[int(rank.split(b"=")[1])] = int(entry.name)
        if len(found) == ranks:
            return found
        time.sleep(0.2)
    pytest.fail(f"the {ranks} ranks of the job did not start within {timeout} s")


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


def load_launch_script(name: str) -> ModuleType:
    """Import ``launch/<name>.py`` (not a package) as the module ``launch_<name>``."""
    spec = importlib.util.spec_from_file_location(f"launch_{name}", REPO / "launch" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    return module
