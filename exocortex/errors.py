"""The one exception type for mistakes a user can fix: the CLI prints its message on one line, no traceback."""


class ExocortexError(Exception):
    """An error with a message meant for the user: the CLI prints it on one line, no traceback."""
