"""The one exception type the command line turns into a one-line message (exit code 2)."""


class PtqError(Exception):
    """Bad input or an impossible request, stated in one line that names the offending key/value."""
