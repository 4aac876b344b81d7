"""Reader for torch's pre-1.6 format (`_use_new_zipfile_serialization=False`): a run of
pickles (magic number, protocol, system info, the object, the storage keys), then each
storage as an int64 element count followed by its bytes."""

from __future__ import annotations

import struct

from ..errors import CkptError
from .formats import Format
from .model import Checkpoint, MappedFile
from .torch_zip import storage_loader
from .tree import find_root
from .unpickler import BoundedReader, brief, safe_load

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001
_COUNT = struct.Struct("<q")


def _no_persistent(pid):
    raise CkptError("unexpected persistent record in the file header")


def read_torch_legacy(path: str, root: str | None) -> Checkpoint:
    source = MappedFile(path)
    reader = BoundedReader(source.buffer())
    events: list = []  # placeholders of every pickle in the file, not only the object's

    def load(persistent_load=_no_persistent):
        value, happened = safe_load(reader, persistent_load, path)
        events.extend(happened)
        return value

    magic = load()
    if type(magic) is not int or magic != MAGIC_NUMBER:
        raise CkptError(f"{path}: a pickle, but not a torch checkpoint (no torch magic number)")
    protocol = load()
    if type(protocol) is not int or protocol != PROTOCOL_VERSION:
        raise CkptError(f"{path}: unsupported legacy protocol version {brief(protocol, 20)!r}")
    sys_info = load()
    if type(sys_info) is dict and sys_info.get("little_endian") is False:
        raise CkptError(f"{path}: saved on a big-endian machine, which is not supported")
    storage_load, storages = storage_loader(path, lambda key, storage: None, legacy=True)
    obj = load(storage_load)
    keys = load()
    position = reader.position
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise CkptError(f"{path}: the storage key list is malformed")
    for key in keys:
        count = _COUNT.unpack(source.view(position, _COUNT.size))[0]
        handle = storages.get(key)
        if handle is None:
            raise CkptError(f"{path}: data for storage {key[:40]!r}, which nothing refers to")
        if count != handle.numel:
            raise CkptError(f"{path}: storage {key[:40]!r} holds {count} elements, its record says {handle.numel}")
        storage = handle.storage
        if storage.source is not None:
            raise CkptError(f"{path}: data for storage {key[:40]!r} appears twice")
        storage.source, storage.offset = source, position + _COUNT.size
        source.view(storage.offset, storage.nbytes)  # checks it lies inside the file
        position = storage.offset + storage.nbytes
    missing = sorted(k for k, h in storages.items() if h.storage.source is None)
    if missing:
        raise CkptError(f"{path}: no data for storages {', '.join(missing[:5])} (truncated file?)")
    root_key, tensors, others = find_root(obj, root, path)
    return Checkpoint(path, Format.TORCH_LEGACY, tensors, root_key, obj, sources=[source], others=others, events=events)
