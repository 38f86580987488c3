"""What every command shares: process set-up, logging with a `[rank r/N]` prefix, and errors.

`run_main` wraps every command: it picks the communicator, sets BLAS threads, configures
logging, and turns an exception on any rank into one clear message followed by `MPI_Abort`,
so that the other ranks never hang in a collective (what `python -m mpi4py` does, but built in
because users type `mpirun -n 4 python -m dpvit.train`).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable

from dpvit.errors import AgreedError, ConfigError, UserError
from dpvit.parallel.allocator import keep_freed_memory
from dpvit.parallel.comm import Comm, init_comm
from dpvit.parallel.threads import configure_threads

logger = logging.getLogger(__name__)


class CliParser(argparse.ArgumentParser):
    """argparse that raises ConfigError (one clear line) instead of printing usage and exiting."""

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



def run_main(main: Callable[[Comm], int | None], argv: list[str] | None = None,
             single_process: bool = False) -> int:
    """Run a command's `main(comm)` with dpvit's process setup and failure handling.

    Sets up the communicator (`init_comm`), BLAS threads, logging and the allocator
    (`keep_freed_memory`), then calls `main`.
    An uncaught exception on any rank is reported once, by that rank: a `UserError` as its
    one-line message, anything else as its type and message (with the traceback under
    `--debug` / `DPVIT_DEBUG=1`). With more than one rank the job is then aborted with
    `MPI_Abort`, so ranks waiting in a collective end too instead of hanging. An
    `AgreedError`, raised on every rank together, is reported by rank 0 only and every rank
    returns its exit code without aborting.
    KeyboardInterrupt exits with 130, a non-zero `SystemExit` with its code.

    Args:
        main: The command body; returns an exit status (None means 0).
        argv: Command-line arguments used to detect `--debug` (default `sys.argv[1:]`).
        single_process: Give every process a world of one even under a launcher (the
            training debug mode, where only launcher rank 0 does anything).

    Returns:
        The exit status, for `sys.exit`. With more than one rank a failure never returns.
    """
    debug = debug_requested(argv)
    comm = init_comm(force_local=single_process)
    setup_logging(comm, debug=debug)
    try:
        if not help_requested(argv):  # the usage text alone, without the thread log line
            configure_threads(comm)
        keep_freed_memory()
        code = main(comm)
        return 0 if code is None else int(code)
    except KeyboardInterrupt:
        logger.error("interrupted")
        code = 130
    except SystemExit as exc:
        if exc.code is None or exc.code == 0:
            return 0
        if not isinstance(exc.code, int):
            logger.error("%s", exc.code)
        code = exc.code if isinstance(exc.code, int) else 1
    except AgreedError as exc:  # every rank is here together: report once, exit normally
        if comm.is_root:
            logger.log(exc.level, "%s", exc)
        return exc.exit_code
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
    if comm.size > 1:
        comm.abort(code)
    return code
