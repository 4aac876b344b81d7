"""ckptsurgery convert: between .pth and .safetensors, cast, or shard."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from .. import ops
from .common import CastTo, InputArg, OutputOptions, RootOpt, command_app, examples, output_options


app = command_app()


@app.command(epilog=examples(
    "ckptsurgery convert model.pth -o model-bf16.safetensors --dtype bf16",
    "ckptsurgery convert model.safetensors -o resume --format dcp",
    "ckptsurgery convert big.pth -o out/model.safetensors --max-shard-size 2GB -j 4",
))
@output_options()
def convert(
    input: InputArg,
    dtype: Annotated[Optional[CastTo], typer.Option("--dtype", help="Cast the float16, bfloat16, float32 and float64 tensors to this dtype.", show_default=False)] = None,
    root: RootOpt = None,
    *,
    out: OutputOptions,
) -> None:
    """Convert between .pth and .safetensors, bit-exact unless --dtype asks for a cast.

    A .safetensors output keeps the input's metadata but its content hashes (--metadata sets entries)."""
    with out.writing() as write:
        report = ops.convert_checkpoint(input, write, root=root, dtype=dtype and dtype.value)
    out.finish(report)
