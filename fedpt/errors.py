"""The one exception type users see: a problem with their input, said in one line."""


class FedptError(Exception):
    """Bad input or state the user can fix; the CLI prints it as a single line, without a traceback."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (libraries raise many types with long texts), or its type."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
