from __future__ import annotations

from typing import Annotated, Optional

import typer

from .. import ops
from . import app
from .common import DryRunOpt, ForceOpt, InputArg, JsonOpt, OutputOpt, QuietOpt, RootOpt, finish_write, progress_bar


@app.command()
def convert(
    input: InputArg,
    output: OutputOpt,
    dtype: Annotated[Optional[str], typer.Option("--dtype", metavar="fp32|fp16|bf16", help="Cast floating tensors: fp32, fp16 or bf16.")] = None,
    max_shard_size: Annotated[Optional[str], typer.Option(
        "--max-shard-size", metavar="SIZE", help="Write Hugging Face-style shards of at most this size (e.g. 2GB) and an index.")] = None,
    root: RootOpt = None,
    force: ForceOpt = False,
    dry_run: DryRunOpt = False,
    json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Convert between .pth and .safetensors, bit-exact unless --dtype asks for a cast."""
    with progress_bar(quiet or json) as progress:
        report = ops.convert(input, output, root=root, dtype=dtype, max_shard_size=max_shard_size,
                             force=force, dry_run=dry_run, progress=progress)
    finish_write(report, json, quiet)
