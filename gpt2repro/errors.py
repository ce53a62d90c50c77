"""One-line error messages: the first line of an exception, for `error: ...` lines (no torch here)."""


def first_line(error: BaseException) -> str:
    """The first line of the exception's message, or its type's name when it has none."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
