"""Errors every rank makes alike are one line from rank 0 and no MPI abort; errors some ranks
make still end the whole job (`dpvit.cli.agree`, `run_main(parse_args=...)`)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from helpers import REPO, mpirun, real_data_dir, run_dpvit

from dpvit.cli import agree
from dpvit.errors import AgreedError, ConfigError
from dpvit.parallel.comm import LocalComm

#: What MPICH prints when a rank calls MPI_Abort.
ABORT_MARKS = ("Abort(", "MPI_Abort")


class ThreeRanks(LocalComm):
    """Rank `rank` of three, whose allgather returns the other ranks' given outcomes."""

    def __init__(self, rank: int, others: dict[int, str | None]) -> None:
        self.rank, self.size, self.others = rank, 3, others

    def allgather_object(self, obj):
        return [obj if r == self.rank else self.others[r] for r in range(self.size)]

    def broadcast_object(self, obj, root=0):
        return obj if self.rank == root else self.others[root]


def _fail(message: str):
    raise ConfigError(message)


def test_agree_returns_the_result_when_no_rank_failed():
    comm = ThreeRanks(1, {0: None, 2: None})
    assert agree(comm, lambda x: x + 1, 41) == 42


def test_agree_raises_the_same_error_on_every_rank():
    for rank in range(3):  # every rank failed alike: the message alone, on each of them
        comm = ThreeRanks(rank, {r: "--batch-size must be ..." for r in range(3)})
        with pytest.raises(AgreedError) as caught:
            agree(comm, _fail, "--batch-size must be ...")
        assert str(caught.value) == "--batch-size must be ..." and caught.value.exit_code == 1


def test_agree_names_the_ranks_when_only_some_failed():
    # rank 0 parsed its flags; rank 2 was started with other ones: rank 0 must stop too
    comm = ThreeRanks(0, {1: None, 2: "--epochs must be a positive integer, got 0"})
    with pytest.raises(AgreedError, match=re.escape(
            "--epochs must be a positive integer, got 0 (on rank(s) [2] of 3)")):
        agree(comm, lambda: "fine")


def test_agree_root_only_runs_on_rank_0_and_shares_its_error():
    ran = []
    assert agree(ThreeRanks(1, {0: None}), ran.append, 1, root_only=True) is None
    assert ran == []  # not run on rank 1
    with pytest.raises(AgreedError, match=r"^no checkpoint$"):  # no rank list: rank 0's step
        agree(ThreeRanks(1, {0: "no checkpoint"}), ran.append, 1, root_only=True)
    with pytest.raises(AgreedError, match=r"^no checkpoint$"):
        agree(ThreeRanks(0, {}), _fail, "no checkpoint", root_only=True)


def test_agree_lets_bugs_through_to_the_abort():
    with pytest.raises(ZeroDivisionError):  # never swallowed: run_main aborts the job
        agree(ThreeRanks(0, {1: None, 2: None}), lambda: 1 / 0)


def _one_line(stderr: str, message: str, ranks: int) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert re.fullmatch(rf"\d\d:\d\d:\d\d \[rank 0/{ranks}\] error: {re.escape(message)}",
                        lines[0]), stderr
    assert not any(mark in stderr for mark in ABORT_MARKS), stderr


@pytest.mark.mpi
@pytest.mark.parametrize("args, message", [
    (["--batch-size", "0"], "--batch-size must be a positive integer, got 0"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag (see --help)"),
    (["--dim", "30", "--heads", "4"], "--dim (30) must be divisible by --heads (4)"),
])
def test_configuration_error_under_mpirun_is_one_line_from_rank_0(args, message):
    result = run_dpvit("train", args, ranks=4, timeout=60)
    assert result.returncode == 1, result.stderr
    _one_line(result.stderr, message, 4)
    assert result.stdout == ""


@pytest.mark.mpi
def test_flags_only_one_rank_was_given_still_end_every_rank(tmp_path):
    """Ranks started with different command lines (an MPMD launch): rank 0's flags are fine
    and it would train, but it learns that rank 1 failed and stops with it, in one line."""
    good = [sys.executable, "-m", "dpvit.train", "--run-dir", str(tmp_path / "run"),
            "--train-subset", "256", "--test-subset", "200", "--epochs", "1"]
    cmd = [mpirun(), "-n", "1", *good, ":", "-n", "1", *good, "--epochs", "0"]
    env = {**os.environ, "DPVIT_DATA_DIR": str(real_data_dir())}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env, cwd=REPO)
    assert result.returncode == 1, result.stderr
    _one_line(result.stderr, "--epochs must be a positive integer, got 0 (on rank(s) [1] of 2)",
              2)
    assert not (tmp_path / "run").exists()


@pytest.mark.mpi
def test_a_batch_larger_than_the_training_set_is_one_line_and_no_run_directory(tmp_path):
    """Found only once the data is known (after the flags were accepted): still one line from
    rank 0, no abort, and no run directory left behind."""
    run = tmp_path / "run"
    result = run_dpvit("train", ["--train-subset", "10", "--batch-size", "64", "--run-dir",
                                 str(run), "--dim", "16", "--depth", "1", "--heads", "2"],
                       ranks=2, timeout=60)
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].endswith(
        "[rank 0/2] error: --batch-size 64 is larger than the 10 training images; lower "
        "--batch-size"), result.stderr
    assert not any(mark in result.stderr for mark in ABORT_MARKS), result.stderr
    assert not run.exists()
