"""The progress bar: when it is drawn, what it shows, and that log lines wipe it first."""

from __future__ import annotations

import io
import logging
import os
import pty
import subprocess
import sys
import threading

from helpers import REPO, TINY_ARGS, real_data_dir, run_dpvit

from dpvit.training.progress import ProgressBar, progress_wanted


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bar_only_on_rank_0_of_a_terminal_without_no_progress():
    assert progress_wanted(False, True, Terminal())
    assert not progress_wanted(True, True, Terminal())
    assert not progress_wanted(False, False, Terminal())
    assert not progress_wanted(False, True, io.StringIO())


def test_bar_shows_epoch_step_loss_lr_rate_and_eta():
    out = Terminal()
    bar = ProgressBar(total=10, stream=out, min_interval=0.0)
    try:
        for step in range(1, 4):
            bar.update(step, epoch=1, loss=0.5, lr=1e-3, images=64)
    finally:
        bar.close()
    last = out.getvalue().split("\r\x1b[K")[-2]  # the last drawn line (close erases it)
    assert last.startswith("epoch 1 [") and "3/10  30%" in last
    assert "loss 0.5000" in last and "lr 1.00e-03" in last
    assert "img/s" in last and "ETA " in last
    assert out.getvalue().endswith("\r\x1b[K")


def test_a_log_record_erases_the_bar_first():
    out = Terminal()
    log_out = io.StringIO()
    handler = logging.StreamHandler(log_out)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        bar = ProgressBar(total=5, stream=out, min_interval=0.0)
        bar.update(1, epoch=0, loss=1.0, lr=1e-3, images=32)
        drawn = out.getvalue()
        logging.getLogger("dpvit.test").warning("a message")
        assert out.getvalue() == drawn + "\r\x1b[K"
        bar.close()
        assert not handler.filters
    finally:
        root.removeHandler(handler)


def test_piped_training_logs_plain_lines(tmp_path):
    """stderr is a pipe (and no --no-progress): no bar, per-step log lines instead."""
    args = [a for a in TINY_ARGS if a != "--no-progress"]
    result = run_dpvit("train", [*args, "--max-steps", "4", "--log-every", "2", "--run-dir",
                                 str(tmp_path / "run")])
    assert result.returncode == 0, result.stderr
    assert "\r" not in result.stderr
    assert "step 2/4: loss" in result.stderr and "step 4/4: loss" in result.stderr


def test_training_on_a_terminal_draws_the_bar_and_drops_step_lines(tmp_path):
    """stderr is a pseudo-terminal: the bar is drawn in place, per-step lines are not logged,
    the epoch summary still is."""
    args = [a for a in TINY_ARGS if a != "--no-progress"]
    cmd = [sys.executable, "-m", "dpvit.train", *args, "--max-steps", "4", "--log-every", "2",
           "--run-dir", str(tmp_path / "run")]
    master, slave = pty.openpty()
    chunks: list[bytes] = []

    def read() -> None:
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:  # the child closed the terminal
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=read)
    reader.start()
    env = {**os.environ, "DPVIT_DATA_DIR": str(real_data_dir())}
    proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                          stderr=slave, env=env, cwd=REPO, timeout=120)
    os.close(slave)
    reader.join(timeout=10)
    os.close(master)
    text = b"".join(chunks).decode()
    assert proc.returncode == 0, text
    assert "\r\x1b[Kepoch 0 [" in text and "4/4 100%" in text
    assert "step 2/4: loss" not in text
    assert "test accuracy" in text
