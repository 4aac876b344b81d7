"""--help laid out for the width it is shown in, every command's and the group's.

Typer's rich help squeezes its columns into whatever terminal it finds: at 60 columns it cut option
names and words with "…" and split a choice list mid-value, and at any width it showed a required
argument as {INPUT} and a plain string argument's type as <str>. HelpCommand (every command's
class) and the group (cli/__init__.py's _Commands, through show_help and usage_pieces) render the
help here instead, from the public attributes of the Click parameters (opts, secondary_opts,
metavar, help, required, default, show_default, the type's choices and range, rich_help_panel):

- wide, Typer's look: the panels "Arguments", "Options" and the command's own (merge's modes,
  "Output"), one row per option in columns (required, names, short names, metavar, help), each
  panel's columns as wide as its own rows need;
- stacked, when the help column would be narrower than HELP_MIN or than its longest word: an
  option's names and metavar on one line, its help indented on the lines under it.

Nothing is ever cut: text wraps between words, a choice list between its values (after a "|"), an
example between its shell words (the line ends with " \\"); only a word wider than the whole
terminal is folded onto the next line. The usage line names arguments as everyone writes them:
INPUT, [INPUT] when optional, INPUT... for several.

Rich is imported when help is shown, never when a command runs (tests/test_startup.py, test_help.py).
"""

from __future__ import annotations

import inspect
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import Enum

import typer
from typer.core import TyperCommand, TyperGroup

HELP_MIN = 30  # the narrowest help column of the wide layout: narrower, the help is stacked
GAP = 2  # spaces between two columns
INDENT = 4  # a stacked option's help, under its names

# Typer's styles
OPTION, SWITCH, NEGATIVE, METAVAR, PUNCTUATION = "bold cyan", "bold green", "bold magenta", "bold yellow", "dim"
REQUIRED_MARK, REQUIRED, DEFAULT, LATER_PARAGRAPHS, BORDER = "red", "dim red", "dim", "dim", "dim"
USAGE, COMMAND_NAME, DEPRECATED = "yellow", "bold cyan", "red"

# an option named in a text ("--stats", "-q"), as Typer highlights it
_MENTIONS = ((re.compile(r"(?<![\w-])--[\w-]+"), OPTION), (re.compile(r"(?<![\w-])-\w+(?![\w-])"), SWITCH))
# the brackets and bars of a metavar: <a|b>, [x>=1]
_PUNCTUATION = re.compile(r"^[<\[]|\||[>\]]$")
# a shell word: a quoted string stays one word, spaces and all
_SHELL_WORD = re.compile(r"""(?:[^\s'"\\]|\\.|'[^']*'|"(?:[^"\\]|\\.)*")+""")


# ---- the commands' classes -----------------------------------------------------------------------

class HelpCommand(TyperCommand):
    """A command whose --help is laid out here. Every command's class (cli/common.py's command_app
    gives it by default) is this or derives from it."""

    def collect_usage_pieces(self, ctx) -> list[str]:
        return usage_pieces(self, ctx)

    def format_help(self, ctx, formatter) -> None:
        show_help(self, ctx)


class CommandApp(typer.Typer):
    """The Typer of one command's module: its command is a HelpCommand (a `cls` given must derive
    from it, as rename's does)."""

    def command(self, *args, cls=None, help: str | None = None, **kwargs):
        if cls is not None and not issubclass(cls, HelpCommand):
            raise TypeError(f"{cls.__name__}: a command's class must derive from cli.help.HelpCommand, "
                            f"which lays out its --help")
        if "epilog" in kwargs:
            raise TypeError("a command's examples are the 'Examples:' section of its docstring, not an epilog")
        register = super().command

        def decorator(function):
            text, examples = docstring_parts(inspect.getdoc(function) or "")
            return register(*args, cls=cls or HelpCommand, help=text if help is None else help,
                            epilog=examples, **kwargs)(function)
        return decorator


EXAMPLES = "\n\nExamples:\n"


def docstring_parts(docstring: str) -> tuple[str, str | None]:
    """A command's docstring as its help text and its --help epilog: the section "Examples:" that
    ends it, one command line per line, is shown after the options."""
    text, found, examples = docstring.partition(EXAMPLES)
    if not found:
        return docstring, None
    return text, "Examples:\n\n" + "\n\n".join(line.strip() for line in examples.splitlines() if line.strip())


class HelpGroup(TyperGroup):
    """A group of commands (`lora`) whose --help, and its commands', are laid out here."""

    def collect_usage_pieces(self, ctx) -> list[str]:
        return [*usage_pieces(self, ctx), self.subcommand_metavar]

    def format_help(self, ctx, formatter) -> None:
        show_help(self, ctx)


