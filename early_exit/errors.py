"""The one exception type the CLI turns into a one-line message instead of a traceback."""


class InputError(ValueError):
    """Bad user input (a path, a file, a checkpoint): the message says what is wrong and what to do."""
