"""Tests for dpvit.parallel and dpvit.cli: LocalComm in-process, MPIComm through real `mpirun`
launches."""

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import mpirun as find_mpirun
from helpers import run_dpvit

from dpvit import cli
from dpvit.errors import UserError
from dpvit.parallel import comm as pcomm
from dpvit.parallel import launcher, threads

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / "mpi_workers" / "dist_worker.py"


def test_local_comm_collectives_are_identity():
    comm = pcomm.LocalComm()
    assert (comm.rank, comm.size, comm.local_rank, comm.local_size) == (0, 1, 0, 1)
    assert comm.is_root
    buf = np.arange(6, dtype=np.float32)
    comm.broadcast_(buf)
    comm.allreduce_sum_(buf)
    np.testing.assert_array_equal(buf, np.arange(6))
    out = comm.allreduce_sum(buf)
    assert out is not buf and np.array_equal(out, buf)
    assert comm.allreduce_sum(np.array(2.0)).shape == ()
    assert comm.allreduce_sum(3) == 3 and comm.allreduce_max(True) is True
    assert comm.allreduce_min(2.5) == 2.5
    assert comm.broadcast_object({"a": 1}) == {"a": 1}
    assert comm.allgather_object("x") == ["x"]
    comm.check_identical(buf, "parameters")
    comm.barrier()
    with pytest.raises(ValueError, match="root rank 1"):
        comm.broadcast_(buf, root=1)


def test_init_comm_without_launcher_is_local(monkeypatch):
    for name in launcher.LAUNCHER_ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    assert isinstance(pcomm.init_comm(), pcomm.LocalComm)
    assert launcher.launched_by_mpi({"PMI_RANK": "0"})
    monkeypatch.setenv("PMI_RANK", "0")
    assert isinstance(pcomm.init_comm(force_local=True), pcomm.LocalComm)


def test_plain_import_does_not_load_mpi():
    code = "import sys, dpvit.parallel.comm as c; c.init_comm(); print('mpi4py.MPI' in sys.modules)"
    env = {k: v for k, v in os.environ.items() if k not in launcher.LAUNCHER_ENV_VARS}
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**env, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert out.stdout.strip() == "False"


def test_configure_threads(restore_process_state):
    comm = pcomm.LocalComm()
    comm.local_size = 2
    assert threads.configure_threads(comm) == comm.threads == 1
    assert os.environ["OMP_NUM_THREADS"] == "1"
    comm.local_size = 1
    assert threads.configure_threads(comm) == comm.threads == threads.available_cores()
    assert os.environ["OPENBLAS_NUM_THREADS"] == "1"  # the replica threads use one each
    from threadpoolctl import threadpool_info

    assert {pool["num_threads"] for pool in threadpool_info()} == {1}


def test_more_ranks_than_cores_are_told_how_many_share(restore_process_state, monkeypatch,
                                                       caplog):
    """A fact, not advice that contradicts the README's `mpirun -n 4` on 2 cores."""
    comm = pcomm.LocalComm()
    comm.local_size, comm.host_cores, comm.oversubscribed = 4, 2, True
    with caplog.at_level(logging.INFO, logger="dpvit.parallel.threads"):
        assert threads.configure_threads(comm) == 1
    assert ("threads per rank: 1 (4 ranks share this host's 2 cores), one BLAS thread each"
            in caplog.text)
    assert "faster" not in caplog.text
    caplog.clear()
    comm.local_size, comm.oversubscribed = 2, False
    with caplog.at_level(logging.INFO, logger="dpvit.parallel.threads"):
        threads.configure_threads(comm)
    assert "(2 ranks share this host)" in caplog.text


