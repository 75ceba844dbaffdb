"""The one exception type for mistakes a user can fix: the CLI prints its message on one line, no traceback."""


class ExocortexError(Exception):
    """An error with a message meant for the user: the CLI prints it on one line, no traceback."""


def first_line(e: BaseException, limit: int = 300) -> str:
    """An exception's message fit for a one-line error: its first non-blank line, cut to `limit` characters, or
    its type's name when it has no message (numpy, torch and the OS raise both kinds)."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:limit]
