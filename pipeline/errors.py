"""The one exception a user sees: a bad input or setting, printed as one line with exit status 2."""


class PipelineError(Exception):
    """A user-facing error: printed as one line, exit status 2, no artifact touched."""


class PeerFailed(PipelineError):
    """Raised on every other process when one process of a multi-process run stopped with a PipelineError: that
    process prints the one line; these exit with status 2 in silence (``config.run_cli``)."""