def usage_pieces(command, ctx) -> list[str]:
    """[OPTIONS] and the arguments: INPUT, [INPUT] when optional, INPUT... for several."""
    pieces = [command.options_metavar] if command.options_metavar else []
    for param in command.get_params(ctx):
        if param.param_type_name == "argument" and not getattr(param, "hidden", False):
            name = argument_name(param)
            pieces.append(name if param.required or name.startswith("[") else f"[{name}]")
    return pieces


def argument_name(param) -> str:
    name = param.metavar or (param.name or "").upper()
    return name + "..." if param.nargs != 1 and not name.endswith("...") else name


# ---- what is shown: pieces of text that never break, and rows --------------------------------------

@dataclass(frozen=True)
class Piece:
    """Text that is never broken (unless wider than the whole terminal). `glued`: no space before
    it (the next value of a choice list); `tail`: unstyled text after it (a comma); `mentions`:
    highlight the options it names."""

    text: str
    style: str = ""
    glued: bool = False
    tail: str = ""
    mentions: bool = False


@dataclass
class Row:
    names: list[Piece]  # long names (an argument's name): a column never broken
    short: list[Piece]  # short names
    metavar: list[Piece]  # breakable between its pieces: a choice list between its values
    help: list[Piece]  # words, then [default: ...] and [required]
    required: bool = False


def words(text: str, style: str = "") -> list[Piece]:
    return [Piece(word, style, mentions=True) for word in text.split()]


def paragraphs(text: str | None) -> list[str]:
    """A help text's paragraphs, as Click reads a docstring: dedented, cut at \\f, one paragraph
    per blank line; a paragraph that starts with \\b keeps its line breaks."""
    text = inspect.cleandoc(text or "").partition("\f")[0]
    return [p for p in re.split(r"\n\s*\n", text) if p.strip()]


def summary(command) -> str:
    """A command's line in the group's list: its short help or the first paragraph of its help."""
    first = paragraphs(command.short_help or command.help)[:1]
    return " ".join(first[0].replace("\b", "").split()) if first else ""


def _choices(param) -> list[str] | None:
    choices = getattr(param.type, "choices", None)
    return [str(getattr(c, "value", c)) for c in choices] if choices else None


def _range(param) -> str:
    """Click's description of a number range: x>=1, 0<=x<=1, ..."""
    kind = param.type
    if not all(hasattr(kind, a) for a in ("min", "max", "min_open", "max_open")):
        return ""
    if kind.min is None and kind.max is None or getattr(param, "count", False) and kind.min == 0 and kind.max is None:
        return ""
    if kind.min is None:
        return f"x{'<' if kind.max_open else '<='}{kind.max}"
    if kind.max is None:
        return f"x{'>' if kind.min_open else '>='}{kind.min}"
    return f"{kind.min}{'<' if kind.min_open else '<='}x{'<' if kind.max_open else '<='}{kind.max}"


def _metavar(param, ctx) -> list[Piece]:
    """What an option takes (OUT, a choice list, N [x>=1]); for an argument only a type worth
    showing (its choices, a range, <int>), never <str>."""
    argument = param.param_type_name == "argument"
    if not argument and (getattr(param, "is_flag", False) or getattr(param, "count", False)):
        return []
    choices = _choices(param)
    if choices and (argument or param.metavar is None):
        values = [f"{'<' if i == 0 else ''}{v}{'|' if i < len(choices) - 1 else '>'}" for i, v in enumerate(choices)]
        pieces = [Piece(v, METAVAR, glued=i > 0) for i, v in enumerate(values)]
    elif not argument and param.metavar:
        pieces = [Piece(param.metavar, METAVAR)]
    elif _range(param):  # <int> [x>=1], not <int range> [x>=1]
        pieces = [Piece(f"<{param.type.name.removesuffix(' range')}>", METAVAR)]
    elif not argument:
        pieces = [Piece(param.make_metavar(ctx), METAVAR)]
    elif type(param.type).__name__ != "StringParamType":
        pieces = [Piece(f"<{param.type.name}>", METAVAR)]
    else:
        pieces = []
    described = _range(param)
    return pieces + [Piece(f"[{described}]", METAVAR)] if described else pieces


