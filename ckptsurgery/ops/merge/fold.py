"""merge BASE --lora ADAPTER...: adapters folded into one base (ops/adapters)."""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import fields

from ..adapters import fold_into, parse_scales, read_adapter
from ..inputs import open_input, with_read
from ..options import READ_AS_IS, ReadOptions, WriteOptions, check_write_options, dtype_to_cast
from ..reports import FoldReport
from ..spools import Spools, output_folder
from ..write import write_checkpoint


def fold_adapters(base: str, adapters: list[str], write: WriteOptions, *, scales: list[float] | None = None,
                  allow_unmatched: bool = False, dtype: str | None = None, root: str | None = None,
                  read: ReadOptions = READ_AS_IS) -> FoldReport:
    """The adapters (PEFT folders or kohya files, see ops/adapters) folded into BASE, in order,
    each times its scale (`scales`: none, one for all, or one per adapter). An adapter weight
    that matches no base weight is an error unless `allow_unmatched`. `dtype` casts the floating
    tensors written (each folded tensor rounded once). A .safetensors output keeps BASE's metadata.
    `read`: how BASE is read (ops/inputs.py: its scaled FP8 weights dequantized, then folded into)."""
    write = check_write_options(write)
    scales = parse_scales(scales, len(adapters))
    cast = dtype_to_cast(dtype)
    with ExitStack() as stack:
        ckpt, done = stack.enter_context(open_input(base, root, read, cast))
        opened = [(stack.enter_context(read_adapter(path)), scale) for path, scale in zip(adapters, scales)]
        spools = stack.enter_context(Spools(output_folder(write.output)))  # a remote base's weights read twice
        merged, folded = fold_into(ckpt, opened, allow_unmatched=allow_unmatched, cast=cast, spools=spools)
        written = write_checkpoint(merged, write, source=ckpt, cast=cast)
    return FoldReport.extend(with_read(written, done), input=None, mode="lora", sources=[base],
                             **{f.name: getattr(folded, f.name) for f in fields(folded)})
