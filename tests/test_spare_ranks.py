"""Spare ranks: on a host with more ranks than cores, only as many ranks as it has cores
train, on a communicator of their own; the others wait asleep for the end
(dpvit.parallel.threads.computes_steps, dpvit.cli.run_main).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

import pytest
from helpers import (
    REPO,
    assert_bitwise_same_state,
    load_params,
    mpirun,
    process_alive,
    rank_pids,
    real_data_dir,
)

from dpvit.errors import ConfigError
from dpvit.parallel.threads import computes_steps

#: Runs a command on one core of this machine (the affinity mask is inherited by mpirun's
#: ranks, and dpvit counts the cores it may use from it).
ONE_CORE = ("import os, sys; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
            "os.execvp(sys.argv[1], sys.argv[1:])")

#: Binds each rank to a core of its own, as `srun --cpu-bind=cores` or `mpirun -bind-to core`
#: do: every rank's mask then holds one core, and the host's ranks together hold them all.
CORE_EACH = ("import os, sys; cores = sorted(os.sched_getaffinity(0)); "
             "os.sched_setaffinity(0, {cores[int(os.environ['PMI_RANK']) % len(cores)]}); "
             "os.execvp(sys.argv[1], sys.argv[1:])")

ARGS = ["--dim", "16", "--depth", "1", "--heads", "2", "--mlp-ratio", "2", "--patch-size", "7",
        "--patch-embed", "linear", "--train-subset", "256", "--test-subset", "100",
        "--batch-size", "32", "--max-steps", "5", "--drop-rate", "0.1", "--no-progress"]


def test_only_as_many_ranks_as_cores_compute(monkeypatch):
    monkeypatch.delenv("DPVIT_SPARE_RANKS", raising=False)
    assert [computes_steps(r, 2) for r in range(4)] == [True, True, False, False]
    monkeypatch.setenv("DPVIT_SPARE_RANKS", "compute")
    assert all(computes_steps(r, 2) for r in range(4))
    monkeypatch.setenv("DPVIT_SPARE_RANKS", "sometimes")
    with pytest.raises(ConfigError, match="DPVIT_SPARE_RANKS='sometimes': choose one of wait"):
        computes_steps(0, 2)


def train_on_one_core(run_dir, ranks, spare, *extra, code=0):
    launcher = [mpirun(), "-n", str(ranks)] if ranks else []
    return train([sys.executable, "-c", ONE_CORE, *launcher], run_dir, spare, *extra, code=code)


def train(launcher, run_dir, spare, *extra, code=0):
    cmd = [*launcher, sys.executable, "-m", "dpvit.train", *ARGS, "--run-dir", str(run_dir),
           *extra]
    env = {**os.environ, "DPVIT_SPARE_RANKS": spare, "DPVIT_DATA_DIR": str(real_data_dir())}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=REPO, env=env)
    assert result.returncode == code, result.stderr[-3000:]
    return result.stdout + result.stderr


@pytest.mark.mpi
def test_two_ranks_on_one_core_train_as_one_rank_bit_for_bit(tmp_path):
    """`mpirun -n 2` on one core: rank 1 is spare, so the run is the one-process run's, bit for
    bit; with DPVIT_SPARE_RANKS=compute both ranks compute 16 images each, and the sums in
    another order make the parameters differ (the mode is really on)."""
    train_on_one_core(tmp_path / "one", None, "wait")
    log = train_on_one_core(tmp_path / "spare", 2, "wait")
    assert "1 of 2 ranks compute" in log and "[rank 0/1]" in log
    assert_bitwise_same_state(tmp_path / "one" / "checkpoints" / "last.h5",
                              tmp_path / "spare" / "checkpoints" / "last.h5", 5)
    log = train_on_one_core(tmp_path / "compute", 2, "compute")
    assert "ranks compute" not in log and "[rank 0/2]" in log
    a = load_params(tmp_path / "one" / "checkpoints" / "last.h5")
    b = load_params(tmp_path / "compute" / "checkpoints" / "last.h5")
    assert any(a[name].tobytes() != b[name].tobytes() for name in a)


@pytest.mark.mpi
def test_spare_ranks_end_with_the_computing_ranks_exit_code(tmp_path):
    """An error the computing ranks agree on (no checkpoint for --resume must) ends the spare
    rank too, with the same exit status, at once."""
    log = train_on_one_core(tmp_path / "none", 2, "wait", "--resume", "must", code=1)
    assert "1 of 2 ranks compute" in log and "--resume must" in log, log


@pytest.mark.mpi
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores to bind 2 ranks")
def test_ranks_bound_to_a_core_each_all_compute(tmp_path):
    """A launcher that binds each rank to its own core leaves one core in each rank's mask; the
    host still has a core per rank, so no rank is spare and none waits asleep."""
    log = train([mpirun(), "-n", "2", sys.executable, "-c", CORE_EACH], tmp_path, "wait")
    assert "ranks compute" not in log and "[rank 0/2]" in log, log
    assert "threads per rank: 1 (2 ranks share this host), one BLAS" in log, log


@contextlib.contextmanager
def job_on_one_core(log, *args, **env):
    """`mpirun -n 2 python -m dpvit.train` on one core (rank 1 spare) in the background, its
    output in ``log``; killed on leaving the block if it still runs."""
    cmd = [sys.executable, "-c", ONE_CORE, mpirun(), "-n", "2", sys.executable, "-m",
           "dpvit.train", *ARGS, *args]
    env = {**os.environ, "DPVIT_SPARE_RANKS": "wait", "DPVIT_DATA_DIR": str(real_data_dir()),
           **env}
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def wait_for_line(log, text, proc, timeout=60):
    end = time.monotonic() + timeout
    while text not in log.read_text():
        assert proc.poll() is None and time.monotonic() < end, log.read_text()[-3000:]
        time.sleep(0.02)


@pytest.mark.mpi
def test_a_stopped_spare_rank_ends_the_job_at_the_collective_timeout(tmp_path):
    """The computing rank finishes and waits for the spare rank under the collective deadline:
    a spare rank that was stopped (SIGSTOP) ends the job with the one timeout line naming it,
    and no process is left, instead of a job that never ends."""
    job, log = f"spare-{os.getpid()}-{time.monotonic_ns()}", tmp_path / "job.log"
    with job_on_one_core(log, "--run-dir", str(tmp_path), "--collective-timeout", "3",
                         DPVIT_TEST_JOB=job) as proc:
        pids = rank_pids(job, 2)
        wait_for_line(log, "1 of 2 ranks compute", proc)  # split, before training begins
        os.kill(pids[1], signal.SIGSTOP)
        proc.wait(timeout=90)
    stderr = log.read_text()
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert proc.returncode != 0 and len(errors) == 1, stderr[-3000:]
    assert "in the spare ranks' exit during the end of the run" in errors[0], errors[0]
    assert "rank(s) [1] did not answer" in errors[0], errors[0]
    assert (tmp_path / "checkpoints" / "last.h5").is_file()  # the training itself completed
    time.sleep(0.5)
    assert not [pid for pid in pids.values() if process_alive(pid)], "rank processes left"


@pytest.mark.mpi
def test_sigterm_stops_the_computing_ranks_with_a_checkpoint_while_the_spare_rank_waits(
        tmp_path):
    """SIGTERM to mpirun reaches every rank: the spare rank ignores it and waits, the
    computing rank stops at a step boundary with a checkpoint, and the job exits 143 as a
    job without spare ranks does (README, "Reliability")."""
    log = tmp_path / "job.log"
    with job_on_one_core(log, "--epochs", "1000", "--max-steps", "100000", "--log-every", "1",
                         "--run-dir", str(tmp_path / "run")) as proc:
        wait_for_line(log, "step 11/", proc)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 143, log.read_text()[-3000:]
    text = log.read_text()
    stops = [line for line in text.splitlines() if "stopped by SIGTERM" in line]
    assert len(stops) == 1 and "[rank 0/1] warning:" in stops[0], text[-3000:]
    step = int(stops[0].split("after step ")[1].split(";")[0])
    assert step >= 11 and (tmp_path / "run" / "checkpoints" / "last.h5").is_file()