@pytest.fixture
def restore_process_state(monkeypatch):
    """run_main sets thread env vars, BLAS limits and a root log handler; undo all after."""
    from threadpoolctl import threadpool_info, threadpool_limits

    for name in (*threads.THREAD_ENV_VARS, "DPVIT_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    blas = {pool["user_api"]: pool["num_threads"] for pool in threadpool_info()}
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    threadpool_limits(limits=blas)


def test_run_main_local_errors(caplog, restore_process_state):
    def user_fail(comm):
        raise UserError("config file x.toml: unknown key 'lrr'")

    def bug(comm):
        raise ZeroDivisionError("division by zero")

    def interrupted(comm):
        raise KeyboardInterrupt

    assert cli.run_main(lambda comm: None, argv=[]) == 0
    assert cli.run_main(lambda comm: 3, argv=[]) == 3
    with caplog.at_level(logging.ERROR):
        assert cli.run_main(user_fail, argv=[]) == 1
        assert cli.run_main(bug, argv=[]) == 1
        assert cli.run_main(interrupted, argv=[]) == 130
    messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert "config file x.toml: unknown key 'lrr'" in messages
    assert any("unexpected ZeroDivisionError" in m and "--debug" in m for m in messages)
    assert not any(r.exc_info for r in caplog.records)


def test_threads_are_announced_by_training_after_the_arguments(caplog, restore_process_state):
    """Train and bench say the thread count once at INFO, after the flags are checked; other
    commands say it at DEBUG only, and a flag error is the only line."""

    def bad_flag(argv):
        raise cli.ConfigError("--batch-size must be a positive integer, got 0")

    def said(**kwargs):
        caplog.clear()
        with caplog.at_level(logging.INFO):
            code = cli.run_main(lambda comm: None, argv=[], **kwargs)
        return code, [r.getMessage() for r in caplog.records]

    code, lines = said(announce_threads=True)
    assert code == 0 and [m for m in lines if m.startswith("threads per rank: ")] == lines
    assert len(lines) == 1
    assert said() == (0, [])  # predict, evaluate: no thread line at INFO
    assert said(parse_args=bad_flag, announce_threads=True) == (
        1, ["--batch-size must be a positive integer, got 0"])


@pytest.mark.parametrize("command", ["train", "bench", "evaluate"])
def test_help_is_the_usage_alone(command):
    result = run_dpvit(command, ["--help"])
    assert result.returncode == 0 and result.stdout.startswith("usage:")
    assert result.stderr == ""


def _mpirun(n, mode, tmp_path):
    mpirun = find_mpirun()
    piddir = tmp_path / "pids"
    piddir.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO), "DPVIT_DEBUG": "0"}
    start = time.monotonic()
    proc = subprocess.run(
        [mpirun, "-n", str(n), sys.executable, str(WORKER), mode, str(piddir)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return proc, time.monotonic() - start, piddir


def _running(pid):
    """True while `pid` exists and is not a zombie (killed ranks wait briefly for reaping)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def _assert_no_leftovers(piddir, n):
    pids = [int(p.read_text()) for p in piddir.glob("*.pid")]
    assert len(pids) == n
    deadline = time.monotonic() + 5
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = [p for p in pids if _running(p)]
        time.sleep(0.05)
    assert not alive, f"processes left behind: {alive}"


@pytest.mark.mpi
@pytest.mark.parametrize("n", [2, 4])
def test_mpi_collectives(tmp_path, n):
    proc, _, piddir = _mpirun(n, "collectives", tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"OK size={n} local_size={n}" in proc.stdout
    assert "threads per rank" not in proc.stderr  # said by train and bench only
    _assert_no_leftovers(piddir, n)


@pytest.mark.mpi
def test_mpi_check_identical_names_diverging_rank(tmp_path):
    proc, _, _ = _mpirun(2, "diverge", tmp_path)
    assert proc.returncode != 0
    assert "parameters after step 7 differ across ranks: rank(s) [1]" in proc.stderr


@pytest.mark.mpi
@pytest.mark.parametrize("n", [2, 4])
def test_mpi_rank_failure_aborts_job(tmp_path, n):
    proc, elapsed, piddir = _mpirun(n, "fail", tmp_path)
    assert proc.returncode != 0
    assert elapsed < 10, f"job took {elapsed:.1f} s to end after a rank failed"
    assert proc.stderr.count("unexpected RuntimeError: boom from rank 1") == 1, proc.stderr
    assert f"[rank 1/{n}]" in proc.stderr and "Traceback" not in proc.stderr
    _assert_no_leftovers(piddir, n)


@pytest.mark.mpi
def test_mpi_user_error_is_one_line(tmp_path):
    proc, elapsed, piddir = _mpirun(2, "user_error", tmp_path)
    assert proc.returncode != 0 and elapsed < 10
    lines = [ln for ln in proc.stderr.splitlines() if "train.h5" in ln]
    assert lines == [lines[0]] and lines[0].endswith(
        "[rank 1/2] error: data file /nonexistent/train.h5 does not exist"
    )
    assert "Traceback" not in proc.stderr
    _assert_no_leftovers(piddir, 2)
