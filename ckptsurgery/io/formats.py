"""The formats ckptsurgery reads and writes, one table each. FORMATS: how an input's format is
told (a file by its first bytes, a folder by the files in it), which function reads it and
what it allows. OUTPUTS: which names pick an output format, what it holds and which function
writes it. Everything else asks these tables instead of spelling format names.

Detection runs on every command, so this module imports no format module: the tables name
each format's functions (`Named`), and a format's module is imported only when one of them is
first called — and the format modules, in turn, import this one for the kinds below."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from importlib import import_module
from typing import Any, Callable

from ..errors import CkptError
from ..kinds import Kind
from .model import Checkpoint, collection_paused


class Format(Kind):
    """An input's format, as detect_format tells it (and as `Checkpoint.format` reports it)."""

    DCP = "dcp"
    DEEPSPEED = "deepspeed"
    ACCELERATE = "accelerate"
    FOLDER = "folder"
    TORCH_ZIP = "torch-zip"
    TORCH_LEGACY = "torch-legacy"
    SAFETENSORS = "safetensors"
    INDEX = "index"
    GGUF = "gguf"

    @property
    def spec(self) -> FormatSpec:
        return FORMATS[self]


class ShardedFormat(Kind):
    """`Checkpoint.format` of a checkpoint read through a shard index: what its shards are."""

    SAFETENSORS = "sharded-safetensors"
    TORCH = "sharded-torch"  # any .bin/.pth among them


class OutputFormat(Kind):
    """What an output is written as (and as write reports show it)."""

    TORCH = "torch"
    SAFETENSORS = "safetensors"
    DCP = "dcp"

    @property
    def spec(self) -> OutputSpec:
        return OUTPUTS[self]


@dataclass(frozen=True)
class Named:
    """A function (or class) of one of this package's modules, named instead of imported: the
    module is imported when it is first called."""

    module: str
    name: str

    def load(self) -> Any:
        return getattr(import_module(f"{__package__}.{self.module}"), self.name)

    def __call__(self, *args, **kwargs):
        return self.load()(*args, **kwargs)


@dataclass(frozen=True)
class FormatSpec:
    """One input format. `detect`: for a file, `sniff(head, path)` on its first 512 bytes (never
    empty); for a folder, `test(path)`, or None for any folder the formats before it are not.
    `reader`: `reader(path, root)`, or `reader(path)` when the format takes no --root.
    `flat`: None when the format takes --root (a nested object whose state dict is chosen);
    else it holds one flat state dict, and refusing --root calls it this ("safetensors file").
    `shard`: may be one shard of an index (a checkpoint file, not an index or a folder)."""

    format: Format
    detect: Callable[..., bool] | None
    reader: Callable[..., Checkpoint]
    folder: bool = False
    flat: str | None = None
    shard: bool = False

    @property
    def takes_root(self) -> bool:
        return self.flat is None

    def read(self, path: str, root: str | None = None) -> Checkpoint:
        """The checkpoint at `path`, of this format; an OSError on the way names `path`."""
        try:
            with collection_paused():
                return self.reader(path, root) if self.takes_root else self.reader(path)
        except OSError as e:
            raise CkptError(f"{path}: cannot read ({e.strerror or e})") from None


@dataclass(frozen=True)
class OutputSpec:
    """One output format. `extensions`: output names ending so (in any case) are written in it.
    `metadata`: it holds a map of metadata text (--metadata). `by_option`: it is chosen by
    --format, never by a name. `folder`: it is a folder of files. `writer`: what writes it."""

    format: OutputFormat
    writer: Callable[..., Any]
    extensions: tuple[str, ...] = ()
    metadata: bool = False
    by_option: bool = False
    folder: bool = False


_LEGACY_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19."  # pickled torch magic number


def _is_zip(head: bytes, path: str) -> bool:
    return head[:4] in (b"PK\x03\x04", b"PK\x05\x06")


def _is_legacy(head: bytes, path: str) -> bool:
    return head.startswith(_LEGACY_MAGIC)


def _is_safetensors(head: bytes, path: str) -> bool:
    """An 8-byte length, then "{". JSON text has "{" at byte 8 only after eight text bytes,
    which as a length exceed 2e18 and never fit the file; a safetensors length may start with
    the byte "{" itself (a 123-byte header), so this test must come before the index's."""
    if len(head) >= 9 and head[8:9] == b"{":
        text = all(32 <= b < 127 or b in b"\t\n\r" for b in head[:8])
        return not text or int.from_bytes(head[:8], "little") <= os.path.getsize(path) - 8
    return False


def _is_gguf(head: bytes, path: str) -> bool:
    return head[:4] == b"GGUF"