def _shown_default(param, value) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return ", ".join(filter(None, (_shown_default(param, v) for v in value)))
    if isinstance(value, Enum):
        return str(value.value)
    if callable(value):
        return "(dynamic)"
    if getattr(param, "is_bool_flag", False):
        if param.secondary_opts:  # --x/--no-x: the name that is the default
            return (param.opts if value else param.secondary_opts)[0].lstrip("-/")
        if not value:
            return ""
    return str(value)


def _default(param, ctx) -> str:
    if isinstance(param.show_default, str):
        return f"({param.show_default})"
    if not (param.show_default or ctx.show_default):
        return ""
    return _shown_default(param, param.get_default(ctx, call=False))


def row(param, ctx) -> Row:
    if param.param_type_name == "argument":
        names, short = [Piece(argument_name(param), OPTION)], []
    else:
        names, short = [], []
        for opts, negative in ((param.opts, False), (param.secondary_opts, True)):
            for opt in opts:
                long = "--" in opt  # Typer's rule
                (names if long else short).append(Piece(opt, NEGATIVE if negative else OPTION if long else SWITCH))
    extras = []
    default = _default(param, ctx)
    if default:
        extras.append(Piece(f"[default: {default}]", DEFAULT))
    if param.required:
        extras.append(Piece("[required]", REQUIRED))
    return Row(names, short, _metavar(param, ctx), words(" ".join(paragraphs(param.help))) + extras, param.required)


def panels(command, ctx) -> list[tuple[str, list[Row]]]:
    """The parameters by panel, as Typer orders them: "Arguments" and the other arguments' panels,
    then "Options" and the other options' panels, each in order of first appearance."""
    found: dict[str, dict[str, list[Row]]] = {"argument": {"Arguments": []}, "option": {"Options": []}}
    for param in command.get_params(ctx):
        kind = param.param_type_name
        if kind not in found or getattr(param, "hidden", False):
            continue
        title = getattr(param, "rich_help_panel", None) or ("Arguments" if kind == "argument" else "Options")
        found[kind].setdefault(title, []).append(row(param, ctx))
    return [(title, rows) for kind in found.values() for title, rows in kind.items() if rows]


# ---- layout ---------------------------------------------------------------------------------------

Line = list[Piece]


def wrap(pieces: list[Piece], width: int, measure: Callable[[str], int] = len, indent: int = 0) -> list[Line]:
    """Pieces in lines of at most `width` cells, broken between pieces only (continuation lines
    start with `indent` spaces); a piece wider than a whole line is folded, never cut."""
    lines: list[Line] = []
    line: Line = []
    used, fresh = 0, True

    def new_line() -> None:
        nonlocal line, used, fresh
        lines.append(line)
        line, used, fresh = ([Piece(" " * indent)] if indent else []), indent, True

    for piece in pieces:
        size = measure(piece.text + piece.tail)
        space = 0 if fresh or piece.glued else 1
        if not fresh and used + space + size > width:
            new_line()
            space = 0
        if space:
            line.append(Piece(" "))
            used += 1
        text = piece.text
        while used + measure(text + piece.tail) > width and measure(text) > 1:  # only wider than a line
            head = _fit(text, max(1, width - used), measure)
            if head == text:
                break
            line.append(replace(piece, text=head, tail=""))
            new_line()
            text = text[len(head):]
        line.append(replace(piece, text=text))
        used += measure(text + piece.tail)
        fresh = False
    lines.append(line)
    return lines


def _fit(text: str, room: int, measure) -> str:
    end = 1
    while end < len(text) and measure(text[: end + 1]) <= room:
        end += 1
    return text[:end]


def width_of(pieces: list[Piece], measure) -> int:
    return measure(joined(pieces))


def joined(pieces: list[Piece]) -> str:
    return "".join(("" if i == 0 or p.glued else " ") + p.text + p.tail for i, p in enumerate(pieces))


def _padded(pieces: Line, width: int, measure) -> Line:
    used = sum(measure(p.text + p.tail) for p in pieces)
    return [*pieces, Piece(" " * (width - used))] if used < width else pieces


def _names(pieces: list[Piece]) -> list[Piece]:
    """Several names in one column: --brief,--quiet (Typer's)."""
    return [replace(p, tail="," if i < len(pieces) - 1 else "", glued=i > 0) for i, p in enumerate(pieces)]


def _help_need(rows, measure) -> int:
    return max([HELP_MIN, *(measure(p.text + p.tail) for r in rows for p in r.help)])


