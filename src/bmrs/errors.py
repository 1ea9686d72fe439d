"""The one error type for mistakes a user can make and fix."""

from __future__ import annotations

__all__ = ["BMRSError"]


class BMRSError(ValueError):
    """Bad input from the user: an unknown name, an argument out of range, a file that is
    not what bmrs expects. A ``ValueError``, so code that catches those keeps working.

    The ``bmrs`` command prints it as one line ``bmrs: error: ...`` with exit status 2;
    any other exception is a defect and shows its traceback.
    """
