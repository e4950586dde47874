"""The one exception type for bad user input.

Binaries catch `UserError` and print its message as a single line (no
traceback) before exiting non-zero. Its message names the problem and the fix.
"""


class UserError(Exception):
    """A bad flag, file, dataset or checkpoint: reported as one line."""


def first_line(error):
    """An exception's message as one short line (TF's run to many lines), or its type."""
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else type(error).__name__
