"""The one error type for mistakes a user can make and fix."""

from __future__ import annotations

__all__ = ["BMRSError"]


class BMRSError(ValueError):
    """Bad input from the user: an unknown name, an argument out of range, a file that is
    not what bmrs expects. A ``ValueError``, so code that catches those keeps working.

    The ``bmrs`` command prints it as one line ``bmrs: error: ...`` with exit status 2;
    any other exception is a defect and shows its traceback.
    """


class Interrupted(Exception):
    """A signal (SIGTERM, SIGINT, ...) stopped a command that had processes of its own to
    stop first (``bmrs train --nproc``). The ``bmrs`` command prints its message as one line
    ``bmrs: ...`` and exits with status 128 + the signal's number, as a shell reports a
    process killed by that signal (130 for Ctrl-C, 143 for SIGTERM).
    """

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = int(signum)
