"""A deadline on every collective, so that a job whose rank stopped, hung or lost its network
ends with one clear line instead of waiting forever (`--collective-timeout`, like the NCCL
timeout of PyTorch DDP).

Each rank of a multi-rank job runs one watchdog thread. Before a collective the communicator
records what it is about to do (`CollectiveDeadline.enter`), and clears it after (`leave`):
two attribute writes, so a healthy step pays nothing measurable. The thread wakes a few times
a second; when the collective it sees has been pending longer than the timeout, it asks every
other rank, point to point on a communicator of its own, where that rank is, waits a moment
for the answers, and ends the process. The ranks that answer are alive (and say which
collective they wait in); a rank that does not answer is stopped, hung outside Python's reach,
or cut off. The lowest-numbered rank among those still waiting prints the one line; every
waiting rank then exits with status 1, and the launcher (Hydra) kills whatever is left of the
job on every host, stopped processes included. When a rank did not answer and mpirun runs on
the reporting rank's host, mpirun is also interrupted a few seconds later, in case it is
waiting for a host it cannot reach any more (`interrupt_mpirun_later`).

The watchdog answers the other ranks' questions on every wake-up, so a rank that is alive but
busy elsewhere (e.g. stuck writing to a file) still answers, and the line says where it is.
This needs MPI_THREAD_MULTIPLE (what mpi4py asks for by default): with a lower thread level
the line names no ranks.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import threading
import time
from typing import Any

from dpvit.parallel.comm import flush_stdio
from dpvit.parallel.launcher import local_mpirun_pid

logger = logging.getLogger(__name__)

#: Default seconds a rank may wait in one collective (the training flag's default too).
DEFAULT_TIMEOUT_S = 600.0

#: How long the timed-out rank waits for the other ranks' answers.
ANSWER_WAIT_S = 2.0

#: Seconds a waiting rank that does not print lingers before it exits, so that the launcher
#: forwards the printing rank's line before it tears the job down.
LINGER_S = 1.0

#: Seconds after the timeout line before a local mpirun that is still waiting is interrupted
#: (`interrupt_mpirun_later`): time for Hydra's own clean-up of every host it can reach.
MPIRUN_GRACE_S = 3.0

_ASK, _ANSWER = 31, 32  # message tags on the watchdog's own communicator


class CollectiveDeadline:
    """The watchdog of one rank.

    Args:
        side_comm: an mpi4py communicator of the same group, used only by this watchdog (a
            duplicate of the job's, so its messages never match the job's own).
        rank: this process's rank.
        timeout: seconds one collective may wait; 0 or less disables the watchdog.
        can_ask: whether the watchdog may call MPI from its thread (MPI_THREAD_MULTIPLE).
    """

    def __init__(self, side_comm: Any, rank: int, timeout: float, can_ask: bool) -> None:
        self._side, self.rank, self.can_ask = side_comm, rank, can_ask
        self.timeout = 0.0
        self.context = "start-up"  # what the job is doing, e.g. "step 14"; set by the trainer
        self._pending: tuple[str, float] | None = None
        self._thread: threading.Thread | None = None
        self.set_timeout(timeout)

    def set_timeout(self, seconds: float) -> None:
        """Change the deadline (0 or less: wait forever); starts the thread when first needed."""
        self.timeout = float(seconds)
        if self.timeout > 0 and self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="dpvit-deadline",
                                            daemon=True)
            self._thread.start()

    def enter(self, what: str) -> None:
        """This rank starts waiting in the collective ``what``."""
        self._pending = (what, time.monotonic())

    def leave(self) -> None:
        """The collective completed."""
        self._pending = None

    @contextlib.contextmanager
    def suspended(self) -> Any:
        """No deadline inside the block (e.g. while rank 0 downloads a dataset)."""
        saved, self.timeout = self.timeout, 0.0
        try:
            yield
        finally:
            self.timeout = saved

    def _where(self) -> tuple[int, str | None, str]:
        pending = self._pending
        return self.rank, None if pending is None else pending[0], self.context

    def _answer_questions(self) -> None:
        """Tell every rank that asked where this rank is (non-blocking)."""
        while self._side.iprobe(tag=_ASK):
            status_source = self._side.recv(tag=_ASK)
            self._side.send(self._where(), dest=status_source, tag=_ANSWER)

    def _watch(self) -> None:
        while True:
            poll = min(0.25, self.timeout / 4) if self.timeout > 0 else 0.25
            time.sleep(poll)
            try:
                if self.can_ask:
                    self._answer_questions()
                pending = self._pending
                if (pending is not None and self.timeout > 0
                        and time.monotonic() - pending[1] > self.timeout):
                    self._expire(*pending)
            except Exception:
                logger.debug("collective watchdog error", exc_info=True)

    def _ask_everyone(self) -> dict[int, tuple[int, str | None, str]]:
        """Ask every other rank where it is; return the answers that came within the wait."""
        size = self._side.Get_size()
        others = [r for r in range(size) if r != self.rank]
        for r in others:
            self._side.isend(self.rank, dest=r, tag=_ASK)
        requests = {r: self._side.irecv(source=r, tag=_ANSWER) for r in others}
        answers: dict[int, tuple[int, str | None, str]] = {}
        end = time.monotonic() + ANSWER_WAIT_S
        while time.monotonic() < end and len(answers) < len(requests):
            self._answer_questions()  # the others may be asking us at the same moment
            for r, request in requests.items():
                if r not in answers:
                    done, value = request.test()
                    if done:
                        answers[r] = value
            time.sleep(0.02)
        return answers

    def _expire(self, what: str, since: float) -> None:
        waited = time.monotonic() - since
        answers = self._ask_everyone() if self.can_ask else None
        if answers and any(r < self.rank and pending is not None
                           for r, (_, pending, _) in answers.items()):
            time.sleep(LINGER_S)  # a lower rank that waits too prints the line
            os._exit(1)
        size = self._side.Get_size()
        logger.error("%s; stopping the job", timeout_message(
            self.rank, size, what, self.context, waited, self.timeout, answers))
        flush_stdio()
        if answers is None or len(answers) < size - 1:
            interrupt_mpirun_later()
        os._exit(1)


def interrupt_mpirun_later(delay_s: float = MPIRUN_GRACE_S) -> None:
    """If Hydra's mpirun runs on this host, send it SIGINT (as Ctrl-C would) ``delay_s`` from
    now, from a detached shell that outlives this process.

    When a rank exits with an error, mpirun ends the job: it kills the ranks on every host
    through their proxies and returns. A host whose network is gone never answers, and
    mpirun waits for that proxy's connection forever (TCP cannot tell a silent peer from a
    slow one); an interrupt makes it give up at once. A job that ends normally is gone before
    the delay, and the signal finds nobody.
    """
    mpirun = local_mpirun_pid()
    if mpirun is None:
        return
    with contextlib.suppress(OSError):
        subprocess.Popen(["sh", "-c", f"sleep {delay_s:g}; kill -INT {mpirun} 2>/dev/null"],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)


def timeout_message(rank: int, size: int, what: str, context: str, waited: float,
                    timeout: float, answers: dict[int, tuple[int, str | None, str]] | None
                    ) -> str:
    """The one line a timed-out rank prints.

    Args:
        rank, size: the printing rank and the job's size.
        what, context: the collective it waited in and what the job was doing.
        waited, timeout: seconds waited and the limit.
        answers: rank -> (rank, pending collective or None, context) of every rank that
            answered; None when the watchdog could not ask (MPI thread level too low).
    """
    head = (f"rank {rank} waited {waited:.0f} s in {what} during {context} "
            f"(--collective-timeout {timeout:g})")
    if answers is None:
        return f"{head}; MPI's thread level does not let dpvit ask which ranks are missing"
    silent = [r for r in range(size) if r != rank and r not in answers]
    busy = [f"rank {r} in {ctx}" for r, (_, pending, ctx) in sorted(answers.items())
            if pending is None]
    waiting = sorted(r for r, (_, pending, _) in answers.items() if pending is not None)
    parts = []
    if silent:
        parts.append(f"rank(s) {silent} did not answer (stopped, hung or unreachable)")
    if busy:
        parts.append("still busy outside collectives: " + ", ".join(busy))
    if waiting:
        parts.append(f"rank(s) {waiting} were waiting too")
    return "; ".join([head, *parts]) if parts else f"{head}; every rank answered"
