"""A one-line training progress bar for a terminal (what tqdm shows, without the dependency).

Rank 0 draws it on stderr, only when stderr is a terminal and ``--no-progress`` is not given
(``progress_wanted``); otherwise the trainer logs plain lines. The line is redrawn in place
(carriage return, erase line) at most every ``min_interval`` seconds. While it is open, a
filter on the root logger's handlers wipes it before any log record is printed, so log lines
(an evaluation, a checkpoint, a warning) never mix with it; the next update redraws it.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import TextIO


def progress_wanted(no_progress: bool, is_root: bool, stream: TextIO | None = None) -> bool:
    """True when a bar should be drawn: rank 0, a terminal, and not ``--no-progress``."""
    stream = sys.stderr if stream is None else stream
    return is_root and not no_progress and stream.isatty()


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class ProgressBar:
    """``epoch 2 [#####-----] 120/400 30% | loss 0.43 | lr 1.2e-03 | 2345 img/s | ETA 1:05``.

    Args:
        total: the step the run stops at.
        stream: where to draw (default stderr).
        min_interval: least seconds between redraws.
        width: characters of the bar itself.
    """

    def __init__(self, total: int, stream: TextIO | None = None, min_interval: float = 0.1,
                 width: int = 24) -> None:
        self.total, self.width, self.min_interval = total, width, min_interval
        self.stream = sys.stderr if stream is None else stream
        self.rate = None  # smoothed images per second
        self._last_time = time.perf_counter()
        self._last_draw = 0.0
        self._drawn = False
        self._handlers = list(logging.getLogger().handlers)
        for handler in self._handlers:
            handler.addFilter(self._before_log)

    def _before_log(self, record: logging.LogRecord) -> bool:
        self.clear()
        return True

    def update(self, step: int, epoch: int, loss: float, lr: float, images: int) -> None:
        """Record that ``images`` more images were trained on, reaching ``step``; redraw."""
        now = time.perf_counter()
        elapsed, self._last_time = now - self._last_time, now
        if elapsed > 0:
            current = images / elapsed
            self.rate = current if self.rate is None else 0.9 * self.rate + 0.1 * current
        if now - self._last_draw < self.min_interval and step < self.total:
            return
        self._last_draw = now
        done = min(step / max(self.total, 1), 1.0)
        filled = round(done * self.width)
        line = (f"epoch {epoch} [{'#' * filled}{'-' * (self.width - filled)}] "
                f"{step}/{self.total} {100 * done:3.0f}% | loss {loss:.4f} | lr {lr:.2e}")
        if self.rate:
            images_per_step = images if images else 1
            eta = (self.total - step) * images_per_step / self.rate
            line += f" | {self.rate:.0f} img/s | ETA {_clock(eta)}"
        self.stream.write("\r\x1b[K" + line)
        self.stream.flush()
        self._drawn = True

    def clear(self) -> None:
        """Erase the bar (before a log line); the next update draws it again."""
        if self._drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._drawn = False

    def pause(self) -> None:
        """Restart the rate clock, so that time spent outside training (evaluation) is not
        counted as training time."""
        self._last_time = time.perf_counter()

    def close(self) -> None:
        """Erase the bar and stop watching the log handlers."""
        self.clear()
        for handler in self._handlers:
            handler.removeFilter(self._before_log)
