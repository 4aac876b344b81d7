"""The command line: a thin layer over `ckptsurgery.ops`, one module per command. A plain command
line is parsed from the commands' declarations (cli/declare.py) and runs without Typer; Typer
(cli/typer_app.py) answers --help, completion and wrong usage."""

from __future__ import annotations

import errno
import gc
import importlib
import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from ..errors import CkptError


def _fail(message: str, error: BaseException) -> None:
    from .common import printable  # imported by every command's module already

    if os.environ.get("CKPTSURGERY_DEBUG"):  # where a known failure was raised, for a bug report
        import traceback

        traceback.print_exception(error, file=sys.stderr)
    sys.stderr.write(f"ckptsurgery: error: {printable(message)}\n")
    # 1: the operation failed; 2: wrong usage, and (set by `diff`) any trouble
    raise SystemExit(getattr(error, "exit_code", 1))


@contextmanager
def failures() -> Iterator[None]:
    """Around a command's run, by either route (cli/declare.parse or Typer): a known failure
    becomes one line on stderr and its exit code."""
    try:
        yield
    except CkptError as e:
        _fail(str(e), e)
    except OSError as e:  # the disk is full, a folder is read-only, ...
        if e.errno == errno.EPIPE:  # stdout closed early (`| head`): quieted where the run ends
            raise
        _fail(f"{e.filename}: {e.strerror or e}" if e.filename else str(e.strerror or e), e)


# command -> its module, in the order `--help` lists them. A command's module (and through it the
# operations it needs) is imported only when that command runs: start-up is most of what a command
# on a small file costs, and `merge` alone (its methods, their options) is a fifth of the imports.
COMMANDS = {"inspect": "inspect", "filter": "filter", "drop": "drop", "rename": "rename", "merge": "merge",
            "extract-lora": "extract_lora", "lora": "lora", "convert": "convert", "diff": "diff"}

# set by a shell asking Typer's completion for words: Typer's to answer
_COMPLETION = "_CKPTSURGERY_COMPLETE"


def print_version() -> None:
    from .. import __version__

    sys.stdout.write(f"ckptsurgery {__version__}\n")


def __getattr__(name: str):
    if name == "app":  # the Typer app (tests, other programs): built when asked for
        from .typer_app import app

        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _terminate(signum, frame):
    # SIGTERM (a CI job's timeout, `kill`) unwinds like Ctrl-C: temporary files are removed
    raise SystemExit(128 + signum)


def main() -> None:
    """Entry point: the app turns known failures into one line and exit code 1 (2 for wrong
    usage); here, a bug or an input we did not foresee still gets one line, not a traceback."""
    signal.signal(signal.SIGTERM, _terminate)
    # A command holds a table of up to millions of long-lived objects and makes little garbage:
    # the collector's default (a scan every 700 allocations) spent a third of a 200 000-key
    # inspect rescanning it. Cycles are still collected, a hundred thousand allocations apart.
    gc.set_threshold(100_000, 50, 100)
    try:
        _run(sys.argv[1:])  # the one place the command line is read: the app itself takes its arguments
    except SystemExit as e:
        from ..ops import ranks

        if ranks.joined:  # see ranks.joined: skip the interpreter's teardown, where gloo may abort
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(e.code if isinstance(e.code, int) else (0 if e.code is None else 1))
        raise


def parsed(args: list[str]):
    """The declared command and its keyword arguments, when cli/declare.parse takes this command
    line; else None (Typer answers)."""
    from .declare import parse

    if not args or args[0] not in COMMANDS or _COMPLETION in os.environ:
        return None
    declared = importlib.import_module(f"{__name__}.{COMMANDS[args[0]]}").app
    rest = args[1:]
    if declared.group:
        if not rest or rest[0] not in declared.commands:
            return None
        command, rest = declared.commands[rest[0]], rest[1:]
    else:
        (command,) = declared.commands.values()
    given = parse(command, rest)
    return None if given is None else (command, given)


class _Quiet:
    """stdout or stderr once the reader has gone (`| head`): the interpreter's last flush must not
    fail again (Click's PacifyFlushWrapper, for the runs Typer does not make)."""

    def __init__(self, stream) -> None:
        self._stream = stream

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError as e:
            if e.errno != errno.EPIPE:
                raise

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def _run_declared(command, given: dict) -> None:
    """Run a parsed command line as Typer would have run it: its failures and a closed pipe (exit
    1, quietly) end it the same way (Ctrl-C: _run's, on both roads)."""
    try:
        with failures():
            command.function(**given)
    except OSError as e:
        if e.errno != errno.EPIPE:
            raise
        sys.stdout, sys.stderr = _Quiet(sys.stdout), _Quiet(sys.stderr)
        raise SystemExit(1) from None


def _run(args: list[str]) -> None:
    try:
        if args == ["--version"]:
            print_version()
            return
        found = parsed(args)
        if found is not None:
            _run_declared(*found)
            raise SystemExit(0)  # as Click ends a run: main's rule for torchrun's ranks holds on both roads
        from .typer_app import app

        app(prog_name="ckptsurgery")  # not "python -m ..." in usage lines, however it was started
    except KeyboardInterrupt:  # Ctrl-C in a command, or before it runs (its module being imported): exit 130
        raise SystemExit(130) from None
    except Exception as e:
        if os.environ.get("CKPTSURGERY_DEBUG"):
            raise
        from .common import printable

        sys.stderr.write(f"ckptsurgery: error: {printable(f'{type(e).__name__}: {e}')} "
                         f"(set CKPTSURGERY_DEBUG=1 for a traceback)\n")
        sys.exit(getattr(e, "exit_code", 1))
