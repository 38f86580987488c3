"""Exception base class for problems the user can fix.

Entry points (`dpvit.cli.run_main`) print a `UserError` as its one-line message, without a
traceback, and exit non-zero; any other exception is treated as a bug. Subclass `UserError`
for bad input: a missing or damaged file, an invalid flag, a config that contradicts a
checkpoint. The message should be one sentence naming the file or setting, what was expected
and what was found.
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
    a start-up check whose outcome rank 0 broadcast) or act on identical state. `run_main`
    reports it once, on rank 0, and every rank returns `exit_code` normally: no `MPI_Abort`,
    no duplicate lines. Raising it on only some ranks would leave the others waiting, so use
    `UserError` for anything a single rank detects.

    Args:
        message: one sentence for the user.
        exit_code: the job's exit status.
        level: the logging level of the report (WARNING for a requested stop).
    """

    def __init__(self, message: str, exit_code: int = 1, level: int = logging.ERROR) -> None:
        super().__init__(message)
        self.exit_code, self.level = exit_code, level
