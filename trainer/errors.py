"""The one exception type for a user's mistake: the CLI prints its message and exits with 2.

The API server answers each with google.rpc's status of its kind (``rpc_status``): a missing
resource is NOT_FOUND, a request the state of a resource refuses FAILED_PRECONDITION, any other
mistake INVALID_ARGUMENT.
"""


class UserError(Exception):
    """A mistake the user can fix; its message names the value and the fix, on one line."""

    exit_code = 2
    rpc_status = "INVALID_ARGUMENT"


class NotFound(UserError):
    """A resource (model, operation, dataset) that is not on record."""

    rpc_status = "NOT_FOUND"


class FailedPrecondition(UserError):
    """A request the resource's state refuses now (an import still running on a dataset)."""

    rpc_status = "FAILED_PRECONDITION"
