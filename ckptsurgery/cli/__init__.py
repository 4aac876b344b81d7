"""The command line: a thin Typer layer over `ckptsurgery.ops`. One module per command."""

from __future__ import annotations

import errno
import functools
import gc
import importlib
import os
import signal
import sys

import typer
from typer.core import TyperGroup

from ..errors import CkptError
from .common import printable


# Click's UsageError (a wrong option, a missing argument), reached through Typer's public API: Typer
# keeps its own copy of Click, whose modules are private
_UsageError = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")


def _fail(message: str, error: BaseException) -> None:
    if os.environ.get("CKPTSURGERY_DEBUG"):  # where a known failure was raised, for a bug report
        import traceback

        traceback.print_exception(error, file=sys.stderr)
    sys.stderr.write(f"ckptsurgery: error: {printable(message)}\n")
    # 1: the operation failed; 2: wrong usage, and (set by `diff`) any trouble
    raise typer.Exit(getattr(error, "exit_code", 1))


def _usage(error) -> None:
    """Wrong usage: one line and exit 2, as every other refusal, not Click's usage and boxed panel."""
    if type(error).__name__ == "NoArgsIsHelpError":  # a command given nothing shows its help
        raise error
    where = error.ctx.command_path if error.ctx is not None else "ckptsurgery"
    sys.stderr.write(f"ckptsurgery: error: {printable(error.format_message())} (see '{where} --help')\n")
    raise typer.Exit(2) from None


# command -> its module, in the order `--help` lists them. A command's module (and through it the
# operations it needs) is imported only when that command runs: start-up is most of what a command
# on a small file costs, and `merge` alone (its methods, their options) is a fifth of the imports.
COMMANDS = {"inspect": "inspect", "filter": "filter", "drop": "drop", "rename": "rename", "merge": "merge",
            "extract-lora": "extract_lora", "lora": "lora", "convert": "convert", "diff": "diff"}


@functools.cache
def _command(name: str):
    return typer.main.get_command(importlib.import_module(f"{__name__}.{COMMANDS[name]}").app)


class _Commands(TyperGroup):
    """Known failures become one line on stderr and an exit code here, inside the app, so that
    every runner (the console script, Typer's CliRunner, another program) sees the same codes.
    Commands are found in COMMANDS and imported when asked for. Its --help is laid out by
    cli/help.py, imported only then."""

    def list_commands(self, ctx) -> list[str]:
        return list(COMMANDS)

    def collect_usage_pieces(self, ctx) -> list[str]:
        from .help import usage_pieces

        return [*usage_pieces(self, ctx), self.subcommand_metavar]

    def format_help(self, ctx, formatter) -> None:
        from .help import show_help

        show_help(self, ctx)

    def get_command(self, ctx, name: str):
        return _command(name) if name in COMMANDS else None

    def resolve_command(self, ctx, args):
        if args and args[0] not in COMMANDS and not args[0].startswith("-"):
            import difflib

            near = difflib.get_close_matches(args[0], COMMANDS, n=1)
            if near:  # `ckptsurgery inspct`
                raise _UsageError(f"No such command {args[0]!r}; did you mean {near[0]!r}?", ctx)
        return super().resolve_command(ctx, args)

    def make_context(self, *args, **kwargs):
        try:
            return super().make_context(*args, **kwargs)
        except _UsageError as e:  # `ckptsurgery --bogus`
            _usage(e)

    def invoke(self, ctx: typer.Context):
        try:
            return super().invoke(ctx)
        except _UsageError as e:
            _usage(e)
        except CkptError as e:
            _fail(str(e), e)
        except OSError as e:  # the disk is full, a folder is read-only, ...
            if e.errno == errno.EPIPE:  # stdout closed early (`| head`): the parser quiets it
                raise
            _fail(f"{e.filename}: {e.strerror or e}" if e.filename else str(e.strerror or e), e)


app = typer.Typer(
    cls=_Commands,
    name="ckptsurgery",
    help="PyTorch checkpoint surgery: inspect, convert and edit .pth and .safetensors files "
         "without running the code pickled inside them.",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_enable=False,
)

def _print_version(value: bool) -> None:
    if value:
        from .. import __version__

        sys.stdout.write(f"ckptsurgery {__version__}\n")
        raise typer.Exit()


@app.callback()
def _options(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """PyTorch checkpoint surgery: inspect, convert and edit .pth and .safetensors files
    without running the code pickled inside them."""



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
        _run()
    except SystemExit as e:
        from ..ops import ranks

        if ranks.joined:  # see ranks.joined: skip the interpreter's teardown, where gloo may abort
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(e.code if isinstance(e.code, int) else (0 if e.code is None else 1))
        raise


def _run() -> None:
    try:
        app(prog_name="ckptsurgery")  # not "python -m ..." in usage lines, however it was started
    except Exception as e:
        if os.environ.get("CKPTSURGERY_DEBUG"):
            raise
        sys.stderr.write(f"ckptsurgery: error: {printable(f'{type(e).__name__}: {e}')} "
                         f"(set CKPTSURGERY_DEBUG=1 for a traceback)\n")
        sys.exit(getattr(e, "exit_code", 1))
