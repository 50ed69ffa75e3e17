"""The one exception type for mistakes a user can fix.

The CLI prints a `UserError` as a single line and exits non-zero; anything else
is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input: a config key, a file, a model reference. The message names what and where."""


def first_line(e: BaseException, limit: int | None = 200) -> str:
    """The first line of an exception's message, cut to `limit` characters (None: whole): for a one-line error."""
    return (str(e).strip().splitlines() or [""])[0][:limit]
