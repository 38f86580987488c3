"""launch/local.sh, the one-machine launcher: ``python -m dpvit.train`` under the mpirun that
sits beside the chosen python, on ``NP`` ranks, with every argument passed through and the
job's exit status returned.

(launch/slurm.sbatch and launch/cluster.py have their own tests: test_slurm.py and
test_cluster.py; launch/results.py: test_launch_results.py.)
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, TINY_ARGS, real_data_dir

from dpvit.checkpoint import load_checkpoint

LOCAL = REPO / "launch" / "local.sh"
VENV_BIN = str(Path(sys.executable).parent)


def _local(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run launch/local.sh ``args`` from the repository root with ``env`` on top of ours."""
    full = {k: v for k, v in os.environ.items() if k not in ("NP", "PYTHON")}
    full.update(DPVIT_DATA_DIR=str(real_data_dir()), **env)
    return subprocess.run([str(LOCAL), *args], capture_output=True, text=True, timeout=180,
                          env=full, cwd=REPO)


@pytest.mark.mpi
def test_local_sh_trains_on_np_ranks(tmp_path):
    """As a user with the environment activated runs it: ``python`` from PATH, NP=3 ranks
    (not the default of one per core on a 2-core machine), every one computing (without
    DPVIT_SPARE_RANKS=compute a machine with fewer cores leaves some spare)."""
    run = tmp_path / "run"
    result = _local([*TINY_ARGS, "--max-steps", "2", "--run-dir", str(run)],
                    {"NP": "3", "PATH": f"{VENV_BIN}:{os.environ['PATH']}",
                     "DPVIT_SPARE_RANKS": "compute"})
    assert result.returncode == 0, result.stderr
    assert "[rank 0/3]" in result.stderr and "on 3 rank(s)" in result.stderr
    ckpt = load_checkpoint(run / "checkpoints" / "last.h5")
    assert ckpt.world_size == 3 and ckpt.step == 2
    assert ckpt.config["model"]["embed_dim"] == 16  # the arguments reached the trainer


@pytest.mark.mpi
def test_local_sh_uses_the_mpirun_beside_python_and_returns_the_exit_status():
    """PYTHON names the interpreter; its own mpirun is used even when none is on PATH, and a
    failing job's exit status and one-line error come back."""
    result = _local(["--no-such-flag"], {"NP": "1", "PYTHON": sys.executable,
                                         "PATH": "/usr/bin:/bin"})
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "unrecognized arguments: --no-such-flag" in errors[0], (
        result.stderr)
