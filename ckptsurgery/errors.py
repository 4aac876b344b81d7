"""The one exception the CLI turns into a one-line message and exit code 1."""


class CkptError(Exception):
    """A failure the user can act on: bad input, a refused operation, a check that did not hold."""
