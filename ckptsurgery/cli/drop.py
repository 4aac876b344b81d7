"""ckptsurgery drop: remove keys or whole modules."""

from __future__ import annotations

from typing import Annotated

import typer

from .. import ops
from ..ops.ranks import ranks_from_environment
from . import app
from .common import (
    DryRunOpt, ForceOpt, FormatOpt, MetadataFileOpt, MetadataOpt, NoMetadataOpt, InputArg, JsonOpt, OutputOpt, QuietOpt, RootOpt, examples, finish_write, metadata_args, listing, progress_bar,
)


@app.command(epilog=examples(
    "ckptsurgery drop resnet.pth fc -o backbone.pth",
    "ckptsurgery drop ckpt.pth 're:num_batches_tracked$' -o clean.pth --dry-run",
    "ckptsurgery drop a.safetensors fc -o b.safetensors --metadata license=mit",
))
def drop(
    input: InputArg,
    patterns: Annotated[list[str], typer.Argument(
        metavar="PATTERN...", help="Keys or whole modules to remove (glob, module name, or re:REGEX).", show_default=False)],
    output: OutputOpt,
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
    """Remove keys or whole modules."""
    entries = metadata_args(metadata, metadata_file)
    with ranks_from_environment() as ranks, progress_bar(quiet or json) as progress:
        report = ops.drop_keys(input, output, patterns, root=root, force=force, dry_run=dry_run,
                               progress=progress, format=format and format.value, ranks=ranks,
                               metadata=entries, no_metadata=no_metadata)
    finish_write(report, json, quiet, [listing("dropped", report["dropped"])])
