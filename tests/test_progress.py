"""What rank 0 shows while training: which display (--progress), the tqdm bar's fields and
redraws, plain lines with percentage and ETA, log lines that never mix with the bar, and the
bar on the terminal of a real ``mpirun``."""

from __future__ import annotations

import fcntl
import io
import logging
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
from helpers import REPO, TINY_ARGS, mpirun, real_data_dir, run_dpvit

from dpvit.config import load_config
from dpvit.errors import ConfigError
from dpvit.terminal import mpirun_terminal
from dpvit.training import progress as progress_module
from dpvit.training.progress import TrainingProgress, choose_mode

#: A bar frame: ``epoch 1  35%|███▌      | 140/400, loss 0.4321, lr 1.20e-03, 2345 images/s,
#: ETA 01:05`` (the ETA is ``?`` until tqdm has a rate).
FRAME = re.compile(r"epoch (\d+) +(\d+)%\|[^|]*\| (\d+)/(\d+), loss \d+\.\d{4}, "
                   r"lr \d\.\d\de[-+]\d\d, (\d+|\?) images/s, ETA (\d+:\d\d|\?)")
#: A plain line: ``epoch 1 step 400/7496 (5%): loss 0.4321, lr 3.90e-03, 612 images/s,
#: ETA 11:23``.
PLAIN = re.compile(r"epoch \d+ step (\d+)/(\d+) \((\d+)%\): loss \d+\.\d{4}, "
                   r"lr \d\.\d\de[-+]\d\d, \d+ images/s, ETA (\d+:\d\d|\?)")
#: Anything a terminal would act on: carriage return, escape, backspace... (not \n or \t).
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")

#: The plain-lines switch is left out: these runs choose their display themselves.
# 8 epochs of 8 steps: enough for the 40-step runs below (the MNIST recipe has 5 epochs)
ARGS = [*(a for a in TINY_ARGS if a != "--no-progress"), "--epochs", "8"]


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


# --- which display -----------------------------------------------------------------------


def test_auto_is_a_bar_on_a_terminal_and_plain_lines_otherwise():
    assert choose_mode("auto", False, True, Terminal()) == "bar"
    assert choose_mode("auto", False, True, io.StringIO()) == "plain"
    assert choose_mode("auto", True, True, Terminal()) == "plain"  # --no-progress
    assert choose_mode("auto", False, False, Terminal()) == "none"  # not rank 0
    for mode in ("bar", "plain", "none"):
        assert choose_mode(mode, False, True, io.StringIO()) == mode
    with pytest.raises(ValueError):
        choose_mode("fancy", False, True)


def test_progress_flag_and_no_progress_alias():
    cfg, _ = load_config(["--progress", "bar"])
    assert (cfg.train.progress, cfg.train.no_progress) == ("bar", False)
    cfg, _ = load_config(["--no-progress"])
    assert choose_mode(cfg.train.progress, cfg.train.no_progress, True, Terminal()) == "plain"
    with pytest.raises(ConfigError, match="--progress"):
        load_config(["--progress", "fancy"])


def _fake_proc(tmp_path: Path, launcher: str, launcher_stderr: int) -> Path:
    """/proc with this process <- hydra_pmi_proxy <- ``launcher`` (whose fd 2 is
    ``launcher_stderr``)."""
    proc = tmp_path / "proc"
    me, proxy, top = os.getpid(), 900001, 900002
    for pid, name, parent in ((me, "python", proxy), (proxy, "hydra_pmi_proxy", top),
                              (top, launcher, 1)):
        (proc / str(pid) / "fd").mkdir(parents=True)
        (proc / str(pid) / "stat").write_text(f"{pid} ({name}) S {parent} {pid} {pid} 0 -1\n")
    (proc / str(top) / "fd" / "2").symlink_to(f"/proc/self/fd/{launcher_stderr}")
    return proc


