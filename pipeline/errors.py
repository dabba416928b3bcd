"""The one exception a user sees: a bad input or setting, printed as one line with exit status 2."""


class PipelineError(Exception):
    """A user-facing error: printed as one line, exit status 2, no artifact touched."""
