"""The one exception type users see: a problem with their input, said in one line."""


class FedptError(Exception):
    """Bad input or state the user can fix; the CLI prints it as a single line, without a traceback."""
