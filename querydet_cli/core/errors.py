"""The one exception a user's mistake becomes: printed as one line, non-zero exit."""


class QueryDetError(Exception):
    """A user-facing error: bad file, bad option, missing optional dependency."""

    exit_code = 2

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code
