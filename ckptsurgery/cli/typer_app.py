"""The command line as Typer's: the commands' declarations (cli/declare.py) replayed into Typer, for
--help, shell completion, wrong usage, and every run cli/declare.parse leaves to it. Imported only
then: a plain run never imports Typer or Click.

`app` is the whole command line (`typer.main.get_command(app)` is its Click group); a command's
module is imported, and its Typer command built, when that command is asked for.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import inspect
import sys
import typing

import typer
from typer.core import TyperGroup, TyperOption

from . import COMMANDS, failures
from .common import printable
from .declare import Command, CommandApp, Option, Param, PreparseError, declared
from .help import CommandApp as HelpApp, HelpCommand, HelpGroup

# Click's UsageError (a wrong option, a missing argument), reached through Typer's public API: Typer
# keeps its own copy of Click, whose modules are private
UsageError = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")

_PREPARSED = "ckptsurgery.preparsed"  # ctx.meta: what a command's own pass took out of its arguments
_CONTEXT = "typer_context"  # the Typer-facing function's parameter that receives the Click context


def usage(error) -> None:
    """Wrong usage: one line and exit 2, as every other refusal, not Click's usage and boxed panel."""
    if type(error).__name__ == "NoArgsIsHelpError":  # a command given nothing shows its help
        raise error
    where = error.ctx.command_path if error.ctx is not None else "ckptsurgery"
    sys.stderr.write(f"ckptsurgery: error: {printable(error.format_message())} (see '{where} --help')\n")
    raise SystemExit(2)


def run_command(command: Command, given: dict) -> None:
    """Run a declared command with what Typer parsed (the one place Typer's runs go through)."""
    command.function(**given)


def _typer_param(param: Param):
    make = typer.Option if isinstance(param, Option) else typer.Argument
    return make(*param.decls, **param.settings)


def _typer_annotation(annotation):
    if typing.get_origin(annotation) is not typing.Annotated:
        return annotation
    kind, *metadata = typing.get_args(annotation)
    return typing.Annotated[(kind, *(_typer_param(m) if isinstance(m, Param) else m for m in metadata))]


def _typer_function(command: Command):
    """The function Typer is given for `command`: its signature with Typer's Option and Argument
    (and, for a command with its own pass, the context that pass's result is kept in)."""
    parameters = []
    for p in inspect.signature(command.function, eval_str=True).parameters.values():
        if declared(p.annotation) is not None:
            parameters.append(p.replace(annotation=_typer_annotation(p.annotation)))
        elif command.preparse is None:
            raise TypeError(f"{command.name}: {p.name} is neither an Option nor an Argument")
    if command.preparse is not None:
        parameters.append(inspect.Parameter(_CONTEXT, inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context))

    def run(**given):
        context = given.pop(_CONTEXT, None)
        taken = context.meta.get(_PREPARSED, {}) if context is not None else {}
        run_command(command, {**given, **taken})

    functools.update_wrapper(run, command.function)
    run.__signature__ = inspect.Signature(parameters)
    run.__annotations__ = {p.name: p.annotation for p in parameters}
    return run


def _preparsing(command: Command) -> type[HelpCommand]:
    """The Click class of a command with its own pass over its arguments (rename's rules): the pass
    runs where Click parses, whatever runs the command (the console script, a test runner)."""

    class Preparsed(HelpCommand):
        def parse_args(self, ctx: typer.Context, args: list[str]) -> list[str]:
            takes = {name: 0 if param.is_flag else param.nargs for param in self.params
                     if isinstance(param, TyperOption) for name in (*param.opts, *param.secondary_opts)}
            try:
                rest, taken = command.preparse(list(args), takes)
            except PreparseError as e:
                raise typer.BadParameter(str(e), param_hint=e.option) from None
            ctx.meta[_PREPARSED] = taken
            return super().parse_args(ctx, rest)

    return Preparsed


def typer_of(declared: CommandApp) -> typer.Typer:
    """The Typer of a command module's declarations."""
    if declared.group:
        app = HelpApp(cls=HelpGroup, name=declared.name, help=declared.help, no_args_is_help=True,
                      add_completion=False, pretty_exceptions_enable=False)
    else:
        app = HelpApp(add_completion=False, pretty_exceptions_enable=False)
    for command in declared.commands.values():
        cls = _preparsing(command) if command.preparse is not None else None
        app.command(command.name, cls=cls, help=command.help)(_typer_function(command))
    return app


@functools.cache
def click_command(name: str):
    """The Click command (or group) of `name`, one of COMMANDS."""
    return typer.main.get_command(typer_of(importlib.import_module(f"{__package__}.{COMMANDS[name]}").app))


class _Commands(TyperGroup):
    """Known failures become one line on stderr and an exit code here, inside the app, so that
    every runner (the console script, Typer's CliRunner, another program) sees the same codes.
    Commands are found in COMMANDS and imported when asked for. Its --help is laid out by
    cli/help.py."""

    def list_commands(self, ctx) -> list[str]:
        return list(COMMANDS)

    def collect_usage_pieces(self, ctx) -> list[str]:
        from .help import usage_pieces

        return [*usage_pieces(self, ctx), self.subcommand_metavar]

    def format_help(self, ctx, formatter) -> None:
        from .help import show_help

        show_help(self, ctx)

    def get_command(self, ctx, name: str):
        return click_command(name) if name in COMMANDS else None

    def resolve_command(self, ctx, args):
        if args and args[0] not in COMMANDS and not args[0].startswith("-"):
            near = difflib.get_close_matches(args[0], COMMANDS, n=1)
            if near:  # `ckptsurgery inspct`
                raise UsageError(f"No such command {args[0]!r}; did you mean {near[0]!r}?", ctx)
        return super().resolve_command(ctx, args)

    def make_context(self, *args, **kwargs):
        try:
            return super().make_context(*args, **kwargs)
        except UsageError as e:  # `ckptsurgery --bogus`
            usage(e)

    def invoke(self, ctx: typer.Context):
        try:
            with failures():
                return super().invoke(ctx)
        except UsageError as e:
            usage(e)


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
        from . import print_version

        print_version()
        raise typer.Exit()


@app.callback()
def _options(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """PyTorch checkpoint surgery: inspect, convert and edit .pth and .safetensors files
    without running the code pickled inside them."""
