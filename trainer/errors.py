"""The one exception type for a user's mistake: the CLI prints its message and exits with 2.

Its subclasses say which of Google's API errors a mistake is (the API server answers with that
status: trainer/server/errors.py); the CLI treats them all alike."""


class UserError(Exception):
    """A mistake the user can fix; its message names the value and the fix, on one line."""

    exit_code = 2
    status = "INVALID_ARGUMENT"  # google.rpc.Code's name, for the API server


class NotFound(UserError):
    """What was named (a model, an operation, a dataset) is not on record."""

    status = "NOT_FOUND"


class FailedPrecondition(UserError):
    """The request is right, but the resource is not in a state that allows it (a running
    operation's model deleted, a finished operation cancelled)."""

    status = "FAILED_PRECONDITION"


def first_line(error: BaseException, limit: int = 300) -> str:
    """An exception's first line, cut to ``limit`` characters (its type where it says nothing):
    what a one-line refusal quotes of a library's error."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:limit]
