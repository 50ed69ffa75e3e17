"""The one exception type for mistakes a user can fix.

The CLI prints a `UserError` as a single line and exits non-zero; anything else
is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input: a config key, a file, a model reference. The message names what and where."""
