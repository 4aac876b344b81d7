"""ckptsurgery convert: between .pth and .safetensors, cast, or shard."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from .. import ops
from ..ops.ranks import ranks_from_environment
from ..dtypes import CAST_TARGETS
from . import app
from .common import (
    DryRunOpt, ForceOpt, FormatOpt, MetadataFileOpt, MetadataOpt, NoMetadataOpt, InputArg, JobsOpt, JsonOpt, OutputOpt, QuietOpt, RootOpt, choice, examples, finish_write, metadata_args, progress_bar,
)


CastTo = choice("CastTo", CAST_TARGETS)


@app.command(epilog=examples(
    "ckptsurgery convert model.pth -o model-bf16.safetensors --dtype bf16",
    "ckptsurgery convert model.safetensors -o resume --format dcp",
    "ckptsurgery convert big.pth -o out/model.safetensors --max-shard-size 2GB -j 4",
))
def convert(
    input: InputArg,
    output: OutputOpt,
    dtype: Annotated[Optional[CastTo], typer.Option("--dtype", help="Cast the float16/bfloat16/float32/float64 tensors to this dtype.", show_default=False)] = None,
    max_shard_size: Annotated[Optional[str], typer.Option(
        "--max-shard-size", metavar="SIZE", help="Write Hugging Face-style shards of at most this size (e.g. 2GB) and an index.")] = None,
    jobs: JobsOpt = None,
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
    """Convert between .pth and .safetensors, bit-exact unless --dtype asks for a cast.

    A .safetensors output keeps the input's metadata but its content hashes (--metadata sets entries)."""
    entries = metadata_args(metadata, metadata_file)
    with ranks_from_environment() as ranks, progress_bar(quiet or json) as progress:
        report = ops.convert(input, output, root=root, dtype=dtype and dtype.value, max_shard_size=max_shard_size,
                             force=force, dry_run=dry_run, progress=progress, format=format and format.value,
                             jobs=jobs, ranks=ranks,
                             metadata=entries, no_metadata=no_metadata)
    finish_write(report, json, quiet)
