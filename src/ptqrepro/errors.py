"""The exception types the command line turns into a one-line message: ``PtqError`` for a bad
argument or an impossible request (exit code 2), ``InputError`` for an input file that is missing,
empty, corrupt or of something else (exit code 1)."""


class PtqError(Exception):
    """Bad input or an impossible request, stated in one line that names the offending key/value."""

    exit_code = 2


class InputError(PtqError):
    """An input file or folder that is missing, empty, corrupt, or made for another model, stated
    in one line that names it and the argument that gave it."""

    exit_code = 1


def first_line(error: BaseException) -> str:
    """The first line of a library's error message (its class name where the message is empty), for
    a ``PtqError`` that says what went wrong without the library's traceback."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
