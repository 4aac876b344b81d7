"""The commands as declared, and a run's arguments parsed from those declarations without Typer.

A command module declares its command as Typer's style has it — a function whose parameters are
`Annotated[type, Option("--name", ...)]` or `Argument(...)` — but with this module's Option,
Argument and CommandApp, which only record what they are given. Two readers use the record:

- `parse` (here): a run's arguments, when they are plain — options the command declares, their
  values of the declared types, the arguments it takes — become the function's keyword arguments
  the way Click and Typer would make them. Importing Typer and Click, and building the command from
  its signature, were a third of what a command on a small file cost (docs/performance.md).
- cli/typer_app.py: the same declarations replayed into Typer, for --help, shell completion, and
  every run `parse` does not take (it returns None): a usage error, -h, an option it does not know.
  Those are Typer's to answer, in its words.

tests/conftest.py holds `parse` to Typer on every command line the test suite runs: where `parse`
takes one, Typer must take it too and hand the command the same values.
"""

from __future__ import annotations

import functools
import inspect
import types
import typing
from enum import Enum
from typing import Any, Callable, NamedTuple

# Settings of an Option or Argument that change only what --help shows, and the range a number
# must lie in (checked here). A declaration with any other setting (a callback, an envvar, a
# count) is always parsed by Typer.
_SHOWN_ONLY = {"help", "metavar", "show_default", "rich_help_panel", "hidden", "show_choices"}
_RANGE = {"min", "max"}


class Param:
    """`typer.Option(...)` or `typer.Argument(...)` as a command module wrote it: its option names
    (`decls`) and settings, replayed into Typer by cli/typer_app.py."""

    __slots__ = ("decls", "settings")

    def __init__(self, *decls: str, **settings: Any) -> None:
        self.decls, self.settings = decls, settings

    def __repr__(self) -> str:
        return f"{type(self).__name__}{(*self.decls, *(f'{k}={v!r}' for k, v in self.settings.items()))}"


class Option(Param):
    """An option: `Option("-o", "--output", metavar="OUT", help=...)`."""


class Argument(Param):
    """An argument: `Argument(metavar="INPUT", help=...)`; a list type takes several."""

    def __init__(self, **settings: Any) -> None:
        super().__init__(**settings)


class Preparse(NamedTuple):
    """What a command's own pass over its arguments took out (rename's rules, in the order given):
    the arguments left for the parser and the keyword arguments they make."""

    rest: list[str]
    taken: dict[str, Any]


class PreparseError(Exception):
    """A command's own pass found wrong usage of `option`: Typer reports it (a usage error)."""

    def __init__(self, option: str, message: str) -> None:
        super().__init__(message)
        self.option = option


class Command(NamedTuple):
    """One declared command. `preparse(arguments, takes)` (or None): the command's own pass over its
    arguments before the parser's; `takes` says how many values follow each option name."""

    name: str
    function: Callable
    help: str | None
    preparse: Callable[[list[str], dict[str, int]], Preparse] | None


class CommandApp:
    """A command module's record of its command (`command_app`), or of a group's commands
    (`command_group`: `lora fold`, `lora merge`, ...)."""

    def __init__(self, name: str | None = None, help: str | None = None, group: bool = False) -> None:
        self.name, self.help, self.group = name, help, group
        self.commands: dict[str, Command] = {}

    def command(self, name: str | None = None, *, help: str | None = None, preparse=None, **rest):
        if "epilog" in rest:
            raise TypeError("a command's examples are the 'Examples:' section of its docstring, not an epilog")
        if rest:
            raise TypeError(f"{', '.join(rest)}: not a setting of a command here (name, help, preparse); "
                            f"--help is laid out by cli/help.py for every command alike")

        def register(function: Callable) -> Callable:
            named = name or function.__name__.replace("_", "-")
            if not self.group and self.commands:
                raise TypeError(f"{named}: a command module registers one command; a group is command_group's")
            self.commands[named] = Command(named, function, help, preparse)
            return function
        return register


