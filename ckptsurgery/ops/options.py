"""How an operation writes its output: one `WriteOptions`, built once (by the command line's
shared options, cli/common.py, or by a library caller) and passed whole to the operation and on
to `write_checkpoint`. A new output option is one field here (and, for the command line, one
entry in cli/common.py's WRITE_OPTIONS). See docs/architecture.md."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Mapping

from ..errors import UsageError

if TYPE_CHECKING:
    from ..dtypes import DType
    from .ranks import Ranks

MAX_DEFAULT_JOBS = 4  # more threads than this only add tensors in flight and seeks on one disk


def default_jobs(environ=os.environ) -> int:
    """Shards written at once when --jobs is not given (and threads of --stats and --hash): one per
    core this process may use (a torchrun job's ranks on one machine share them), at most
    MAX_DEFAULT_JOBS. Measured in docs/performance.md ("Many shards"): writing .pth shards (a
    CRC-32 of every byte) scales with the cores, safetensors shards (kernel copies) gain a little,
    more threads than cores lose."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        ranks_here = max(1, int(environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        ranks_here = 1
    return max(1, min(MAX_DEFAULT_JOBS, cores // ranks_here))


# progress(total_bytes, label) -> advance(n_bytes): how the CLI shows a bar; None shows none
ProgressFactory = Callable[[int, str], Callable[[int], None]]


@dataclass(frozen=True)
class ReadOptions:
    """How inputs are read (their options; WriteOptions are the output's), applied as each input is
    opened (ops/inputs.py's `open_input`).

    Args:
        dequantize: scaled FP8 weights are read as full-precision ones, their scales left out
            (ops/dequantize.py).
        names: "hf" reads a GGUF file's tensors under their Hugging Face names (ops/gguf_names.py);
            "gguf" (the default) keeps llama.cpp's. Inputs that are not GGUF files keep theirs.

    Example:
        >>> convert_checkpoint("model.gguf", WriteOptions("model.safetensors"), read=ReadOptions(names="hf"))
    """

    dequantize: bool = False
    names: str = "gguf"

    def __post_init__(self) -> None:
        if self.names not in ("gguf", "hf"):
            raise UsageError(f"names {self.names!r}: give gguf or hf")


READ_AS_IS = ReadOptions()


@dataclass(frozen=True)
class WriteOptions:
    """Where and how an output is written.

    Args:
        output: the file (or DCP/adapter folder) to write; its extension picks the format.
        format: "dcp" writes a torch.distributed.checkpoint folder at `output`; None follows the
            output's extension.
        force: replace an existing output.
        dry_run: plan and report; write nothing.
        max_shard_size: write Hugging Face-style shards of at most this size ("2GB", "500MiB"
            or a number of bytes) and an index.
        jobs: shards written at once (sharded outputs only; default: see ops.options.default_jobs).
        metadata: entries set in a .safetensors output's metadata (the input's are kept otherwise).
        no_metadata: keep none of the input's metadata.
        progress: how to show progress (see ProgressFactory); None shows none.
        ranks: under torchrun, this process's place in the job (ops.ranks.ranks_from_environment):
            it writes its share of the files.

    Example:
        >>> from ckptsurgery.ops import WriteOptions, convert_checkpoint
        >>> report = convert_checkpoint("model.pth", WriteOptions("model.safetensors", max_shard_size="2GB"))
    """

    output: str
    format: str | None = None
    force: bool = False
    dry_run: bool = False
    max_shard_size: int | str | None = None
    jobs: int | None = None
    metadata: Mapping[str, str] | None = field(default=None, compare=False)
    no_metadata: bool = False
    progress: ProgressFactory | None = field(default=None, compare=False, repr=False)
    ranks: "Ranks | None" = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        from ..io.write import parse_size

        if self.max_shard_size is not None:  # parsed at once: a wrong size fails before any reading
            object.__setattr__(self, "max_shard_size", parse_size(self.max_shard_size))
        if self.format is not None:
            object.__setattr__(self, "format", getattr(self.format, "value", self.format))
        if not isinstance(self.output, str):  # a pathlib.Path from a library caller
            try:
                object.__setattr__(self, "output", os.fspath(self.output))
            except TypeError:
                raise UsageError(f"output {self.output!r}: give a path") from None

    def refuse(self, *names: str, why: str) -> None:
        """Refuse the options among `names` that were given (they do not apply to this output)."""
        given = [name for name in names if getattr(self, name) is not None and getattr(self, name) is not False]
        if given:
            shown = ("several ranks (torchrun)" if n == "ranks" else "--" + n.replace("_", "-") for n in given)
            raise UsageError(f"{', '.join(shown)} {why}")


def dtype_to_cast(dtype: str | None) -> "DType | None":
    """`--dtype fp16|bf16|fp32|...`: the dtype floating tensors are written in (None: their own)."""
    if dtype is None:
        return None
    from .. import core
    from ..dtypes import CAST_TARGETS

    return CAST_TARGETS[core.check_choice(getattr(dtype, "value", dtype), tuple(CAST_TARGETS), "--dtype")]


def check_write_options(write) -> WriteOptions:
    """`write` if it is a WriteOptions; else one line saying how an operation now takes its output."""
    if not isinstance(write, WriteOptions):
        raise UsageError(f"give the output as WriteOptions(output, ...), not {type(write).__name__} {write!r:.60} "
                         f"(since ckptsurgery 0.3 every writing function takes one WriteOptions: README, Library)")
    return write
