"""The one exception type users see for bad input. The CLI turns it into one line on stderr and exit code 2."""


class ParallelCompError(Exception):
    """Bad input or an impossible setting: a missing or corrupt model file, an unsupported
    architecture, pickled weights, an empty document, a budget below 1, ...

    The message is one line and names the file or setting and the problem."""
