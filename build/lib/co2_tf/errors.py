"""The one exception type for bad user input.

Binaries catch `UserError` and print its message as a single line (no
traceback) before exiting non-zero. Its message names the problem and the fix.
"""


class UserError(Exception):
    """A bad flag, file, dataset or checkpoint: reported as one line."""
