"""Exception base class for problems the user can fix.

Entry points (`dpvit.cli.run_main`) print a `UserError` as its one-line message, without a
traceback, and exit non-zero; any other exception is treated as a bug. Subclass `UserError`
for bad input: a missing or damaged file, an invalid flag, a config that contradicts a
checkpoint. The message should be one sentence naming the file or setting (a setting as its
flag is typed, `--batch-size`), what was expected and what was found.

Under `mpirun` a `UserError` raised on some ranks only ends the job with `MPI_Abort`, as the
other ranks may be waiting for them; an `AgreedError`, raised on every rank together, ends it
with one line from rank 0 and no abort. `dpvit.cli.agree` turns a step's `UserError` into an
`AgreedError`; `run_main` does so for each command's argument parsing and validation.
"""

import logging


class UserError(Exception):
    """An error caused by input the user controls; reported as one line, no traceback."""


class ConfigError(UserError, ValueError):
    """An unknown flag or key, a value of the wrong type, or an impossible model shape."""


class InputError(UserError, ValueError):
    """Input data of the wrong shape or kind, e.g. images the model was not built for."""


class AgreedError(UserError):
    """A stop that every rank reaches at the same point, with the same message.

    Raised where the ranks have agreed through a collective (a stop signal, non-finite values,
    a start-up check whose outcome rank 0 broadcast, a step wrapped in `dpvit.cli.agree` such
    as argument parsing and validation). `run_main` reports it once, on rank 0, and every
    rank returns `exit_code` normally: no `MPI_Abort`, no duplicate lines. Raising it on only
    some ranks would leave the others waiting, so use `UserError` for anything a single rank
    detects, or wrap the step in `agree`. Identical inputs are not enough without a
    collective: ranks may have been started with different flags or files.

    Args:
        message: one sentence for the user.
        exit_code: the job's exit status.
        level: the logging level of the report (WARNING for a requested stop).
    """

    def __init__(self, message: str, exit_code: int = 1, level: int = logging.ERROR) -> None:
        super().__init__(message)
        self.exit_code, self.level = exit_code, level
