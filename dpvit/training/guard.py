"""Guards that keep a long job safe: stop signals, the run-directory lock and start-up checks
(docs/reliability.md has the whole table of faults).

Every check here ends the job on all ranks at the same point, because a rank that stops on its
own leaves the others waiting in the next collective:

- `StopSignals`: SIGTERM (schedulers preempting) and SIGINT (Ctrl-C, forwarded to every rank by
  mpirun) only set a flag; the trainer agrees on it across ranks once per step (votes summed
  in the gradient allreduce), rank 0 writes a
  checkpoint and every rank exits with 128 + the signal number. A second signal stops at once.
- `RunDirLock`: rank 0 creates the run directory, takes an exclusive `flock` on
  `<run-dir>/.lock` for the job's life and writes and fsyncs a 1 MiB probe file, so a second job
  on the same directory, an unwritable path or a full disk is reported before training starts.
- `check_same_setup`: every rank must resolve the same configuration with the same dpvit version.
(`dpvit.training.nonfinite` handles non-finite steps the same way.)
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import socket
import threading
from pathlib import Path
from typing import Any

import numpy as np

from dpvit import __version__
from dpvit.config import Config
from dpvit.errors import AgreedError
from dpvit.parallel.comm import Comm

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
LOCK_NAME = ".lock"
PROBE_BYTES = 1 << 20  # enough to notice a full disk before the first checkpoint is due


class StopSignals:
    """While active, SIGTERM/SIGINT set `signum` instead of ending the process.

    The handler does nothing else (no I/O, no MPI: it runs between two bytecodes of whatever
    the main thread was doing). A second signal raises KeyboardInterrupt: the process exits
    with 130 at once, and a checkpoint being written is left intact because the write is atomic.
    Outside the main thread (e.g. in an embedding application) no handler is installed.
    """

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: object) -> None:
        if self.signum:
            raise KeyboardInterrupt
        self.signum = signum


def stop_votes(stop: StopSignals | None) -> list[float]:
    """This rank's vote per signal of STOP_SIGNALS (1.0 for the one received), to be summed."""
    signum = stop.signum if stop is not None else 0
    return [float(signum == sig) for sig in STOP_SIGNALS]


def agreed_signal(votes: np.ndarray) -> int:
    """The signal any rank received (0: none) from the summed votes; the same on every rank.

    When ranks received different signals the numerically largest wins (SIGTERM over SIGINT).
    """
    received = [int(sig) for sig, count in zip(STOP_SIGNALS, votes, strict=True) if count > 0]
    return max(received, default=0)


def preempted(signum: int, step: int, path: Path) -> AgreedError:
    """The report of a stop requested by a signal, after the checkpoint at `path` was written."""
    name = signal.Signals(signum).name
    return AgreedError(
        f"stopped by {name} after step {step}; checkpoint {path} written, continue with "
        f"--resume auto (exit status {128 + signum})",
        exit_code=128 + signum, level=logging.WARNING)


class RunDirLock:
    """Rank 0 claims the run directory for the job's life; every rank learns the outcome.

    On entering, rank 0 creates the directory, takes a non-blocking exclusive `flock` on
    `<run-dir>/.lock` (released by the kernel when the process ends, however it ends), writes
    its pid and host into it, and writes, fsyncs and removes a 1 MiB probe file. The outcome is
    broadcast, so that every rank raises the same `AgreedError` (one message, no abort) when the
    directory is held by another job, cannot be created, or cannot take data. `flock` is
    per-host on some network file systems: two jobs on different nodes sharing a directory over
    NFS may both get it.
    """

    def __init__(self, comm: Comm, run_dir: Path) -> None:
        self.comm, self.run_dir = comm, run_dir
        self._fd: int | None = None

    def __enter__(self) -> RunDirLock:
        error = None
        if self.comm.is_root:
            try:
                self._claim()
            except OSError as exc:
                error = (f"run directory {self.run_dir} is not usable: "
                         f"{exc.strerror or exc} ({exc.filename or self.run_dir})")
            except AgreedError as exc:
                error = str(exc)
        error = self.comm.broadcast_object(error)
        if error is not None:
            self.__exit__()
            raise AgreedError(error)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the flock; the file stays (deleting it would race)
            self._fd = None

    def _claim(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        lock = self.run_dir / LOCK_NAME
        self._fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(self._fd, 200).decode(errors="replace").strip() or "unknown pid"
            raise AgreedError(
                f"run directory {self.run_dir} is in use by another dpvit job ({holder}, "
                f"holding {lock}); wait for it to end or choose another --run-dir") from None
        os.ftruncate(self._fd, 0)
        os.write(self._fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        probe = self.run_dir / f".write-probe-{os.getpid()}"
        try:
            with open(probe, "wb") as fh:
                fh.write(bytes(PROBE_BYTES))
                fh.flush()
                os.fsync(fh.fileno())
        finally:
            probe.unlink(missing_ok=True)


def check_same_setup(comm: Comm, cfg: Config) -> None:
    """Raise the same `AgreedError` on every rank unless all resolved `cfg` and dpvit version alike.

    Ranks launched with different flags, config files or installs (MPMD launches, a stale
    node) would otherwise train different models or learning rates and diverge silently, or
    hang once buffer sizes differ. The config is gathered itself (about 1 KB, once) rather
    than a hash of it, so that the message names the keys that differ.
    """
    mine = {"dpvit_version": __version__,
            **{f"{section}.{k}": v for section, d in cfg.to_dict().items() for k, v in d.items()}}
    everyone = comm.allgather_object(mine)
    reference = everyone[0]
    differences = {}
    for rank, theirs in enumerate(everyone[1:], start=1):
        keys = sorted(k for k in reference.keys() | theirs.keys()
                      if reference.get(k) != theirs.get(k))
        if keys:
            differences[rank] = ", ".join(
                f"{k}={theirs.get(k)!r} (rank 0: {reference.get(k)!r})" for k in keys)
    if differences:
        detail = "; ".join(f"rank {r}: {d}" for r, d in differences.items())
        raise AgreedError(
            f"rank(s) {sorted(differences)} were started with a different configuration or dpvit "
            f"version than rank 0 ({detail}); start every rank with the same flags, config file "
            "and dpvit install")
