"""The collective deadline (`--collective-timeout`): a job whose rank stopped or hung ends with
one line naming the missing rank, and no process of it is left."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import TINY_ARGS, mpirun, process_alive, rank_pids, real_data_dir

from dpvit.parallel.deadline import CollectiveDeadline, timeout_message

#: A tiny run long enough (many steps) that it is still training when a test interferes.
LONG_TINY = [*TINY_ARGS, "--train-subset", "60000", "--log-every", "20"]


def _popen_marked(run_dir: Path, timeout_s: float, ranks: int = 2) -> subprocess.Popen:
    env = {**os.environ, "DPVIT_DATA_DIR": str(real_data_dir()), "DPVIT_SPARE_RANKS": "compute"}
    cmd = [mpirun(), "-n", str(ranks), sys.executable, "-m", "dpvit.train", *LONG_TINY,
           "--run-dir", str(run_dir), "--collective-timeout", str(timeout_s)]
    # the marker must hold mpirun's own pid, which is only known after the start: start a
    # shell that exports it and execs mpirun in its place
    script = 'export DPVIT_TEST_JOB=$$; exec "$@"'
    return subprocess.Popen(["sh", "-c", script, "sh", *cmd], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def _wait_for_training(run_dir: Path, proc: subprocess.Popen, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    metrics = run_dir / "metrics.jsonl"
    while time.monotonic() < end:
        if metrics.is_file() and metrics.stat().st_size > 0:
            return
        if proc.poll() is not None:
            pytest.fail(f"the job ended early ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        time.sleep(0.1)
    pytest.fail("training did not start")


def _finish(proc: subprocess.Popen, limit: float) -> tuple[float, str]:
    start = time.monotonic()
    try:
        _, stderr = proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail(f"the job did not end within {limit} s")
    return time.monotonic() - start, stderr


def _the_one_error(proc: subprocess.Popen, stderr: str, pids: dict[int, int]) -> str:
    """The job failed with exactly one error line (returned), and none of its ranks is left."""
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert proc.returncode != 0
    assert len(errors) == 1, stderr[-3000:]
    time.sleep(0.5)
    assert not [pid for pid in pids.values() if process_alive(pid)], "rank processes left"
    return errors[0]


@pytest.mark.mpi
def test_a_stopped_rank_ends_the_job_with_one_line_naming_it(tmp_path):
    """SIGSTOP on rank 1 of 3: ranks 0 and 2 wait in the gradient allreduce, and after the
    timeout the job exits within a few seconds; one error line, from rank 0, names rank 1 as
    silent and rank 2 as waiting too, and no rank's process is left (the stopped one
    included)."""
    run_dir = tmp_path / "run"
    proc = _popen_marked(run_dir, timeout_s=3, ranks=3)
    try:
        pids = rank_pids(proc.pid, 3)
        _wait_for_training(run_dir, proc)
        os.kill(pids[1], signal.SIGSTOP)
        elapsed, stderr = _finish(proc, limit=3 + 15)
    finally:
        if proc.poll() is None:
            proc.kill()
    error = _the_one_error(proc, stderr, pids)
    assert "[rank 0/3] error: rank 0 waited" in error
    assert "rank(s) [1] did not answer" in error and "during step" in error
    assert "rank(s) [2] were waiting too" in error
    assert elapsed < 3 + 15


@pytest.mark.mpi
def test_a_rank_stuck_in_io_is_named_as_busy(tmp_path):
    """Rank 0 blocks forever opening metrics.jsonl (a FIFO nobody reads) at its first log
    line: rank 1 times out in the allreduce and says rank 0 is alive but busy in that step."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    os.mkfifo(run_dir / "metrics.jsonl")
    proc = _popen_marked(run_dir, timeout_s=3)
    try:
        pids = rank_pids(proc.pid, 2)
        _, stderr = _finish(proc, limit=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    error = _the_one_error(proc, stderr, pids)
    assert "[rank 1/2] error: rank 1 waited" in error
    assert "still busy outside collectives: rank 0 in step" in error


def test_the_message_sorts_ranks_into_silent_busy_and_waiting():
    answers = {1: (1, None, "step 7"), 3: (3, "an allreduce", "step 8")}
    text = timeout_message(0, 4, "an allreduce", "step 8", 30.4, 30, answers)
    assert text == ("rank 0 waited 30 s in an allreduce during step 8 (--collective-timeout "
                    "30); rank(s) [2] did not answer (stopped, hung or unreachable); still busy "
                    "outside collectives: rank 1 in step 7; rank(s) [3] were waiting too")
    assert "does not let dpvit ask" in timeout_message(0, 2, "x", "y", 1, 1, None)


def test_no_thread_runs_when_the_timeout_is_disabled():
    deadline = CollectiveDeadline(side_comm=None, rank=0, timeout=0, can_ask=False)
    assert deadline._thread is None
    deadline.set_timeout(5)
    assert deadline._thread is not None and deadline._thread.is_alive()
