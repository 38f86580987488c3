"""Exception base class for problems the user can fix.

Entry points (`dpvit.dist.run_main`) print a `UserError` as its one-line message, without a
traceback, and exit non-zero; any other exception is treated as a bug. Subclass `UserError`
for bad input: a missing or damaged file, an invalid flag, a config that contradicts a
checkpoint. The message should be one sentence naming the file or setting, what was expected
and what was found.
"""


class UserError(Exception):
    """An error caused by input the user controls; reported as one line, no traceback."""


class ConfigError(UserError, ValueError):
    """An unknown flag or key, a value of the wrong type, or an impossible model shape."""


class InputError(UserError, ValueError):
    """Input data of the wrong shape or kind, e.g. images the model was not built for."""
