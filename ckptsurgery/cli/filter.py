"""ckptsurgery filter: keep the keys patterns select, or exactly the keys a template has."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from .. import ops
from ..ops.ranks import ranks_from_environment
from . import app
from .common import (
    DryRunOpt, ForceOpt, FormatOpt, MetadataFileOpt, MetadataOpt, NoMetadataOpt, InputArg, JsonOpt, OutputOpt, QuietOpt, RootOpt, examples, finish_write, metadata_args, listing, progress_bar,
)


@app.command("filter", epilog=examples(
    "ckptsurgery filter pretrained.pth -o matching.pth --like new_model.pth",
    "ckptsurgery filter ckpt.pth --keep backbone --keep 'neck.*' -o part.pth",
))
def filter_command(
    input: InputArg,
    output: OutputOpt,
    keep: Annotated[Optional[list[str]], typer.Option(
        "--keep", metavar="PATTERN", help="Keep keys matching PATTERN (glob, module name, or re:REGEX); repeatable.")] = None,
    like: Annotated[Optional[str], typer.Option(
        "--like", metavar="TEMPLATE", help="Keep exactly the keys this template checkpoint has.")] = None,
    root: RootOpt = None,
    force: ForceOpt = False,
    dry_run: DryRunOpt = False,
    format: FormatOpt = None,
    metadata: MetadataOpt = None,
    metadata_file: MetadataFileOpt = None,
    no_metadata: NoMetadataOpt = False,
    json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Keep selected keys, or exactly the keys a template has (the `if k in model_dict` recipe)."""
    entries = metadata_args(metadata, metadata_file)
    with ranks_from_environment() as ranks, progress_bar(quiet or json) as progress:
        report = ops.filter_keys(input, output, keep=keep, like=like, root=root, force=force,
                                 dry_run=dry_run, progress=progress, format=format and format.value, ranks=ranks,
                                 metadata=entries, no_metadata=no_metadata)
    details = [listing("left out", report["left_out"])]
    if report["missing_from_input"]:
        details.append(listing("template keys the input lacks", report["missing_from_input"]))
    finish_write(report, json, quiet, details)
