"""The one exception type the command line turns into a one-line message (exit code 2)."""


class PtqError(Exception):
    """Bad input or an impossible request, stated in one line that names the offending key/value."""


def first_line(error: BaseException) -> str:
    """The first line of a library's error message (its class name where the message is empty), for
    a ``PtqError`` that says what went wrong without the library's traceback."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
