"""ckptsurgery rename"""

from __future__ import annotations

import json as jsonlib
import os
import sys
from typing import Annotated, Optional

import typer

from .. import core, ops
from ..errors import CkptError
from . import app
from .common import (
    DryRunOpt, ForceOpt, InputArg, JsonOpt, OutputOpt, QuietOpt, RootOpt, console, finish_write, listing, printable,
    progress_bar,
)


def _load_map(path: str) -> dict:
    try:
        if not os.path.isfile(path):  # a FIFO would block the read
            raise CkptError(f"{path}: the map must be a regular JSON file")
        with open(path, encoding="utf-8") as f:
            mapping = jsonlib.load(f)
    except OSError as e:
        raise CkptError(f"{path}: cannot read the map ({e.strerror})") from None
    except ValueError as e:
        raise CkptError(f"{path}: the map is not valid JSON ({e})") from None
    if not isinstance(mapping, dict):
        raise CkptError(f"{path}: the map must be a JSON object of old name -> new name")
    return mapping


@app.command()
def rename(
    input: InputArg,
    output: OutputOpt,
    strip_prefix: Annotated[Optional[str], typer.Option("--strip-prefix", metavar="P", help="Remove this prefix where keys have it.")] = None,
    add_prefix: Annotated[Optional[str], typer.Option("--add-prefix", metavar="P", help="Put this prefix before every key.")] = None,
    replace: Annotated[Optional[tuple[str, str]], typer.Option(
        "--replace", metavar="OLD NEW", help="Replace a substring in every key.")] = None,
    regex: Annotated[Optional[tuple[str, str]], typer.Option(
        "--regex", metavar="PATTERN REPL", help=r"Regular-expression substitution (\1 for groups).")] = None,
    map_file: Annotated[Optional[str], typer.Option("--map", metavar="MAP.json", help="JSON file of exact old name -> new name.")] = None,
    root: RootOpt = None,
    force: ForceOpt = False,
    dry_run: DryRunOpt = False,
    json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Rename keys; a collision fails before anything is written.

    Rules apply in this order: --strip-prefix, --add-prefix, --replace, --regex, --map (whose
    names are matched as the earlier rules left them). Each rule must change some key. Two keys
    that would get one name fail the command, with every such pair named."""
    _refuse_repeats(("--strip-prefix", "--add-prefix", "--replace", "--regex", "--map"))
    rules = core.rename_rules(strip_prefix, add_prefix, replace, regex,
                              _load_map(map_file) if map_file else None)
    with progress_bar(quiet or json) as progress:
        report = ops.rename_keys(input, output, rules, root=root, force=force, dry_run=dry_run,
                                     progress=progress)
    if dry_run and not json:
        _print_rename_table(report)
    finish_write(report, json, quiet, [f"renamed {len(report['renamed'])} key(s)",
                                       listing("untouched", report["untouched"])])


def _refuse_repeats(options: tuple[str, ...]) -> None:
    """Each rule option is taken once: the parser would silently keep only the last of a
    repeated one, and a dropped rename is worse than an error."""
    for option in options:
        count = sum(arg == option or arg.startswith(option + "=") for arg in sys.argv[1:])
        if count > 1:
            raise typer.BadParameter(f"{option} was given {count} times; it is taken once "
                                     f"(use --map for many exact renames)", param_hint=option)


def _print_rename_table(report: dict) -> None:
    from rich.table import Table

    table = Table(box=None, show_edge=False, pad_edge=False)
    table.add_column("old")
    table.add_column("")
    table.add_column("new")
    for old, new in report["renamed"].items():
        table.add_row(printable(old), "→", printable(new))
    console().print(table)
