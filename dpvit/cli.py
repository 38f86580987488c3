"""What every command shares: process set-up, logging with a `[rank r/N]` prefix, and errors.

`run_main` wraps every command: it picks the communicator, sets BLAS threads, configures
logging, and turns an exception on any rank into one clear message followed by `MPI_Abort`,
so that the other ranks never hang in a collective (what `python -m mpi4py` does, but built in
because users type `mpirun -n 4 python -m dpvit.train`). A mistake that every rank makes alike,
such as a bad flag, is agreed on first (`agree`) and reported once by rank 0, without an abort.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from dpvit.errors import AgreedError, ConfigError, UserError
from dpvit.parallel.allocator import keep_freed_memory
from dpvit.parallel.comm import Comm, init_comm
from dpvit.parallel.threads import SPARE_RANKS_ENV, configure_threads

logger = logging.getLogger(__name__)

T = TypeVar("T")


class CliParser(argparse.ArgumentParser):
    """argparse that raises ConfigError (one clear line) instead of printing usage and exiting.

    Abbreviated flags are refused: ``--resum auto`` must not pass for ``--resume auto``.
    """

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        raise ConfigError(f"{message} (see --help)")


class _RankFormatter(logging.Formatter):
    """Prefixes `[rank r/N]`, and the level name for warnings and errors."""

    def __init__(self, rank: int, size: int) -> None:
        super().__init__("%(message)s")
        self._prefix = f"[rank {rank}/{size}]"

    def format(self, record: logging.LogRecord) -> str:
        level = "" if record.levelno < logging.WARNING else f"{record.levelname.lower()}: "
        when = self.formatTime(record, "%H:%M:%S")
        return f"{when} {self._prefix} {level}{super().format(record)}"


def setup_logging(comm: Comm, debug: bool = False) -> None:
    """Send log records to stderr: rank 0 at INFO (dpvit's own at DEBUG with `debug`, so
    libraries such as matplotlib stay quiet), others at WARNING."""
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h.formatter, _RankFormatter)]:
        root.removeHandler(old)  # calling twice (tests, several commands) keeps one handler
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_RankFormatter(comm.rank, comm.size))
    root.addHandler(handler)
    root.setLevel(logging.INFO if comm.is_root else logging.WARNING)
    logging.getLogger("dpvit").setLevel(logging.DEBUG if debug and comm.is_root else logging.NOTSET)


def debug_requested(argv: list[str] | None = None) -> bool:
    """True when `--debug` is on the command line or `DPVIT_DEBUG=1` is set."""
    args = sys.argv[1:] if argv is None else argv
    return "--debug" in args or os.environ.get("DPVIT_DEBUG", "") not in ("", "0")


def help_requested(argv: list[str] | None = None) -> bool:
    """True when the command line asks for the usage text (`-h` / `--help`), which is then
    all a command prints."""
    args = sys.argv[1:] if argv is None else argv
    return "-h" in args or "--help" in args


def agree(comm: Comm, step: Callable[..., T], *args: Any, root_only: bool = False) -> T | None:
    """Run `step(*args)` on every rank (or on rank 0 alone), then make a failure every rank's.

    Every rank must call `agree` at the same point. The ranks then exchange the outcome (one
    `allgather` of None or a message; with `root_only`, one broadcast from rank 0), and if
    `step` raised a `UserError` anywhere, every rank raises the same `AgreedError`:
    `run_main` prints it once, from rank 0, and every rank exits 1 without `MPI_Abort`. The
    message is the lowest failing rank's; when only some ranks failed, or they failed
    differently, it names the failing ranks (e.g. a flag only one rank was started with). Any
    other exception propagates at once and aborts the job as usual.

    Args:
        comm: The job's communicator.
        step: What to run, e.g. argument parsing, or reading a file on rank 0.
        args: Its arguments.
        root_only: Run `step` on rank 0 only (reading one file for everyone); the other
            ranks get None.

    Returns:
        What `step` returned on this rank (None where it did not run).

    Raises:
        AgreedError: on every rank, when `step` raised a `UserError`.
    """
    result, error = None, None
    if comm.is_root or not root_only:
        try:
            result = step(*args)
        except AgreedError:
            raise  # already raised on every rank together
        except UserError as exc:
            error = str(exc)
    if root_only:
        error = comm.broadcast_object(error)
        if error is not None:
            raise AgreedError(error)
        return result
    errors = comm.allgather_object(error)
    failed = [rank for rank, message in enumerate(errors) if message is not None]
    if not failed:
        return result
    message = errors[failed[0]]
    if len(failed) < comm.size or any(errors[rank] != message for rank in failed):
        message = f"{message} (on rank(s) {failed} of {comm.size})"
    raise AgreedError(message) from None


def run_main(main: Callable[[Comm], int | None], argv: list[str] | None = None,
             single_process: bool = False,
             parse_args: Callable[[list[str] | None], object] | None = None,
             announce_threads: bool = False, spare_ranks: bool = False) -> int:
    """Run a command's `main(comm)` with dpvit's process setup and failure handling.

    Sets up the communicator (`init_comm`), logging and the allocator (`keep_freed_memory`),
    checks the command line with `parse_args` on every rank (`agree`), sets the BLAS threads
    (`configure_threads`), then calls `main`.

    Every rank ends after an error, in one of two ways:

    - Agreed errors exit 1 on every rank, reported by rank 0 alone, without `MPI_Abort`:
      a `UserError` from `parse_args` (unknown flags, bad values, config files and
      `ConfigError` from validation: every rank parses the same command line, and `agree`
      makes it so even when they differ), and an `AgreedError` from `main` (a stop the ranks
      agreed on through a collective, or a start-up check that rank 0 made and broadcast,
      such as a missing checkpoint for `--resume must`). An `AgreedError` carries its own
      exit status.
    - Anything else may be raised on some ranks only, while the others wait in a collective:
      it is reported by the rank that raised it, a `UserError` as its one-line message,
      anything else as its type and message (with the traceback under `--debug` /
      `DPVIT_DEBUG=1`), and with more than one rank the job is then ended with `MPI_Abort`.
      A `ConfigError` raised inside `main` is such an error: use `agree` around a step that
      every rank takes alike to report its errors once.

    KeyboardInterrupt exits with 130, a non-zero `SystemExit` with its code.

    Args:
        main: The command body; returns an exit status (None means 0).
        argv: Command-line arguments used to detect `--debug` and `--help` and given to
            `parse_args` (default `sys.argv[1:]`).
        single_process: Give every process a world of one even under a launcher (the
            training debug mode, where only launcher rank 0 does anything).
        parse_args: The command's argument parsing and validation, `parse_args(argv)`; its
            result is discarded (`main` parses again: milliseconds) and its `UserError` is
            agreed, so that a bad flag is one line from rank 0 before anything else is said.
        announce_threads: Log the threads chosen per rank at INFO on rank 0, after the
            arguments are checked (training and bench, where the thread count matters);
            otherwise the line is at DEBUG.
        spare_ranks: Let the ranks of a host beyond its cores sit out (training): `main`
            then gets a communicator of the computing ranks alone, and the spare ranks wait
            asleep for its end (`dpvit.parallel.threads.computes_steps`).

    Returns:
        The exit status, for `sys.exit`. With more than one rank a failure that is not
        agreed never returns.
    """
    debug = debug_requested(argv)
    world = comm = init_comm(force_local=single_process)
    setup_logging(comm, debug=debug)
    try:
        keep_freed_memory()
        if parse_args is not None:
            agree(comm, parse_args, argv)
        announce = announce_threads and not help_requested(argv)  # usage text alone
        if spare_ranks and not help_requested(argv):
            computing = world.computing_ranks()
            if computing is None:
                return wait_as_spare_rank(world)
            if computing is not world:
                comm = computing
                announce_spare_ranks(world, comm)
                setup_logging(comm, debug=debug)
        configure_threads(comm, level=logging.INFO if announce else logging.DEBUG)
        code = main(comm)
        return world.join_spare_ranks(0 if code is None else int(code))
    except KeyboardInterrupt:
        logger.error("interrupted")
        code = 130
    except SystemExit as exc:
        if exc.code is None or exc.code == 0:
            return world.join_spare_ranks(0)
        if not isinstance(exc.code, int):
            logger.error("%s", exc.code)
        code = exc.code if isinstance(exc.code, int) else 1
    except AgreedError as exc:  # every rank is here together: report once, exit normally
        if comm.is_root:
            logger.log(exc.level, "%s", exc)
        return world.join_spare_ranks(exc.exit_code)
    except UserError as exc:
        if debug:
            logger.exception("%s", exc)
        else:
            logger.error("%s", exc)
        code = 1
    except BaseException as exc:
        if debug:
            logger.exception("unexpected %s: %s", type(exc).__name__, exc)
        else:
            logger.error(
                "unexpected %s: %s (run with --debug or DPVIT_DEBUG=1 for the traceback)",
                type(exc).__name__,
                exc,
            )
        code = 1
    if world.size > 1:
        world.abort(code)
    return code


def wait_as_spare_rank(world: Comm) -> int:
    """A spare rank's whole run: wait, asleep, for the computing ranks to end; their exit code.

    SIGINT and SIGTERM are ignored meanwhile: mpirun forwards them to every rank, and the
    computing ranks turn them into a checkpoint and a clean stop, which a spare rank ending
    first would cut short (the launcher ends the job when one rank dies)."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    return world.join_spare_ranks(0)


def announce_spare_ranks(world: Comm, computing: Comm) -> None:
    """Rank 0 says which ranks compute, and why (before the logging of the computing ranks)."""
    if world.is_root:
        logger.info("%d of %d ranks compute: a host has more ranks than cores, and the ranks "
                    "beyond its cores would only take turns on them; the %d spare rank(s) "
                    "wait asleep until the end (%s=compute makes every rank compute)",
                    computing.size, world.size, world.spare_ranks, SPARE_RANKS_ENV)
