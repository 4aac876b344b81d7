"""Formats: detect a checkpoint's format from its bytes and read it into a lazy table."""

from __future__ import annotations

import os
import stat

from ..errors import CkptError
from .model import Checkpoint, MappedFile, Storage, TensorRef, collection_paused

_LEGACY_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19."  # pickled torch magic number


def detect_format(path: str) -> str:
    """One of dcp, accelerate, folder, torch-zip, torch-legacy, safetensors, index; the bytes
    decide, not the name (a folder is DCP when it holds a `.metadata` file, accelerate's when
    it holds save_state's files)."""
    try:
        mode = os.stat(path).st_mode  # follows symlinks: the Hugging Face cache is made of them
    except (FileNotFoundError, ValueError):  # ValueError: a NUL in the path
        raise CkptError(f"{path}: no such file") from None
    except OSError as e:
        raise CkptError(f"{path}: cannot read ({e.strerror or e})") from None
    if stat.S_ISDIR(mode):
        from .accelerate import is_accelerate
        from .dcp import is_dcp
        from .deepspeed import is_deepspeed

        if is_dcp(path):
            return "dcp"
        return "deepspeed" if is_deepspeed(path) else "accelerate" if is_accelerate(path) else "folder"
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
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "torch-zip"
    if head.startswith(_LEGACY_MAGIC):
        return "torch-legacy"
    # safetensors: an 8-byte length, then "{". JSON text has "{" at byte 8 only after eight text
    # bytes, which as a length exceed 2e18 and never fit the file; a safetensors length may start
    # with the byte "{" itself (a 123-byte header), so that test must come first.
    if len(head) >= 9 and head[8:9] == b"{":
        text = all(32 <= b < 127 or b in b"\t\n\r" for b in head[:8])
        if not text or int.from_bytes(head[:8], "little") <= os.path.getsize(path) - 8:
            return "safetensors"
    if head.lstrip()[:1] == b"{":
        return "index"
    if head[:1] == b"\x80" and 2 <= head[1] <= 5:
        if os.path.basename(path) == ".metadata":
            raise CkptError(f"{path}: the metadata of a DCP checkpoint; give its folder, {os.path.dirname(path) or '.'}")
        raise CkptError(f"{path}: a bare pickle, not a torch checkpoint (no torch magic number)")
    if head[257:262] == b"ustar":
        raise CkptError(f"{path}: torch's pre-0.4 tar format is not supported; "
                        f"re-save it with a current torch")
    raise CkptError(f"{path}: not a checkpoint ckptsurgery can read "
                    f"(neither torch zip, legacy torch, safetensors nor a shard index)")


def open_checkpoint(path: str, root: str | None = None) -> Checkpoint:
    """Read a checkpoint's structure (no tensor data). `root`: None detects the state dict in a
    nested .pth, '' takes the top level, a key takes that entry."""
    path = os.fspath(path)
    fmt = detect_format(path)
    if root and fmt in ("folder", "index", "safetensors", "deepspeed"):  # their state dict is the whole file
        kind = {"safetensors": "safetensors file", "deepspeed": "DeepSpeed checkpoint"}.get(fmt, "sharded checkpoint")
        raise CkptError(f"{path}: --root {root!r}: a {kind} holds one flat state dict, with nothing "
                        f"nested to choose; --root applies to .pth files (omit it, or give --root '')")
    return _read(path, fmt, root)


def _open_shard(path: str) -> Checkpoint:
    """One shard of an index: a checkpoint file, never another index or a folder (no recursion)."""
    fmt = detect_format(path)
    if fmt in ("index", "folder", "dcp", "accelerate", "deepspeed"):
        what = "a shard index" if fmt == "index" else "a folder"
        raise CkptError(f"{path}: is {what}; a shard must be a safetensors or torch checkpoint file")
    return _read(path, fmt, "")


def _model_file(path: str) -> Checkpoint:
    """A model's weights in a folder of several things: a checkpoint file or a shard index."""
    fmt = detect_format(path)
    if fmt == "index":
        from .sharded import read_index

        return read_index(path, _open_shard)
    return _open_shard(path)


def _read(path: str, fmt: str, root: str | None) -> Checkpoint:
    try:
        with collection_paused():
            return _read_format(path, fmt, root)
    except OSError as e:
        raise CkptError(f"{path}: cannot read ({e.strerror or e})") from None


def _read_format(path: str, fmt: str, root: str | None) -> Checkpoint:
    from .accelerate import read_accelerate
    from .dcp import read_dcp
    from .deepspeed import read_deepspeed
    from .safetensors import read_safetensors
    from .sharded import find_index, read_index
    from .torch_legacy import read_torch_legacy
    from .torch_zip import read_torch_zip

    if fmt == "dcp":
        return read_dcp(path, root)
    if fmt == "accelerate":
        return read_accelerate(path, root, _model_file)
    if fmt == "deepspeed":
        return read_deepspeed(path)
    if fmt == "folder":
        return _model_file(find_index(path))
    if fmt == "index":
        return read_index(path, _open_shard)
    if fmt == "safetensors":
        return read_safetensors(path)
    if fmt == "torch-legacy":
        return read_torch_legacy(path, root)
    return read_torch_zip(path, root)


__all__ = ["Checkpoint", "CkptError", "MappedFile", "Storage", "TensorRef", "detect_format", "open_checkpoint"]
