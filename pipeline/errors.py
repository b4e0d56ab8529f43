"""Errors the command line turns into one clear line.

`InputError` is the user's mistake (a bad option, file or ticker): exit code 2, no traceback.
`NoResultError` means the work ran but produced nothing usable (every trial pruned or failed): exit 1.
"""


class InputError(Exception):
    """Bad input from the user; the message is the whole explanation."""


class NoResultError(Exception):
    """The pipeline ran but has no result to report (e.g. no trial completed)."""