# ---- parsing ------------------------------------------------------------------------------------

class _Kind(NamedTuple):
    """How one parameter takes its value: `convert` makes one value of the declared type (raising
    ValueError for a value it does not take)."""

    name: str
    names: tuple[str, ...]  # an option's names; () for an argument
    negative: tuple[str, ...]  # a flag's --no-... names
    flag: bool
    many: bool  # repeatable option, or an argument taking several
    convert: Callable[[str], Any]
    default: Any
    required: bool


class _Spec(NamedTuple):
    options: dict[str, _Kind]  # every option name -> its parameter
    arguments: list[_Kind]
    defaults: dict[str, Any]  # every parameter's value when the command line does not give it
    takes: dict[str, int]  # option name -> values that follow it (for a command's preparse)


class _NotPlain(Exception):
    """A declaration `parse` does not read: the command is always Typer's."""


def _converter(kind: type, settings: dict) -> Callable[[str], Any]:
    if isinstance(kind, type) and issubclass(kind, Enum):
        members = {str(member.value): member for member in kind}
        return lambda value: members[value] if value in members else _refused()
    if kind is str:
        return str
    if kind in (int, float):
        low, high = settings.get("min"), settings.get("max")
        if low is None and high is None:
            return kind

        def ranged(value: str):
            number = kind(value)
            if (low is not None and number < low) or (high is not None and number > high):
                raise ValueError(value)
            return number
        return ranged
    raise _NotPlain(kind)


def _refused():
    raise ValueError


def declared(annotation) -> Param | None:
    """The Option or Argument of a parameter's annotation, `Annotated[type, Option(...)]`."""
    if typing.get_origin(annotation) is not typing.Annotated:
        return None
    params = [m for m in annotation.__metadata__ if isinstance(m, Param)]
    return params[0] if len(params) == 1 else None


def _kind(parameter: inspect.Parameter) -> _Kind:
    annotation = parameter.annotation
    param = declared(annotation)
    if param is None:
        raise _NotPlain(parameter.name)
    kind = typing.get_args(annotation)[0]
    if set(param.settings) - _SHOWN_ONLY - _RANGE - {"case_sensitive"} or param.settings.get("case_sensitive") is False:
        raise _NotPlain(parameter.name)
    if typing.get_origin(kind) in (typing.Union, types.UnionType):  # Optional[X], X | None
        kinds = [k for k in typing.get_args(kind) if k is not type(None)]
        if len(kinds) != 1:
            raise _NotPlain(parameter.name)
        kind = kinds[0]
    many = typing.get_origin(kind) is list
    if many:
        kind = typing.get_args(kind)[0]
    required = parameter.default is inspect.Parameter.empty
    default = None if required else parameter.default
    if isinstance(param, Argument):
        return _Kind(parameter.name, (), (), False, many, _converter(kind, param.settings), default, required)
    names, negative = [], []
    for decl in param.decls:
        first, slash, second = decl.partition("/")
        names.append(first.strip())
        if slash:
            negative.append(second.strip())
    if not names or not all(n.startswith("--") or len(n) == 2 for n in (*names, *negative)):
        raise _NotPlain(parameter.name)  # named after the parameter by Typer, or -long: Typer's
    flag = kind is bool
    if flag and many:
        raise _NotPlain(parameter.name)
    convert = bool if flag else _converter(kind, param.settings)
    if not flag and not many and default is not None and not isinstance(default, Enum):
        default = convert(default)  # as Click casts a default: --rank-timeout 60 is 60.0
    return _Kind(parameter.name, tuple(names), tuple(negative), flag, many, convert, default, required)


