"""convert: between .pth and .safetensors, and into Hugging Face-style shards."""

from __future__ import annotations

from ..dtypes import CAST_TARGETS
from ..errors import UsageError
from ..io import open_checkpoint
from ..io.write import parse_size
from .ranks import Ranks
from .write import ProgressFactory, write_checkpoint


def convert(input: str, output: str, *, root: str | None = None, dtype: str | None = None,
            max_shard_size: str | int | None = None, force: bool = False, dry_run: bool = False,
            progress: ProgressFactory | None = None, format: str | None = None, jobs: int | None = None,
            ranks: Ranks | None = None, metadata: dict[str, str] | None = None, no_metadata: bool = False) -> dict:
    """Convert between .pth, .safetensors and DCP folders (`format="dcp"`), and shard, bit-exact
    unless `dtype` casts. `max_shard_size`: "2GB", "500MiB" or a number of bytes; `jobs`: shards
    written at once; `ranks`: under torchrun, this process's share (see write_checkpoint);
    `metadata`, `no_metadata`: a safetensors output's metadata (see write_checkpoint)."""
    cast = None
    if dtype is not None:
        if dtype not in CAST_TARGETS:
            raise UsageError(f"--dtype {dtype!r}: choose one of {', '.join(CAST_TARGETS)}")
        cast = CAST_TARGETS[dtype]
    limit = parse_size(max_shard_size) if max_shard_size is not None else None
    with open_checkpoint(input, root) as ckpt:
        return write_checkpoint(ckpt, ckpt.tensors, output, cast=cast, max_shard_size=limit,
                                force=force, dry_run=dry_run, progress=progress, format=format, jobs=jobs, ranks=ranks,
                                metadata=metadata, no_metadata=no_metadata)