def _is_index(head: bytes, path: str) -> bool:
    return head.lstrip()[:1] == b"{"


# in the order detect_format tries them: a folder's, then a file's
FORMATS: dict[Format, FormatSpec] = {spec.format: spec for spec in (
    FormatSpec(Format.DCP, Named("dcp", "is_dcp"), Named("dcp", "read_dcp"), folder=True),
    FormatSpec(Format.DEEPSPEED, Named("deepspeed", "is_deepspeed"), Named("deepspeed", "read_deepspeed"),
               folder=True, flat="DeepSpeed checkpoint"),
    FormatSpec(Format.ACCELERATE, Named("accelerate", "is_accelerate"), Named("accelerate", "read_accelerate"),
               folder=True),
    FormatSpec(Format.FOLDER, None, Named("sharded", "read_folder"), folder=True, flat="sharded checkpoint"),
    FormatSpec(Format.TORCH_ZIP, _is_zip, Named("torch_zip", "read_torch_zip"), shard=True),
    FormatSpec(Format.TORCH_LEGACY, _is_legacy, Named("torch_legacy", "read_torch_legacy"), shard=True),
    # before safetensors: a GGUF file of 123 tensors has "{" at byte 8
    FormatSpec(Format.GGUF, _is_gguf, Named("gguf", "read_gguf"), flat="GGUF file"),
    FormatSpec(Format.SAFETENSORS, _is_safetensors, Named("safetensors", "read_safetensors"),
               flat="safetensors file", shard=True),
    FormatSpec(Format.INDEX, _is_index, Named("sharded", "read_index"), flat="sharded checkpoint"),
)}
_FOLDERS = tuple(spec for spec in FORMATS.values() if spec.folder)
_FILES = tuple(spec for spec in FORMATS.values() if not spec.folder)

# in the order output_format tries them (and its message lists their extensions)
OUTPUTS: dict[OutputFormat, OutputSpec] = {spec.format: spec for spec in (
    OutputSpec(OutputFormat.SAFETENSORS, Named("safetensors", "write_safetensors"), (".safetensors",),
               metadata=True),
    OutputSpec(OutputFormat.TORCH, Named("torch_zip", "write_torch"), (".pth", ".pt", ".bin", ".ckpt")),
    OutputSpec(OutputFormat.DCP, Named("dcp", "DcpWriter"), by_option=True, folder=True),
)}


# what --format chooses: the output formats no name picks
BY_OPTION = tuple(spec.format.value for spec in OUTPUTS.values() if spec.by_option)


# inputs that are not on this disk (io/remote.py reads them; it is imported only for them)
REMOTE_SCHEMES = ("https://", "http://", "hf://")


def is_remote(path) -> bool:
    """A URL or an `hf://` path: an input io/remote.py reads, not a local file."""
    return isinstance(path, str) and path.startswith(REMOTE_SCHEMES)


def detect_format(path: str) -> Format:
    """The bytes decide, not the name: a file by its first bytes, a folder by what it holds (DCP
    with a `.metadata` file, accelerate's with save_state's files, ...)."""
    try:
        mode = os.stat(path).st_mode  # follows symlinks: the Hugging Face cache is made of them
    except (FileNotFoundError, ValueError):  # ValueError: a NUL in the path
        raise CkptError(f"{path}: no such file") from None
    except OSError as e:
        raise CkptError(f"{path}: cannot read ({e.strerror or e})") from None
    if stat.S_ISDIR(mode):
        return next(spec.format for spec in _FOLDERS if spec.detect is None or spec.detect(path))
    if not stat.S_ISREG(mode):  # opening a FIFO blocks, a device reads forever
        raise CkptError(f"{path}: not a regular file (a FIFO, socket or device); give a checkpoint file, "
                        f"its index or its folder")
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError as e:
        raise CkptError(f"{path}: cannot read ({e.strerror})") from None
    if not head:
        raise CkptError(f"{path}: the file is empty")
    for spec in _FILES:
        if spec.detect(head, path):
            return spec.format
    if head[:1] == b"\x80" and 2 <= head[1] <= 5:
        if os.path.basename(path) == ".metadata":
            raise CkptError(f"{path}: the metadata of a DCP checkpoint; give its folder, {os.path.dirname(path) or '.'}")
        raise CkptError(f"{path}: a bare pickle, not a torch checkpoint (no torch magic number)")
    if head[257:262] == b"ustar":
        raise CkptError(f"{path}: torch's pre-0.4 tar format is not supported; "
                        f"re-save it with a current torch")
    raise CkptError(f"{path}: not a checkpoint ckptsurgery can read "
                    f"(neither torch zip, legacy torch, safetensors, a shard index nor GGUF)")