@functools.cache
def _spec(command: Command) -> _Spec | None:
    parameters = inspect.signature(command.function, eval_str=True).parameters.values()
    if command.preparse is not None:  # the command's own pass gives the parameters declared by neither
        parameters = [p for p in parameters if declared(p.annotation) is not None]
    try:
        kinds = [_kind(p) for p in parameters]
    except _NotPlain:
        return None
    options = {name: k for k in kinds for name in (*k.names, *k.negative)}
    arguments = [k for k in kinds if not k.names]
    if sum(k.many for k in arguments) > 1:
        return None
    takes = {name: 0 if k.flag else 1 for name, k in options.items()}
    return _Spec(options, arguments, {k.name: k.default for k in kinds}, takes)


def parse(command: Command, arguments: list[str]) -> dict[str, Any] | None:
    """The keyword arguments `command.function` takes for this command line, made as Typer makes
    them; None where Typer must answer (anything but a plain, valid command line)."""
    spec = _spec(command)
    if spec is None:
        return None
    taken: dict[str, Any] = {}
    if command.preparse is not None:
        try:
            arguments, taken = command.preparse(list(arguments), spec.takes)
        except PreparseError:
            return None
    given: dict[str, Any] = {}
    positional: list[str] = []
    i = 0
    try:
        while i < len(arguments):
            arg = arguments[i]
            i += 1
            if arg == "--":
                positional += arguments[i:]
                break
            if arg in ("-h", "--help"):
                return None
            if arg[:1] != "-" or arg == "-":
                positional.append(arg)
                continue
            if arg.startswith("--"):
                name, eq, value = arg.partition("=")
                kind = spec.options.get(name)
                if kind is None or (kind.flag and eq):
                    return None
                if kind.flag:
                    given[kind.name] = name in kind.names  # --x True, --no-x False
                    continue
                if not eq:
                    if i == len(arguments):
                        return None
                    value, i = arguments[i], i + 1  # taken whatever it looks like, as Click does
                _give(given, kind, value)
                continue
            # short options, one or several: -q, -o OUT, -oOUT, -qo OUT
            for at in range(1, len(arg)):
                kind = spec.options.get("-" + arg[at])
                if kind is None:
                    return None
                if kind.flag:
                    given[kind.name] = True
                    continue
                value = arg[at + 1:]
                if not value:
                    if i == len(arguments):
                        return None
                    value, i = arguments[i], i + 1
                _give(given, kind, value)
                break
        given.update(_arguments(spec.arguments, positional))
    except (ValueError, _Missing):
        return None
    for kind in spec.options.values():
        if kind.required and kind.name not in given:
            return None
    return {**spec.defaults, **given, **taken}


class _Missing(Exception):
    """Too few or too many arguments: Click's usage error."""


def _give(given: dict, kind: _Kind, value: str) -> None:
    if kind.many:
        given.setdefault(kind.name, []).append(kind.convert(value))
    else:
        given[kind.name] = kind.convert(value)


def _arguments(kinds: list[_Kind], values: list[str]) -> dict[str, Any]:
    """The arguments' values, as Click deals them out: fixed ones from both ends, the rest to the one
    that takes several."""
    many = next((i for i, k in enumerate(kinds) if k.many), None)
    if many is None:
        if len(values) > len(kinds):
            raise _Missing
        dealt = {k.name: [v] for k, v in zip(kinds, values)}
    else:
        before, after = kinds[:many], kinds[many + 1:]
        if len(values) < len(before) + len(after):
            raise _Missing
        middle = len(values) - len(after)
        dealt = {k.name: [v] for k, v in zip(before, values)}
        dealt.update({k.name: [v] for k, v in zip(after, values[middle:])})
        dealt[kinds[many].name] = values[len(before):middle]
    out = {}
    for kind in kinds:
        values = dealt.get(kind.name)
        if not values:  # not given (or none of several)
            if kind.required:
                raise _Missing
            continue
        out[kind.name] = [kind.convert(v) for v in values] if kind.many else kind.convert(values[0])
    return out