def wide_layout(rows: list[Row], inner: int, measure) -> tuple[list[int], int] | None:
    """The column widths (required, names, short names, metavar) and the help column's width that
    fit `inner` cells in the fewest lines (a line counts twice a break in a choice list); None when
    the help column would be narrower than HELP_MIN or than its longest word."""
    required = 1 if any(r.required for r in rows) else 0
    names = max((width_of(_names(r.names), measure) for r in rows), default=0)
    short = max((width_of(_names(r.short), measure) for r in rows), default=0)
    natural = max((width_of(r.metavar, measure) for r in rows), default=0)
    least = max((measure(p.text) for r in rows for p in r.metavar), default=0)
    fixed = sum(w + GAP for w in (required, names, short) if w)
    need = _help_need(rows, measure)
    best = None
    for metavar in range(least, natural + 1) if natural else [0]:
        help_width = inner - fixed - (metavar + GAP if metavar else 0)
        if help_width < need:
            continue
        cost = 0.0
        for r in rows:
            metavar_lines = len(wrap(r.metavar, metavar, measure)) if metavar else 1
            # the fewest lines; then a choice list broken in fewer places
            cost += max(metavar_lines, len(wrap(r.help, help_width, measure))) + (metavar_lines - 1) / 2
        if best is None or cost <= best[0]:
            best = (cost, metavar, help_width)
    if best is None:
        return None
    _, metavar, help_width = best
    # as wide as its widest line once wrapped: the rest goes to the help
    used = max((width_of(line, measure) for r in rows for line in wrap(r.metavar, metavar, measure)), default=0)
    return [required, names, short, used], help_width + metavar - used


def wide_rows(rows: list[Row], widths: list[int], help_width: int, measure) -> list[Line]:
    required, names, short, metavar = widths
    out = []
    for r in rows:
        metavar_lines = wrap(r.metavar, metavar, measure) if metavar else [[]]
        help_lines = wrap(r.help, help_width, measure)
        for i in range(max(len(metavar_lines), len(help_lines))):
            cells = [([Piece("*", REQUIRED_MARK)] if r.required and i == 0 else [], required),
                     (_names(r.names) if i == 0 else [], names), (_names(r.short) if i == 0 else [], short),
                     (metavar_lines[i] if i < len(metavar_lines) else [], metavar)]
            line: Line = []
            for cell, width in cells:
                if width:
                    line += _padded(cell, width + GAP, measure)
            out.append(line + (help_lines[i] if i < len(help_lines) else []))
    return out


