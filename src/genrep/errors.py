"""The one exception type that reaches the user as a one-line message."""


class GenrepError(Exception):
    """Bad input or a state the user can fix.

    The CLI prints ``genrep: error: <message>`` and exits with status 2, without a traceback,
    so the message must say what was wrong and what would be right.
    """
