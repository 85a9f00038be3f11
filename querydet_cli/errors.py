"""The one exception a user's mistake becomes: printed as one line, non-zero exit."""


class QueryDetError(Exception):
    """A user-facing error: bad file, bad option, missing optional dependency."""

    exit_code = 2