def stacked_rows(rows: list[Row], inner: int, measure) -> list[Line]:
    """Each option's names and metavar on a line (a long choice list continues under its start),
    its help on the lines under it, indented."""
    out = []
    for r in rows:
        names = [replace(p, tail=", " if i < len(r.names + r.short) - 1 else "", glued=i > 0)
                 for i, p in enumerate(r.names + r.short)]
        under = width_of(names, measure) + 1
        out += wrap(names + r.metavar, inner, measure, indent=under if under <= inner // 2 else INDENT)
        if r.help:
            out += [[Piece(" " * INDENT), *line] for line in wrap(r.help, inner - INDENT, measure)]
    return out


def command_rows(group, ctx) -> list[tuple[str, list[tuple[str, list[Piece]]]]]:
    """The group's commands by panel: (name, summary)."""
    found: dict[str, list[tuple[str, list[Piece]]]] = {"Commands": []}
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        if command is None or command.hidden:
            continue
        said = ([Piece("(deprecated)", DEPRECATED)] if command.deprecated else []) + words(summary(command))
        found.setdefault(getattr(command, "rich_help_panel", None) or "Commands", []).append((name, said))
    return [(title, rows) for title, rows in found.items() if rows]


def wide_commands(rows, inner: int, measure) -> list[Line] | None:
    names = max(measure(name) for name, _ in rows)
    help_width = inner - names - GAP
    if help_width < max([HELP_MIN, *(measure(p.text) for _, said in rows for p in said)]):
        return None
    out = []
    for name, said in rows:
        for i, line in enumerate(wrap(said, help_width, measure)):
            out.append(_padded([Piece(name, COMMAND_NAME)] if i == 0 else [], names + GAP, measure) + line)
    return out


def stacked_commands(rows, inner: int, measure) -> list[Line]:
    out = []
    for name, said in rows:
        out.append([Piece(name, COMMAND_NAME)])
        out += [[Piece(" " * INDENT), *line] for line in wrap(said, inner - INDENT, measure)]
    return out


def text_lines(text: str | None, width: int, measure) -> list[Line]:
    """The command's description: its first paragraph, then the others dimmed, a blank line between."""
    out: list[Line] = []
    for i, paragraph in enumerate(paragraphs(text)):
        style = "" if i == 0 else LATER_PARAGRAPHS
        if i:
            out.append([])
        if paragraph.startswith("\b"):  # Click's mark: keep the line breaks
            for source in paragraph.lstrip("\b").strip("\n").splitlines():
                out += wrap(words(source, style), width, measure)
        else:
            out += wrap(words(paragraph, style), width, measure)
    return out


def epilog_lines(text: str | None, program: str, width: int, measure) -> list[Line]:
    """The epilog ("Examples:" and command lines): a command line too long for the terminal goes
    on over several lines, broken between shell words, each but the last ending with " \\"."""
    out: list[Line] = []
    for i, paragraph in enumerate(paragraphs(text)):
        if i:
            out.append([])
        if not paragraph.startswith(program + " "):
            out += text_lines(paragraph, width, measure)
            continue
        for command in paragraph.splitlines():
            shell = [Piece(w, mentions=True) for w in _SHELL_WORD.findall(command)]
            lines = wrap(shell, width, measure)
            if len(lines) > 1:  # room for the " \\" at the end of each line
                lines = wrap(shell, width - 2, measure, indent=INDENT)
            out += [line + [Piece(" \\")] if j < len(lines) - 1 else line for j, line in enumerate(lines)]
    return out


def usage_line(command, ctx, width: int, measure) -> list[Line]:
    said = [Piece("Usage:", USAGE), *(Piece(w, "bold") for w in ctx.command_path.split()),
            *(Piece(p, "bold") for p in command.collect_usage_pieces(ctx))]
    return wrap(said, width, measure, indent=len("Usage: "))


# ---- rendering --------------------------------------------------------------------------------------

def console():
    """Rich's console on stdout: its width from the terminal (or COLUMNS; in a pipe 80 columns,
    TERMINAL_WIDTH as Typer's), colours only on a terminal, none under NO_COLOR."""
    from rich.console import Console

    width = os.environ.get("TERMINAL_WIDTH", "")
    return Console(width=int(width) if width.isdigit() and int(width) > 0 else None, highlight=False, markup=False,
                   emoji=False, color_system=None if os.environ.get("NO_COLOR") else "auto")


def show_help(command, ctx) -> None:
    """Print the command's (or the group's) help on stdout, laid out for the console's width."""
    from rich.cells import cell_len
    from rich.console import Group
    from rich.panel import Panel
    from rich.text import Text

    out = console()
    width = max(out.width, 20)
    inner = width - 4  # a panel's borders and padding

    def text(line: Line) -> Text:
        said = Text(no_wrap=False, overflow="fold", end="\n")
        for piece in line:
            part = Text(piece.text, style=piece.style)
            if piece.mentions:
                for pattern, style in _MENTIONS:
                    part.highlight_regex(pattern, style)
            if piece.style == METAVAR:
                part.highlight_regex(_PUNCTUATION, PUNCTUATION)
            said.append(part)
            said.append(piece.tail)
        said.rstrip()
        return said

    def padded(lines: list[Line]) -> list[Text]:  # one space on the left, as Typer's
        return [text([Piece(" "), *line] if line else []) for line in lines]

    params = panels(command, ctx)
    commands = command_rows(command, ctx) if isinstance(command, TyperGroup) else []
    layouts = [wide_layout(panel, inner, cell_len) for _, panel in params]
    every_command = [c for _, panel in commands for c in panel]
    # one layout for the whole help: stacked as soon as one panel does not fit in columns
    stacked = None in layouts or bool(commands) and wide_commands(every_command, inner, cell_len) is None

    shown: list = [Text(""), *padded(usage_line(command, ctx, width - 2, cell_len)), Text("")]
    if command.help:
        description = text_lines(command.help, width - 2, cell_len)
        if command.deprecated:
            description = [[Piece("(deprecated)", DEPRECATED), Piece(" ")], *description]
        shown += [*padded(description), Text("")]
    titled = [(title, stacked_rows(panel, inner, cell_len) if stacked else wide_rows(panel, *layout, cell_len))
              for (title, panel), layout in zip(params, layouts)]
    titled += [(title, stacked_commands(panel, inner, cell_len) if stacked else wide_commands(panel, inner, cell_len))
               for title, panel in commands]
    for title, lines in titled:
        shown.append(Panel(Group(*map(text, lines)), title=Text(title), title_align="left", border_style=BORDER,
                           padding=(0, 1)))
    if command.epilog:
        program = ctx.find_root().info_name or ""
        shown += [Text(""), *padded(epilog_lines(command.epilog, program, width - 2, cell_len))]
    out.print(Group(*shown), crop=False)
