"""One exception type for bad user input, so every CLI can turn it into one line and exit code 2."""


class UserError(Exception):
    """Bad input that the user can fix; the message names the problem and the fix."""
