"""The one exception type the CLI turns into a single stderr line and exit code 2."""


class SaapError(Exception):
    """A problem with the user's input (path, model, setting), reported without a traceback."""
