"""What torch's DCP loader unpickles without restriction, read by the restricted unpickler:
`.metadata` (torch's FileSystemReader.read_metadata is a plain pickle.load) and the bytes of
values that are not torch.save archives (its loader torch.loads every value with
weights_only=False). Nothing here runs; it says what torch would run — the placeholder events a
folder's reader lists and orders (see io/dcp.py, torch_zip.check_not_more_executable)."""

from __future__ import annotations

import struct
from typing import Any

from ..errors import CkptError
from .model import MappedFile, TensorRef
from .pickled import How, InertGlobal, InertObject
from .torch_legacy import MAGIC_NUMBER, PROTOCOL_VERSION
from .torch_zip import storage_loader
from .unpickler import MetadataUnpickler, safe_load

DCP_META = "torch.distributed.checkpoint.metadata."  # the module of torch's records, as .metadata names it
STORAGE_INFO = "torch.distributed.checkpoint.filesystem._StorageInfo"


def _no_persistent_load(pid):
    raise CkptError("a persistent id where torch's loader takes none")


# ---- what torch runs: .metadata's own imports and calls --------------------------------------------
# torch's FileSystemReader.read_metadata is a plain pickle.load: every import and call `.metadata`
# makes runs. Those that build the records torch writes, the way torch writes them, neither run
# code from the file nor fail, and are left out; every other one — a payload in a field no reader
# looks at, a getattr/import_module chain, a record built so that torch's load of it fails — is
# an event of the folder: listed by inspect, and met first by an unsafe load (torch reads
# .metadata before any value), see torch_zip.check_not_more_executable.

_RECORDS = frozenset([DCP_META + name for name in ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata",
                                                "ChunkStorageMetadata", "MetadataIndex", "StorageMeta")]
                     + [STORAGE_INFO])  # dataclasses: NEWOBJ, then BUILD with a dict of fields
_PROPERTIES = DCP_META + "TensorProperties"  # NEWOBJ, then BUILD with the 5-tuple of its __getstate__
_MEMORY_FORMAT = DCP_META + "_MEM_FORMAT_ENCODING"
_LAYOUTS = frozenset(f"torch.{name}" for name in ("strided", "sparse_coo", "sparse_csr", "sparse_csc", "sparse_bsr",
                                                  "sparse_bsc", "_mkldnn", "jagged"))
_PATHS = frozenset(f"{module}.{name}" for module in ("pathlib", "pathlib._local")
                   for name in ("PosixPath", "PurePosixPath"))  # StorageMeta.checkpoint_id


def _text_args(args: tuple) -> bool:
    return all(type(a) is str for a in args)


# callee -> whether torch makes a call with these arguments without fail
_CALLS = {
    "torch.serialization._get_layout": lambda args: len(args) == 1 and type(args[0]) is str and args[0] in _LAYOUTS,
    _MEMORY_FORMAT: lambda args: len(args) == 1 and type(args[0]) is int and 0 <= args[0] <= 2,
    **{name: _text_args for name in _PATHS},
}
_IMPORTS = _RECORDS | {_PROPERTIES, "pathlib.WindowsPath", "pathlib._local.WindowsPath", *_CALLS,
                       *(f"torch.{name}" for name in ("strided", "contiguous_format", "channels_last",
                                                      "channels_last_3d", "preserve_format"))}


def _torch_made(event: Any, own: dict[int, str]) -> bool:
    """Whether `event` is one of the imports and calls of a `.metadata` as torch writes it (`own`:
    the names of the placeholders of _IMPORTS, by id)."""
    if id(event) in own:
        return True
    name = own.get(id(event.callee)) if type(event) is InertObject else None
    if name is None or event.listitems or event.dictitems:
        return False
    state = event.state
    if event.how is How.NEWOBJ and not event.args:
        if name in _RECORDS:
            return state is None or type(state) is dict
        if name == _PROPERTIES and type(state) is tuple and len(state) == 5:
            memory = state[3]
            return (type(memory) is InertObject and own.get(id(memory.callee)) == _MEMORY_FORMAT
                    and _torch_made(memory, own))
        return False
    check = _CALLS.get(name)
    return event.how is How.REDUCE and state is None and check is not None and check(event.args)


def payload_events(events: list) -> list:
    """The events of a `.metadata`'s pickle that are not torch's own records (see above), in order."""
    own = {id(e): e.qualname() for e in events if type(e) is InertGlobal and e.qualname() in _IMPORTS}
    records = {key for key, name in own.items() if name in _RECORDS}
    newobj = How.NEWOBJ
    # the common case inline (a record: ~5 events per key of a 100,000-key folder), the rest asked
    return [e for e in events
            if not (type(e) is InertObject and id(e.callee) in records and e.how is newobj and not e.args
                    and (e.state is None or type(e.state) is dict) and not e.listitems and not e.dictitems)
            and not _torch_made(e, own)]


