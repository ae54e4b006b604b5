"""The one exception type users see: its message is a complete, one-line explanation."""


class KapaoError(Exception):
    """Bad input or configuration. The message names the file, what is wrong and what to do;
    the CLI prints it as one line and exits non-zero, without a traceback."""