def test_rank_0_finds_the_terminal_that_mpiruns_stderr_is(tmp_path):
    """The rank's stderr is a pipe to Hydra's proxy; mpirun's stderr is a terminal: found.
    Not found when mpirun's stderr is a file, the parent is not Hydra's proxy, or our stderr
    is not a pipe."""
    master, slave = pty.openpty()
    read_end, write_end = os.pipe()
    pipe = os.fdopen(write_end, "w")
    log = open(tmp_path / "log", "w")  # noqa: SIM115
    try:
        found = mpirun_terminal(pipe, _fake_proc(tmp_path / "a", "mpirun", slave))
        assert found is not None and os.isatty(found)
        os.close(found)
        found = mpirun_terminal(pipe, _fake_proc(tmp_path / "b", "mpiexec.hydra", slave))
        assert found is not None
        os.close(found)
        assert mpirun_terminal(pipe, _fake_proc(tmp_path / "c", "bash", slave)) is None
        assert mpirun_terminal(pipe, _fake_proc(tmp_path / "d", "mpirun", log.fileno())) is None
        assert mpirun_terminal(log, _fake_proc(tmp_path / "e", "mpirun", slave)) is None
        assert mpirun_terminal(pipe) is None  # pytest is no Hydra rank
    finally:
        pipe.close()
        log.close()
        for fd in (read_end, master, slave):
            os.close(fd)


# --- the bar and the plain lines, in-process -----------------------------------------------


def test_bar_shows_epoch_step_loss_lr_rate_and_eta():
    out = Terminal()
    progress = TrainingProgress("bar", total=10, batch_size=64, stream=out, min_interval=0.0)
    try:
        for step in range(1, 4):
            time.sleep(0.01)
            progress.update(step, epoch=1, loss=0.5, lr=1e-3)
    finally:
        progress.close()
    frames = [FRAME.search(part) for part in out.getvalue().split("\r")]
    frames = [f.groups() for f in frames if f]
    assert frames, out.getvalue()
    assert frames[-1][:4] == ("1", "30", "3", "10") and frames[-1][4] != "?"
    assert re.fullmatch(r"\d+:\d\d", frames[-1][5])
    assert "loss 0.5000" in out.getvalue() and "lr 1.00e-03" in out.getvalue()
    assert out.getvalue().endswith("\n")  # the last frame stays


def test_a_log_record_lifts_the_bar_and_gets_a_line_of_its_own(monkeypatch):
    out = Terminal()
    monkeypatch.setattr(sys, "stderr", out)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[rank 0/2] %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        progress = TrainingProgress("bar", total=5, stream=out, min_interval=0.0)
        progress.update(1, epoch=1, loss=1.0, lr=1e-3)
        logging.getLogger("dpvit.test").warning("a message")
        progress.update(2, epoch=1, loss=1.0, lr=1e-3)
        progress.close()
        assert handler in root.handlers  # the console handler is back
    finally:
        root.removeHandler(handler)
    before, after = out.getvalue().split("[rank 0/2] a message")
    assert before.endswith("\r")  # the bar was erased, the record starts at column 0
    assert after.startswith("\n") and FRAME.search(after)  # and the bar is drawn below it


