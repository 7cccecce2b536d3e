"""User-facing errors.

Anything raised as :class:`AiflatError` (or a subclass) is a problem with the
user's input, files or environment, not a bug: the command line prints its
message as one line on stderr and exits with status 2, without a traceback.
"""


class AiflatError(Exception):
    """A user-facing error with a one-line message."""


class InputError(AiflatError):
    """An input file is missing, unreadable, malformed or of the wrong shape."""


class OutputError(AiflatError):
    """An output location cannot be written."""


class WeightsError(AiflatError):
    """Model weights are missing, corrupted or of an unknown kind."""


class BackendError(AiflatError):
    """A backend is unknown or its optional dependency is not installed."""
