"""The one exception type for user errors.

Anything the user can fix (a bad path, a wrong checkpoint, an unsupported size) raises
``LeanError`` with a one-line message that says what is wrong and how to fix it. The command
lines print that line and exit 2; every other exception is a bug and shows a traceback.
"""


class LeanError(Exception):
    """A user-facing error: one line, says what is wrong and what to do."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's text (at most 200 characters), for a one-line message."""
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__
