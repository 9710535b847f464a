"""The exception types that reach the user as a one-line message, and the one way library warnings do."""

from __future__ import annotations

import contextlib
import sys
import warnings


class GenrepError(Exception):
    """Bad input or a state the user can fix.

    The CLI prints ``genrep: error: <message>`` and exits with status 2, without a traceback,
    so the message must say what was wrong and what would be right.
    """

    exit_status = 2


class WriteError(GenrepError):
    """The file system refused a write (a full disk, a quota, a read-only mount, an I/O error): not bad input, so
    the CLI exits with status 1. Made only by ``io.write_error``, so every such line names the path."""

    exit_status = 1


@contextlib.contextmanager
def library_warnings():
    """Hold the warnings a library raises inside the block. If the block fails, genrep's own error line says what
    matters and they are dropped (torch warns about a pickle protocol just before refusing the file); if it
    succeeds, each distinct one goes to stderr as one ``genrep: warning:`` line, not Python's two (the second is
    a line of the library's source)."""
    with warnings.catch_warnings(record=True) as caught:
        yield
    shown = set()
    for w in caught:
        text = (str(w.message).strip().splitlines() or [w.category.__name__])[0]
        if text not in shown:
            shown.add(text)
            print(f"genrep: warning: {text}", file=sys.stderr)
