"""User-facing errors: the CLI prints them as one line and exits non-zero."""


class WindquantError(Exception):
    """A problem with the user's input, with the fix in the message."""