def test_plain_line_has_percentage_and_an_eta_without_time_outside_training(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(progress_module.time, "perf_counter", lambda: now[0])
    progress = TrainingProgress("plain", total=7496)
    assert progress.plain and progress.bar is None
    for step in range(1, 401):
        now[0] += 0.15
        progress.update(step, epoch=1, loss=0.4321, lr=3.9e-3)
        if step == 200:
            now[0] += 1000.0  # an evaluation
            progress.resume()
    line = progress.line(400, 1, 0.4321, 3.9e-3, 612.4)
    # 7096 steps left at 0.15 s each (the evaluation not counted): 17:44
    assert line == ("epoch 1 step 400/7496 (5%): loss 0.4321, lr 3.90e-03, 612 images/s, "
                    "ETA 17:44")
    assert not CONTROL.search(line)


def test_a_download_without_a_terminal_logs_a_line_per_quarter(monkeypatch, caplog):
    from dpvit.data.download import _Progress

    monkeypatch.setattr(sys, "stderr", io.StringIO())
    caplog.set_level(logging.INFO, logger="dpvit.data.download")
    progress = _Progress("f.gz", total=10_000_000, done=0)
    for _ in range(10):
        progress.update(1_000_000)
    progress.close()
    assert caplog.messages == [f"f.gz: {p}% of 10.0 MB" for p in (30, 50, 80, 100)]
    caplog.clear()
    progress = _Progress("f.gz", total=10_000_000, done=6_000_000)  # a resumed download
    progress.update(4_000_000)
    assert caplog.messages == ["f.gz: 100% of 10.0 MB"]


# --- real runs -------------------------------------------------------------------------------


def _take_terminal() -> None:
    """In the child, after setsid: make stdin (the pty) its controlling terminal."""
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def run_on_terminal(cmd: list[str], columns: int = 150, timeout: float = 180) -> str:
    """Run ``cmd`` as a shell in a terminal window would: a new session whose controlling
    terminal and stdin/stdout/stderr are a new pseudo-terminal ``columns`` wide. Returns what
    it wrote there (the test fails if it exits non-zero)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    env = {**os.environ, "DPVIT_DATA_DIR": str(real_data_dir())}
    proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=REPO,
                            start_new_session=True, preexec_fn=_take_terminal)
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if not select.select([master], [], [], 1.0)[0]:
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every process closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        else:
            proc.kill()
        code = proc.wait(timeout=30)
    finally:
        os.close(master)
    text = b"".join(chunks).decode(errors="replace")
    assert code == 0, text[-3000:]
    return text


def assert_redrawing_bar(text: str, total: int, columns: int) -> None:
    """Several frames of the bar, each redrawn over the last with a carriage return, with an
    ETA, as wide as the terminal allows; no plain step lines."""
    parts = text.split("\r")
    frames = [m.groups() for m in map(FRAME.search, parts) if m]
    assert len({f[2] for f in frames}) >= 3, text  # redrawn at several steps
    assert frames[-1][1:4] == ("100", str(total), str(total))
    assert any(re.fullmatch(r"\d+:\d\d", f[5]) for f in frames), frames  # an ETA
    widths = {len(p.rstrip("\n")) for p in parts if FRAME.search(p)}
    assert max(widths) == columns - 1, widths  # the terminal's width, never wrapping
    assert not PLAIN.search(text)
    # log records sit on lines of their own, never after a bar frame
    accuracy = re.search(r"([\s\S])\d\d:\d\d:\d\d \[rank 0/\d\] epoch \d+ step \d+: test loss",
                         text)
    assert accuracy and accuracy.group(1) in "\r\n", text


def test_a_terminal_shows_a_redrawing_bar_with_eta(tmp_path):
    """stderr is a pseudo-terminal: tqdm's bar, redrawn in place, with an ETA."""
    text = run_on_terminal([sys.executable, "-m", "dpvit.train", *ARGS, "--max-steps", "40",
                            "--log-every", "2", "--run-dir", str(tmp_path / "run")], columns=150)
    assert_redrawing_bar(text, 40, columns=150)
    assert "test accuracy" in text


@pytest.mark.parametrize("ranks", [None, pytest.param(2, marks=pytest.mark.mpi)])
def test_piped_output_has_percentage_and_eta_per_line_and_no_control_characters(tmp_path,
                                                                                ranks):
    result = run_dpvit("train", [*ARGS, "--max-steps", "4", "--log-every", "2",
                                 "--run-dir", str(tmp_path / "run")], ranks)
    assert result.returncode == 0, result.stderr
    lines = [PLAIN.search(line) for line in result.stderr.splitlines()]
    assert [m.groups()[:3] for m in lines if m] == [("2", "4", "50"), ("4", "4", "100")]
    assert all(m.group(4) != "?" for m in lines if m)
    assert not CONTROL.search(result.stderr + result.stdout)
    assert not FRAME.search(result.stderr)


@pytest.mark.mpi
def test_mpirun_in_a_terminal_shows_the_bar_there(tmp_path):
    """``mpirun -n 2`` typed in a terminal: rank 0's stderr is a pipe to Hydra's proxy, yet
    the bar is drawn, redrawn and as wide as mpirun's terminal; log lines of both ranks
    keep lines of their own."""
    text = run_on_terminal([mpirun(), "-n", "2", sys.executable, "-m", "dpvit.train", *ARGS,
                            "--max-steps", "40", "--log-every", "2",
                            "--run-dir", str(tmp_path / "run")], columns=130)
    assert_redrawing_bar(text, 40, columns=130)
    assert "[rank 0/2]" in text and "test accuracy" in text
