"""ckptsurgery drop: remove keys or whole modules."""

from __future__ import annotations

from typing import Annotated

import typer

from .. import ops
from . import app
from .common import InputArg, OutputOptions, RootOpt, examples, listing, output_options


@app.command(epilog=examples(
    "ckptsurgery drop resnet.pth fc -o backbone.pth",
    "ckptsurgery drop ckpt.pth 're:num_batches_tracked$' -o clean.pth --dry-run",
    "ckptsurgery drop a.safetensors fc -o b.safetensors --metadata license=mit",
))
@output_options()
def drop(
    input: InputArg,
    patterns: Annotated[list[str], typer.Argument(
        metavar="PATTERN...", help="Keys or whole modules to remove (glob, module name, or re:REGEX).", show_default=False)],
    root: RootOpt = None,
    *,
    out: OutputOptions,
) -> None:
    """Remove keys or whole modules."""
    with out.writing() as write:
        report = ops.drop_keys(input, patterns, write, root=root)
    out.finish(report, [listing("dropped", report.dropped)])
