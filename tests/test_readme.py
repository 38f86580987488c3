"""Every command in README.md's ```bash blocks runs as written (with a tiny model).

Each line of each bash block is one test case, in README order. The cases share one temporary
directory as their working directory, so files one command makes are there for the next
(``--run-dir runs/quick`` from the training line, then ``--checkpoint
runs/quick/checkpoints/best.h5``); run the whole file, not single cases. ``python`` and
``mpirun`` resolve to this environment's, ``data/mnist`` is the real MNIST copy
(``$DPVIT_DATA_DIR``) and ``launch/`` this repository's. Each dpvit command gets small settings
appended (later flags win), so that it finishes in seconds: training runs 2 steps of the
tiny model of ``helpers.TINY_ARGS`` (4 px patches, which every patch embedding accepts; 4
steps when it resumes), evaluate scores 100 test images, bench times one step.

Lines that cannot run here are skipped by the rules of ``SKIP``, each with its reason; an
install followed by ``&&`` runs the command after it. A line that no rule skips and that
runs no dpvit command fails: teach this file about a new kind of README command.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, TINY_ARGS, missing, real_data_dir

README = REPO / "README.md"

#: (pattern on the whole line, reason): lines that need what a test machine does not have.
SKIP = (
    (r"-m pytest\b", "runs the test suite itself"),
    (r"^\s*pip install\b(?!.*&&)", "an install line"),
    (r"launch/cluster\.py", "needs the emulated cluster, as root (tests marked cluster run it)"),
    (r"^\s*sbatch\b", "needs SLURM (tests marked slurm submit launch/slurm.sbatch)"),
    (r"\bmpirun\b.*\s-f\s", "needs the machines of a hostfile (tests marked cluster run one)"),
    (r"^\s*tensorboard\s", "starts a web server (tests/test_tensorboard.py reads the logs)"),
)

SMALL_TRAIN = [*TINY_ARGS, "--patch-size", "4", "--test-subset", "100"]
SMALL = {
    "train": SMALL_TRAIN,
    "evaluate": ["--test-subset", "100"],
    "predict": [],
    "export": ["--quiet"],
    "bench": ["--steps", "1", "--warmup", "0", "--repeats", "1", "--rounds", "1",
              "--batch-size", "8", "--dim", "16", "--depth", "1", "--heads", "2",
              "--mlp-ratio", "2", "--patch-size", "7"],
}


def readme_lines() -> list[str]:
    """The command lines of README.md's ```bash blocks, in order."""
    blocks = re.findall(r"^```bash\n(.*?)^```", README.read_text(), flags=re.S | re.M)
    return [line for block in blocks for line in block.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def skip_reason(line: str) -> str | None:
    return next((reason for pattern, reason in SKIP if re.search(pattern, line)), None)


def command_kind(tokens: list[str]) -> str | None:
    """Which dpvit command a tokenised line runs: train, evaluate, predict or bench."""
    if any(t.endswith("launch/local.sh") for t in tokens):
        return "train"
    for i, token in enumerate(tokens[:-1]):
        if token == "-m" and tokens[i + 1].startswith("dpvit."):
            return tokens[i + 1].removeprefix("dpvit.")
    return None


def small_command(line: str) -> tuple[str, str]:
    """The line's command (after an install and ``&&``) with small settings appended, and its
    kind; fails the test for a command this file does not know."""
    tokens = shlex.split(line, comments=True)
    while "&&" in tokens:
        before = tokens[: tokens.index("&&")]
        if before[:2] != ["pip", "install"]:
            pytest.fail(f"README line chains commands other than an install: {line}")
        tokens = tokens[tokens.index("&&") + 1 :]
    kind = command_kind(tokens)
    if kind not in SMALL:
        pytest.fail(f"README line runs no dpvit command this test knows: {line!r}; teach "
                    "tests/test_readme.py to run it small, or add a SKIP rule with its reason")
    extra = list(SMALL[kind])
    if kind == "train" and "--resume" in tokens:
        extra += ["--max-steps", "4"]  # two steps more than the run it continues
    elif kind == "train":
        extra += ["--max-steps", "2"]
    return shlex.join(tokens + extra), kind


def dataset_available(name: str) -> bool:
    """Whether the idx files of ``name`` are on this machine (dpvit would download them)."""
    from dpvit.data import DATASETS

    places = [real_data_dir().parent / name, *map(Path, DATASETS[name].system_dirs)]
    return any(p.is_dir() and any(p.glob("t10k-images-idx3-ubyte*")) for p in places)


def _case(index: int, line: str):
    marks = [pytest.mark.mpi] if re.search(r"\bmpirun\b|launch/local\.sh", line) else []
    return pytest.param(line, id=f"{index:02d}-{line.split('#')[0].strip()[:60]}", marks=marks)


CASES = [_case(i, line) for i, line in enumerate(readme_lines())]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """The working directory every README command runs in, in turn."""
    work = tmp_path_factory.mktemp("readme")
    (work / "launch").symlink_to(REPO / "launch")
    (work / "data").mkdir()
    (work / "data" / "mnist").symlink_to(real_data_dir())
    return work


def test_readme_has_commands_and_fits():
    lines = readme_lines()
    assert len(README.read_text().splitlines()) <= 220, "README.md is a guide: 220 lines at most"
    kinds = {small_command(line)[1] for line in lines if skip_reason(line) is None}
    assert kinds == set(SMALL), f"the README shows no {sorted(set(SMALL) - kinds)} command"


@pytest.mark.parametrize("line", CASES)
def test_readme_command_runs(line, workspace):
    reason = skip_reason(line)
    if reason is not None:
        pytest.skip(reason)
    command, kind = small_command(line)
    if "fashion-mnist" in command and not dataset_available("fashion-mnist"):
        missing("Fashion-MNIST", "apt-get install dataset-fashion-mnist")
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
           "PYTHONPATH": str(REPO), "DPVIT_DATA_DIR": str(real_data_dir())}
    done = subprocess.run(["bash", "-c", command], cwd=workspace, env=env, capture_output=True,
                          text=True, timeout=300)
    if done.returncode != 0:
        pytest.fail(f"README command failed with exit status {done.returncode}:\n  {line}\n"
                    f"run as:\n  {command}\n{(done.stdout + done.stderr)[-3000:]}")
    run_dir = re.search(r"--run-dir\s+(\S+)", line)
    if kind == "train" and run_dir:
        assert (workspace / run_dir.group(1) / "checkpoints" / "last.h5").is_file()
