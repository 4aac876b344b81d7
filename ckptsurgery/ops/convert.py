"""convert: between .pth, .safetensors and DCP folders, and into Hugging Face-style shards."""

from __future__ import annotations

from .dequantize import open_input, with_dequantized
from .options import WriteOptions, check_write_options, dtype_to_cast
from .reports import WriteReport
from .write import write_checkpoint


def convert_checkpoint(input: str, write: WriteOptions, *, root: str | None = None,
                       dtype: str | None = None, dequantize: bool = False) -> WriteReport:
    """Convert between .pth, .safetensors and DCP folders, and shard, bit-exact unless `dtype`
    casts the float16/bfloat16/float32/float64 tensors. `dequantize`: scaled FP8 weights are
    written dequantized (in `dtype`, else bfloat16), their scales left out (ops/dequantize.py).

    Example:
        >>> convert_checkpoint("model.pth", WriteOptions("model.safetensors", max_shard_size="2GB"))
    """
    write = check_write_options(write)
    cast = dtype_to_cast(dtype)
    with open_input(input, root, dequantize, cast) as (ckpt, done):
        return with_dequantized(write_checkpoint(ckpt.tensors, write, source=ckpt, cast=cast), done)
