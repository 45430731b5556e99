"""The one exception type for a user's mistake: the CLI prints its message and exits with 2."""


class UserError(Exception):
    """A mistake the user can fix; its message names the value and the fix, on one line."""

    exit_code = 2
