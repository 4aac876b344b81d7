"""ckptsurgery convert: between .pth and .safetensors, cast, or shard."""

from __future__ import annotations

from typing import Annotated, Optional

from .. import ops
from .common import CastTo, InputArg, InputOptions, OutputOptions, command_app, input_options, output_options
from .declare import Option


app = command_app()


@app.command()
@output_options()
@input_options()
def convert(
    input: InputArg,
    dtype: Annotated[Optional[CastTo], Option("--dtype", help="Cast the float16, bfloat16, float32 and float64 tensors to this dtype (and, with --dequantize, the dequantized weights: bfloat16 by default).", show_default=False)] = None,
    inp: InputOptions = None,
    *,
    out: OutputOptions,
) -> None:
    """Convert between .pth and .safetensors, bit-exact unless --dtype asks for a cast.

    A .safetensors output keeps the input's metadata but its content hashes (--metadata sets entries).

    Examples:
        ckptsurgery convert model.pth -o model-bf16.safetensors --dtype bf16
        ckptsurgery convert model.safetensors -o resume --format dcp
        ckptsurgery convert V3-fp8/ -o V3-bf16/model.safetensors --dequantize
    """
    read = inp.reading(input)
    with out.writing() as write:
        report = ops.convert_checkpoint(input, write, root=inp.root, dtype=dtype and dtype.value, read=read)
    out.finish(report)
