"""How an operation opens its inputs: under one `ReadOptions` (ops/options.py), the input options
every reading command shares — `--dequantize` (ops/dequantize.py: scaled FP8 weights read as
full-precision ones) and `--names hf` (ops/gguf_names.py: a GGUF file's tensors under Hugging Face
names). Each changes what is read, before any command selects, renames or writes; what they did
comes back as a `Read` that `with_read` puts in the report (`dequantized`, `hf_names`).

(Where a remote input's bytes come from, and what was fetched, is io/remote.py's: a transport
matter, not a reading of the tensors.)"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Iterator

from ..dtypes import DType
from ..io import Checkpoint
from .options import READ_AS_IS, ReadOptions
from .reports import Dequantized, HfNames


@dataclass(frozen=True)
class Read:
    """What the read options did to the inputs: None where an option was not asked."""

    dequantized: Dequantized | None = None
    hf_names: HfNames | None = None


@contextmanager
def open_input(input: str, root: str | None = None, read: ReadOptions = READ_AS_IS,
               dtype: DType | None = None) -> Iterator[tuple[Checkpoint, Read]]:
    """The input checkpoint, read as `read` asks (a GGUF file's names first, then dequantized: in
    `dtype`, else bfloat16), and what was done."""
    from ..io import open_checkpoint

    with open_checkpoint(input, root) as opened:
        ckpt, named = opened, None
        if read.names == "hf":
            from .gguf_names import hf_names_of

            ckpt, named = hf_names_of(opened)
        dequantized = None
        if read.dequantize:
            from .dequantize import dequantize_checkpoint

            ckpt, dequantized = dequantize_checkpoint(ckpt, input, dtype)
        yield ckpt, Read(dequantized, named)


def open_inputs(stack, paths: list[str], root: str | None, read: ReadOptions,
                dtype: DType | None) -> tuple[list[Checkpoint], Read]:
    """Several inputs (a merge's, a diff's), entered on `stack`, each read as `read` asks; what was
    done to them all."""
    opened = [stack.enter_context(open_input(path, root, read, dtype)) for path in paths]
    dones = [done for _, done in opened]
    dequantized = [d.dequantized for d in dones if d.dequantized is not None]
    named = [d.hf_names for d in dones if d.hf_names is not None]
    if dequantized:
        from .dequantize import combined

        dequantized = combined(dequantized)
    if named:
        from .gguf_names import combined as names_combined

        named = names_combined(named)
    return [ckpt for ckpt, _ in opened], Read(dequantized or None, named or None)


def with_read(report, done: Read):
    """The report, saying what the read options did."""
    changes = {name: value for name, value in (("dequantized", done.dequantized), ("hf_names", done.hf_names))
               if value is not None}
    return replace(report, **changes) if changes else report
