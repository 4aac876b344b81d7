"""Reading: detect a checkpoint's format from its bytes (formats.py) and read it into a lazy table."""

from __future__ import annotations

import os

from ..errors import CkptError
from .formats import Format, OutputFormat, detect_format, is_remote
from .model import Checkpoint, MappedFile, Storage, TensorRef, collection_paused



def open_checkpoint(path: str, root: str | None = None) -> Checkpoint:
    """Read a checkpoint's structure (no tensor data). `root`: None detects the state dict in a
    nested .pth, '' takes the top level, a key takes that entry."""
    path = os.fspath(path)
    if is_remote(path):  # a URL or hf://: io/remote.py, imported only then
        from .remote import read_remote

        with collection_paused():
            return read_remote(path, root)
    spec = detect_format(path).spec
    if root and not spec.takes_root:  # its state dict is the whole checkpoint
        raise CkptError(f"{path}: --root {root!r}: a {spec.flat} holds one flat state dict, with nothing "
                        f"nested to choose; --root applies to .pth files (omit it, or give --root '')")
    return spec.read(path, root)


__all__ = ["Checkpoint", "CkptError", "Format", "MappedFile", "OutputFormat", "Storage", "TensorRef", "detect_format",
           "open_checkpoint"]
