"""The one exception type for user errors.

Anything the user can fix (a bad path, a wrong checkpoint, an unsupported size) raises
``LeanError`` with a one-line message that says what is wrong and how to fix it. The CLIs
print that line and exit non-zero; every other exception is a bug and shows a traceback.
"""


class LeanError(Exception):
    """A user-facing error: one line, says what is wrong and what to do."""