class _Range:
    """Bytes [start, end) of a mapped file, read as a file (what the unpickler reads through), as
    torch reads a value: from a BytesIO of its range. Nothing past the range is read, and a read
    longer than what is left fails before anything is allocated (as unpickler.BoundedReader)."""

    def __init__(self, buffer, start: int, end: int):
        self._buffer, self._end, self.position = buffer, end, start

    @property
    def left(self) -> int:
        return self._end - self.position

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = self.left
        if n > self.left:
            raise CkptError(f"not a valid pickle (a {n}-byte record runs past the end: truncated?)")
        data = self._buffer[self.position : self.position + n]
        self.position += n
        return data

    def readline(self) -> bytes:
        end = self._buffer.find(b"\n", self.position, self._end)
        return self.read((self._end if end < 0 else end + 1) - self.position)


_COUNT = struct.Struct("<q")
MAX_OPAQUE = 64 << 20  # bytes of a value torch cannot load, shown as they are


def legacy_value(source: MappedFile, offset: int, length: int, where: str, repeated: list[int]) -> tuple[Any, list]:
    """(value, events) of a value whose bytes are not a torch.save archive. torch.load reads them
    as torch's legacy format: a run of pickles — magic number, protocol version, system info, the
    object, its storage keys — each unpickled unrestricted, the next only if the one before is
    what torch expects (or may compare equal to it: what a placeholder built), then the storages.
    Every pickle torch would unpickle is read here by the restricted unpickler and its events
    kept, up to the end of the bytes (there torch fails before it runs anything more). The value
    is the object where the bytes are that format, else the bytes (torch's load fails on them)."""
    if not length:
        return b"", []
    reader = _Range(source.buffer(), offset, offset + length)
    storage_load, storages = storage_loader(where, lambda key, storage: None, legacy=True, repeated=repeated)
    events: list = []
    pickles: list = []
    for persistent_load in (_no_persistent_load,) * 3 + (storage_load, _no_persistent_load):
        if not reader.left:
            break
        value, happened = safe_load(reader, persistent_load, f"{where}: its bytes, which torch's loader unpickles "
                                                             f"unrestricted", MetadataUnpickler)
        events += happened
        pickles.append(value)
        if len(pickles) <= 2 and not _may_equal(value, (MAGIC_NUMBER, PROTOCOL_VERSION)[len(pickles) - 1]):
            break
    if len(pickles) < 5 or not (type(pickles[0]) is int and pickles[0] == MAGIC_NUMBER
                                and type(pickles[1]) is int and pickles[1] == PROTOCOL_VERSION):
        if length > MAX_OPAQUE:  # never held in memory: torch's own load of it fails anyway
            raise CkptError(f"{where}: a value of {length} bytes that is neither a torch.save archive nor "
                            f"torch's legacy format (torch's loader fails on it too); refused")
        return bytes(source.view(offset, length)), events
    _place_storages(source, reader.position, offset + length, pickles[4], storages, where)
    return pickles[3], events


def _may_equal(value: Any, number: int) -> bool:
    """Whether torch's `value != number` may be False: for a number, when it equals; for what a
    placeholder built (or a tensor), whatever its code decides."""
    if type(value) in (int, float, bool, complex):
        return value == number
    return isinstance(value, (InertObject, InertGlobal, TensorRef))


def _place_storages(source: MappedFile, position: int, end: int, keys: Any, storages: dict, where: str) -> None:
    """Where the storages of a legacy-format value lie: after its pickles, in the order of `keys`,
    each an int64 element count and then its bytes, all before `end` (as io/torch_legacy.py)."""
    if type(keys) is not list or not all(type(k) is str for k in keys):
        raise CkptError(f"{where}: a legacy torch file whose storage key list is malformed")
    for key in keys:
        handle = storages.get(key)
        if handle is None:
            raise CkptError(f"{where}: data for storage {key[:40]!r}, which nothing refers to")
        if position + _COUNT.size > end:
            raise CkptError(f"{where}: no data for storage {key[:40]!r} (truncated?)")
        count = _COUNT.unpack(source.view(position, _COUNT.size))[0]
        storage = handle.storage
        if count != handle.numel or storage.source is not None:
            raise CkptError(f"{where}: storage {key[:40]!r} holds {count} elements, its record says {handle.numel}"
                            if count != handle.numel else f"{where}: data for storage {key[:40]!r} appears twice")
        storage.source, storage.offset = source, position + _COUNT.size
        position = storage.offset + storage.nbytes
        if position > end:
            raise CkptError(f"{where}: storage {key[:40]!r} runs past the end of its byte range")
    missing = sorted(k for k, h in storages.items() if h.storage.source is None)
    if missing:
        raise CkptError(f"{where}: no data for storages {', '.join(missing[:5])} (truncated?)")
