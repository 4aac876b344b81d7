"""ckptsurgery rename: rename keys by rules applied in the order given."""

from __future__ import annotations

from typing import Annotated, Optional

from .. import core, ops
from ..errors import CkptError
from .common import (
    InputArg, InputOptions, OutputOptions, command_app, count, input_options, listing, output_options,
    print_table, printable,
)
from .declare import Option, Preparse, PreparseError


app = command_app()
MAX_MAP = 256 << 20  # a map names keys: a million long ones fit


def _load_map(path: str) -> dict:
    from ..io.small_files import parse_json, read_small  # here: only --map reads one

    raw = read_small(path, MAX_MAP, f"a map larger than {MAX_MAP >> 20} MiB; give old -> new names for a "
                                    f"checkpoint's keys")
    mapping = parse_json(path, raw, "the map is not valid JSON")
    if not isinstance(mapping, dict):
        raise CkptError(f"{path}: the map must be a JSON object of old name -> new name")
    return mapping


def _rules_in_order(args: list[str], takes: dict[str, int]) -> Preparse:
    """rename's rules may repeat and apply in the order given, like sed's -e expressions. Typer
    has no repeatable two-value option, so the rules are taken out of the arguments here, before
    the parser sees them (whichever parses: cli/declare.parse or Typer), and handed to the command
    in order as `rules`; every other argument goes to the parser. `takes`: how many values follow
    each of the command's other options."""
    rules, rest, i = [], [], 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            rest += args[i:]
            break
        name, eq, attached = arg.partition("=") if arg.startswith("--") else (arg, "", "")
        kind = _RULE_KINDS.get(name)
        if kind:
            count = core.RULE_VALUES[kind]
            values = [attached] * bool(eq) + args[i + 1 : i + 1 + count - bool(eq)]
            if len(values) < count:
                raise PreparseError(name, f"takes {count} value(s)")
            rules.append((kind, values))
            i += 1 + count - bool(eq)
            continue
        # another option's values pass through untouched, even one spelled like a rule
        follow = 0
        if arg.startswith("--"):
            follow = 0 if eq else takes.get(name, 0)
        elif arg.startswith("-") and len(arg) > 1:  # a cluster of short options: -qo OUT
            for at, letter in enumerate(arg[1:], start=2):
                if takes.get("-" + letter):
                    follow = takes["-" + letter] - (at < len(arg))
                    break
        rest += args[i : i + 1 + follow]
        i += 1 + follow
    return Preparse(rest, {"rules": rules})


_RULE_KINDS = {f"--{option}": kind for kind, option in core.RULE_OPTIONS.items()}


@app.command(preparse=_rules_in_order)
@output_options()
@input_options()
def rename(
    input: InputArg,
    # The rule options are listed here for --help; _RulesInOrder hands their values over, in order.
    strip_prefix: Annotated[Optional[list[str]], Option(
        "--strip-prefix", metavar="MODULE", help="Remove this module prefix (module and module. alike) where keys have it.")] = None,
    add_prefix: Annotated[Optional[list[str]], Option(
        "--add-prefix", metavar="MODULE", help="Put every key under this module (module and module. alike).")] = None,
    replace: Annotated[Optional[list[str]], Option(
        "--replace", metavar="OLD NEW", help="Replace a substring in every key.")] = None,
    regex: Annotated[Optional[list[str]], Option(
        "--regex", metavar="PATTERN REPL", help=r"Regular-expression substitution (\1 for groups).")] = None,
    map_file: Annotated[Optional[list[str]], Option(
        "--map", metavar="MAP.json", help="JSON file of exact old name -> new name.")] = None,
    allow_unchanged: Annotated[bool, Option(
        "--allow-unchanged", help="A rule that changes no key is not an error (for scripts: --strip-prefix module on a file already stripped).")] = False,
    inp: InputOptions = None,
    *,
    out: OutputOptions,
    rules: list[tuple[str, list[str]]] = (),  # the rule options' values in order (_rules_in_order)
) -> None:
    r"""Rename keys; a collision fails before anything is written.

    Every rule option may be repeated; the rules apply one after another in the order given, each to the names the earlier ones left. Each rule must change some key (unless --allow-unchanged). Two keys that would get one name fail the command, with every such pair named.

    Examples:
        ckptsurgery rename ddp.pth -o plain.pth --strip-prefix module
        ckptsurgery rename a.pth -o b.pth --replace gamma weight --replace beta bias
        ckptsurgery rename a.pth -o b.pth --regex 'layers\.(\d+)' 'blocks.\1'
    """
    rules = [core.rename_rule(kind, *([_load_map(values[0])] if kind == "map" else values))
             for kind, values in rules]
    read = inp.reading(input)
    with out.writing() as write:
        report = ops.rename_keys(input, rules, write, root=inp.root, allow_unchanged=allow_unchanged, read=read)
    if out.dry_run and not out.json:
        _print_rename_table(report)
    out.finish(report, [f"renamed {count(len(report.renamed), 'key')}",
                        *([listing("untouched", report.untouched)] if report.untouched else [])])


def _print_rename_table(report: ops.RenameReport) -> None:
    print_table(("old", "", "new"), [(printable(old), "→", printable(new)) for old, new in report.renamed.items()],
                False, "renamed keys")
