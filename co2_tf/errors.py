"""The one exception type for bad user input.

Binaries catch `UserError` and print its message as a single line (no
traceback) before exiting non-zero. Its message names the problem and the fix.
A UserError raised inside a tf.data pipeline (a py_function, or a graph
assertion whose message starts "UserError: ") reaches the caller as a TF
error whose text quotes it: `user_error_in` finds it there.
"""
import re

_QUOTED = re.compile(r"\bUserError: ([^\n]+)")
# A graph op's failed assertion prints its message in brackets: "assertion failed: [...]".
_ASSERTED = re.compile(r"assertion failed: \[UserError: ([^\n]+)\]")


class UserError(Exception):
    """A bad flag, file, dataset or checkpoint: reported as one line."""


def first_line(error):
    """An exception's message as one short line (TF's run to many lines), or its type."""
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else type(error).__name__


def user_error_in(exc):
    """The message of a UserError that `exc` carries (raised inside TF ops), or None."""
    if isinstance(exc, UserError):
        return str(exc)
    found = _ASSERTED.search(str(exc)) or _QUOTED.search(str(exc))
    return found.group(1).strip() if found else None
