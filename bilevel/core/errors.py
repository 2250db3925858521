"""User-facing errors: the CLI prints them as one line and exits with code 2."""


class BilevelError(Exception):
    """Bad input from the user (config, names, files). The message must say what was wrong and what is accepted."""


class NonFiniteLossError(BilevelError):
    """A loss became NaN or infinite; training stops and the last good checkpoint is kept."""
