"""launch/slurm.sbatch on a real single-node SLURM (launch/slurm-local.sh): a job stopped
mid-run by SLURM writes a checkpoint on SIGTERM, runs again from it with `--resume auto`, and
ends with the parameters of an uninterrupted run, bit for bit. Stopped two ways: `scontrol
requeue` (SLURM signals every process and requeues the job; preemption does the same), and
SIGTERM to the ranks alone (what `--signal=TERM@120` sends before the time limit), after which
the batch script requeues the job itself.

SLURM's daemons must run as root (`apt-get install slurmctld slurmd slurm-client` on Debian).
Without them, or without root, the test is skipped, and under CI it fails instead.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import REPO, TINY_ARGS, load_params, real_data_dir, train

pytestmark = [pytest.mark.slurm, pytest.mark.mpi]

LOCAL_SLURM = REPO / "launch" / "slurm-local.sh"
SBATCH_SCRIPT = REPO / "launch" / "slurm.sbatch"
INSTALL = "apt-get install -y --no-install-recommends slurmctld slurmd slurm-client"
#: The job: about 30-60 ms a step on two ranks, so that a requeue sent right after the first
#: step lands well before the last one; 60 steps of 32 images over 1024 of them.
STEPS = 60
JOB_ARGS = [*TINY_ARGS, "--dim", "32", "--depth", "2", "--train-subset", "1024",
            "--dtype", "float64", "--epochs", "100", "--max-steps", str(STEPS), "--log-every", "1"]
RANKS = min(2, os.cpu_count() or 1)


def _ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _unavailable(reason: str) -> None:
    """SLURM cannot run here: CI installs it and runs as root, so there this is a failure."""
    if _ci():
        pytest.fail(f"{reason}; CI must provide it ({INSTALL}, as root)")
    pytest.skip(reason)


def _free_port_pair() -> int:
    """A port p such that p and p + 1 are free here (slurmctld and slurmd listen on them)."""
    for _ in range(50):
        port = random.randrange(20000, 40000)
        try:
            for p in (port, port + 1):
                with socket.socket() as sock:
                    sock.bind(("", p))
        except OSError:
            continue
        return port
    raise RuntimeError("no two free consecutive ports")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory: pytest.TempPathFactory):
    """A single-node SLURM of our own (own state dir and ports); the env to talk to it."""
    tools = [t for t in ("sbatch", "scontrol", "squeue", "slurmctld", "slurmd")
             if shutil.which(t) is None]
    if tools:
        _unavailable(f"SLURM is not installed (no {', '.join(tools)})")
    if os.geteuid() != 0:
        _unavailable("a local SLURM needs root (slurmd runs jobs as their user)")
    state = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "DPVIT_SLURM_DIR": str(state), "DPVIT_SLURM_PORT": str(_free_port_pair())}
    try:
        started = subprocess.run([str(LOCAL_SLURM), "start"], env=env, capture_output=True,
                                 text=True, timeout=120)
        if started.returncode != 0:
            _unavailable(f"the local SLURM did not come up:\n{started.stdout}{started.stderr}")
        yield {**env, "SLURM_CONF": str(state / "slurm.conf")}
    finally:
        subprocess.run([str(LOCAL_SLURM), "stop"], env=env, capture_output=True, timeout=120)


def _job(job_id: str, env: dict[str, str]) -> dict[str, str]:
    """`scontrol show job` as a dict ({} once SLURM no longer knows the job)."""
    out = subprocess.run(["scontrol", "show", "job", "--oneliner", job_id], env=env,
                         capture_output=True, text=True, timeout=30).stdout
    return dict(f.split("=", 1) for f in out.split() if "=" in f)


def _wait(what: str, done, timeout: float, output: Path) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            text = output.read_text() if output.exists() else "(no output file)"
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}:\n{text[-4000:]}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    """The parameters after an uninterrupted run of the job's command (mpirun, as many ranks)."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    train(run_dir, "--resume", "auto", *JOB_ARGS[len(TINY_ARGS):], ranks=RANKS, threads=1)
    return load_params(run_dir / "checkpoints" / f"step-{STEPS}.h5")


@pytest.mark.parametrize("stop", [
    ["scontrol", "requeue"],          # requeue / preemption: SIGTERM to the whole job
    ["scancel", "--signal=TERM"],     # the time-limit warning: SIGTERM to the ranks only
], ids=["requeue", "time-limit-signal"])
def test_stopped_job_resumes_bitwise(slurm: dict[str, str], reference: dict[str, np.ndarray],
                                     stop: list[str], tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    output = tmp_path / "slurm.out"
    env = {**slurm, "PYTHON": sys.executable, "RUN_DIR": str(run_dir),
           "DPVIT_DATA_DIR": str(real_data_dir()), "DPVIT_NUM_THREADS": "1"}
    submit = subprocess.run(
        ["sbatch", "--parsable", f"--ntasks={RANKS}", f"--chdir={tmp_path}",
         f"--output={output}", str(SBATCH_SCRIPT), *JOB_ARGS],
        env=env, capture_output=True, text=True, timeout=60)
    assert submit.returncode == 0, submit.stderr
    job_id = submit.stdout.strip().split(";")[0]
    try:
        # stop it as soon as the first run has logged a step
        metrics = run_dir / "metrics.jsonl"
        _wait("the first training step", lambda: metrics.exists()
              and '"kind": "step"' in metrics.read_text(), 90, output)
        signalled = subprocess.run([*stop, job_id], env=env, capture_output=True, text=True,
                                   timeout=30)
        assert signalled.returncode == 0, signalled.stderr

        final: dict[str, str] = {}

        def finished() -> bool:  # (a requeued job goes through COMPLETING and PENDING)
            final.update(_job(job_id, env))
            return final.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT",
                                              "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED")

        _wait("the job to end", finished, 120, output)
    finally:
        subprocess.run(["scancel", job_id], env=env, capture_output=True, timeout=30)

    log = output.read_text()
    assert (final["JobState"], final["ExitCode"], final["Restarts"]) == ("COMPLETED", "0:0", "1"), \
        log[-4000:]
    # the first run stopped on SLURM's SIGTERM with a checkpoint of its last step ...
    assert "start 1 on" in log and "start 2 on" in log, log[-4000:]
    stopped = re.findall(r"stopped by SIGTERM after step (\d+); checkpoint (\S+) written", log)
    assert len(stopped) == 1, log[-4000:]
    step, checkpoint = int(stopped[0][0]), stopped[0][1]
    assert 1 <= step < STEPS, log[-4000:]
    # ... the second resumed from it (the first started fresh) and finished the run
    assert re.findall(r"resuming from (\S+) \(step (\d+)", log) == [(checkpoint, str(step))], log
    assert "exit code 143" in log, log[-4000:]
    # requeued by SLURM, or (after the time-limit warning) by the batch script itself
    assert (f"requeueing job {job_id}" in log) == (stop[0] == "scancel"), log[-4000:]

    got = load_params(run_dir / "checkpoints" / f"step-{STEPS}.h5")
    assert got.keys() == reference.keys()
    for name, want in reference.items():
        np.testing.assert_array_equal(got[name], want, err_msg=name)
