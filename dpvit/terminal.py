"""Which terminal a rank's progress bar lands on, and a tqdm bar as wide as that terminal.

Shared by the training progress (`dpvit.training.progress`) and the dataset download
(`dpvit.data.download`). Under ``mpirun``, rank 0's stderr is a pipe that Hydra's proxy
forwards to ``mpirun``'s stderr, so the terminal to measure is ``mpirun``'s
(`mpirun_terminal`); why ``/dev/tty`` does not work is told in `dpvit.training.progress`.
"""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path
from typing import Any, TextIO

from tqdm import tqdm

from dpvit.parallel.launcher import local_mpirun_pid


def _is_pipe(stream: TextIO) -> bool:
    try:
        mode = os.fstat(stream.fileno()).st_mode
    except (AttributeError, OSError, ValueError):  # not a real file (a test's StringIO)
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


def mpirun_terminal(stream: TextIO | None = None, proc: Path = Path("/proc")) -> int | None:
    """A descriptor open (read-only) on the terminal that ``mpirun``'s stderr is, when this
    process is a rank that Hydra's proxy started on ``mpirun``'s host and ``stream`` (default
    stderr) is the pipe the proxy forwards there; None otherwise. The caller closes it."""
    stream = sys.stderr if stream is None else stream
    if not _is_pipe(stream):
        return None
    launcher = local_mpirun_pid(proc)
    if launcher is None:
        return None
    try:
        fd = os.open(proc / str(launcher) / "fd" / "2", os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError:  # another user's mpirun, or it just ended
        return None
    if os.isatty(fd):
        return fd
    os.close(fd)
    return None


class Terminal:
    """The terminal a bar is drawn on, for its width (read at each redraw: the window may be
    resized). ``fd`` None: unknown width (tqdm's default)."""

    def __init__(self, fd: int | None, owned: bool = False) -> None:
        self.fd, self.owned = fd, owned

    def columns(self) -> int | None:
        """The width a bar may use: one less than the terminal's (as tqdm leaves it), so that
        it never wraps."""
        if self.fd is None:
            return None
        try:
            return os.get_terminal_size(self.fd).columns - 1
        except (OSError, ValueError):
            return None

    def close(self) -> None:
        if self.owned and self.fd is not None:
            os.close(self.fd)
            self.fd = None


def bar_terminal(stream: TextIO | None = None) -> Terminal | None:
    """The terminal that shows what is written to ``stream`` (default stderr): the stream
    itself when it is a terminal, else ``mpirun``'s terminal (`mpirun_terminal`); None when
    no terminal shows it. Close the result."""
    stream = sys.stderr if stream is None else stream
    if stream.isatty():
        try:
            return Terminal(stream.fileno())
        except (AttributeError, OSError, ValueError):
            return Terminal(None)
    fd = mpirun_terminal(stream)
    return None if fd is None else Terminal(fd, owned=True)


class TerminalTqdm(tqdm):
    """tqdm whose width follows a `Terminal` (which may not be the stream it writes to); no
    monitor thread (it could redraw while the training thread logs)."""

    monitor_interval = 0

    def __init__(self, *args: Any, terminal: Terminal | None = None, **kwargs: Any) -> None:
        self.terminal = terminal
        super().__init__(*args, **kwargs)

    @property
    def format_dict(self) -> dict[str, Any]:
        values = super().format_dict
        columns = self.terminal.columns() if getattr(self, "terminal", None) else None
        if columns:
            values["ncols"] = columns
        return values
