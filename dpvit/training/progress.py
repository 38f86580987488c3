"""What rank 0 shows while it trains: a live tqdm bar when someone watches a terminal, plain
log lines with percentage and ETA otherwise.

``--progress`` chooses (`choose_mode`):

- ``auto`` (the default): the bar when rank 0's stderr is a terminal, or when MPICH's
  ``mpirun`` started rank 0 on this host and ``mpirun``'s own stderr is a terminal
  (`bar_terminal`); plain lines otherwise (a pipe, a file, a batch job, rank 0 on another
  host).
- ``bar``: the bar on stderr whatever stderr is (redrawn with carriage returns).
- ``plain``: a log line every ``--log-every`` steps, ``epoch 1 step 400/7496 (5%): loss
  0.4321, lr 3.90e-03, 612 images/s, ETA 11:23``, with no control characters.
  ``--no-progress`` means the same.
- ``none``: neither; the epoch summaries are still logged.

Why not ``/dev/tty``: Hydra's proxy starts every rank in a session of its own, so a rank has
no controlling terminal and opening ``/dev/tty`` fails (ENXIO) even when ``mpirun`` was typed
in a terminal. Rank 0's stderr is a pipe to the proxy, which forwards the bytes as they come
(carriage returns and partial lines included) to ``mpirun``, which writes them to its own
stderr. So rank 0 looks at its parents in ``/proc`` (rank -> ``hydra_pmi_proxy`` ->
``mpirun``): when ``mpirun``'s stderr is a terminal, a bar written to rank 0's own stderr is
drawn on it, in order with rank 0's log lines (one stream), and the bar's width is read from
that terminal at each redraw.

While the bar is open, console log records go through ``tqdm.write`` (tqdm's
``logging_redirect_tqdm``, keeping the ``[rank r/N]`` formatter), which lifts the bar, prints
the record on a line of its own and redraws the bar below it.
"""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Any, TextIO

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from dpvit.terminal import Terminal, TerminalTqdm, bar_terminal

#: The values of ``--progress``.
MODES = ("auto", "bar", "plain", "none")

def choose_mode(progress: str, no_progress: bool, is_root: bool,
                stream: TextIO | None = None) -> str:
    """``"bar"``, ``"plain"`` or ``"none"`` for this rank: other ranks show nothing,
    ``--no-progress`` is ``plain``, ``auto`` is ``bar`` when a terminal shows ``stream``."""
    if progress not in MODES:
        raise ValueError(f"progress must be one of {', '.join(MODES)}, got {progress!r}")
    if not is_root:
        return "none"
    if no_progress:
        return "plain"
    if progress != "auto":
        return progress
    terminal = bar_terminal(stream)
    if terminal is None:
        return "plain"
    terminal.close()
    return "bar"


def format_eta(seconds: float | None) -> str:
    """``11:23``, ``1:02:03``, or ``?`` while unknown (tqdm's format)."""
    return "?" if seconds is None else tqdm.format_interval(seconds)


class TrainingBar(TerminalTqdm):
    """``epoch 1  35%|███▌      | 140/400, loss 0.4321, lr 1.20e-03, 2345 images/s, ETA 01:05``;
    the images/s and ETA are tqdm's smoothed rate (time outside training excluded by
    ``unpause``)."""

    FORMAT = ("epoch {epoch} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt}, loss {loss}, "
              "lr {lr}, {images_per_s} images/s, ETA {remaining}")

    def __init__(self, *args: Any, batch_size: int = 1, **kwargs: Any) -> None:
        self.batch_size = batch_size
        self.fields = {"epoch": 0, "loss": "?", "lr": "?"}
        super().__init__(*args, bar_format=self.FORMAT, **kwargs)

    @property
    def format_dict(self) -> dict[str, Any]:
        values = super().format_dict
        rate = values.get("rate")
        if rate is None and values["elapsed"]:
            rate = (values["n"] - values["initial"]) / values["elapsed"]
        return {**values, **self.fields,
                "images_per_s": f"{rate * self.batch_size:.0f}" if rate else "?"}


class StepClock:
    """Seconds per training step since training (re)started, for the plain lines' ETA; time
    between `resume` and the step before it (an evaluation) is not counted."""

    def __init__(self, step: int) -> None:
        self.first = self.step = step
        self.seconds = 0.0
        self.last = time.perf_counter()

    def tick(self, step: int) -> None:
        now = time.perf_counter()
        self.seconds += now - self.last
        self.last, self.step = now, step

    def resume(self) -> None:
        self.last = time.perf_counter()

    def eta(self, total: int) -> float | None:
        done = self.step - self.first
        return None if done <= 0 else max(total - self.step, 0) * self.seconds / done


class TrainingProgress:
    """Rank 0's display of a training run: `TrainingBar` (``mode="bar"``), plain lines
    (`line`, logged by the trainer when `plain` is true), or nothing (``"none"``).

    Args:
        mode: ``"bar"``, ``"plain"`` or ``"none"`` (`choose_mode`).
        total: the step the run stops at.
        initial: the step it starts from (a resumed run).
        batch_size: images per step (global), for images/s.
        stream: where the bar is drawn (default stderr).
        min_interval: least seconds between redraws.
    """

    def __init__(self, mode: str, total: int, initial: int = 0, batch_size: int = 1,
                 stream: TextIO | None = None, min_interval: float = 0.1) -> None:
        self.mode, self.total = mode, total
        self.clock = StepClock(initial)
        self.bar: TrainingBar | None = None
        self._exit = contextlib.ExitStack()
        if mode == "bar":
            stream = sys.stderr if stream is None else stream
            terminal = bar_terminal(stream) or Terminal(None)
            self._exit.callback(terminal.close)
            self.bar = TrainingBar(total=total, initial=initial, file=stream,
                                   mininterval=min_interval, terminal=terminal,
                                   batch_size=batch_size, leave=True)
            self._exit.callback(self.bar.close)
            self._exit.enter_context(logging_redirect_tqdm(tqdm_class=TrainingBar))

    @property
    def plain(self) -> bool:
        """True when the trainer should log the per-step lines."""
        return self.mode == "plain"

    def update(self, step: int, epoch: int, loss: float, lr: float) -> None:
        """Training reached ``step`` in ``epoch`` (the epoch in progress, counted from 1, as
        the evaluation lines count); redraw the bar (at most every ``min_interval``)."""
        self.clock.tick(step)
        if self.bar is not None:
            self.bar.fields.update(epoch=epoch, loss=f"{loss:.4f}", lr=f"{lr:.2e}")
            self.bar.update(step - self.bar.n)

    def line(self, step: int, epoch: int, loss: float, lr: float, images_per_s: float) -> str:
        """``epoch 1 step 400/7496 (5%): loss 0.4321, lr 3.90e-03, 612 images/s, ETA 11:23``."""
        percent = 100 * step / max(self.total, 1)
        return (f"epoch {epoch} step {step}/{self.total} ({percent:.0f}%): loss {loss:.4f}, "
                f"lr {lr:.2e}, {images_per_s:.0f} images/s, "
                f"ETA {format_eta(self.clock.eta(self.total))}")

    def resume(self) -> None:
        """Training resumes after an evaluation: that time is not training time (the rate and
        ETA would otherwise drop after every epoch)."""
        self.clock.resume()
        if self.bar is not None:
            self.bar.unpause()

    def close(self) -> None:
        """Draw the bar a last time and leave it; log records go to stderr directly again."""
        self._exit.close()
