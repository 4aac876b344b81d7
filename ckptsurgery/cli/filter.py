"""ckptsurgery filter: keep the keys patterns select, or exactly the keys a template has."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from .. import ops
from . import app
from .common import InputArg, OutputOptions, RootOpt, examples, listing, output_options


@app.command("filter", epilog=examples(
    "ckptsurgery filter pretrained.pth -o matching.pth --like new_model.pth",
    "ckptsurgery filter ckpt.pth --keep backbone --keep 'neck.*' -o part.pth",
))
@output_options()
def filter_command(
    input: InputArg,
    keep: Annotated[Optional[list[str]], typer.Option(
        "--keep", metavar="PATTERN", help="Keep keys matching PATTERN (glob, module name, or re:REGEX); repeatable.")] = None,
    like: Annotated[Optional[str], typer.Option(
        "--like", metavar="TEMPLATE", help="Keep exactly the keys this template checkpoint has.")] = None,
    root: RootOpt = None,
    *,
    out: OutputOptions,
) -> None:
    """Keep selected keys, or exactly the keys a template has (the `if k in model_dict` recipe)."""
    with out.writing() as write:
        report = ops.filter_keys(input, write, keep=keep, like=like, root=root)
    details = [listing("left out", report.left_out)]
    if report.missing_from_input:
        details.append(listing("template keys the input lacks", report.missing_from_input))
    out.finish(report, details)
