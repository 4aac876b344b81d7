"""The exceptions the CLI turns into one line on stderr and an exit code."""


class CkptError(Exception):
    """A failure the user can act on: bad input, a refused operation, a check that did not hold.
    Exit code 1."""

    exit_code = 1


class UsageError(CkptError):
    """Wrong usage: a value an option does not take, options that contradict each other or do not
    apply to the chosen mode. Exit code 2, as for the parser's own usage errors."""

    exit_code = 2
