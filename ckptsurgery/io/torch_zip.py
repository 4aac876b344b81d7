"""torch's zip format (torch.save since 1.6): `<archive>/data.pkl` holds the object graph,
`<archive>/data/<key>` the raw bytes of each storage, stored uncompressed. Read with the
restricted unpickler; written (a .pth output, each value of a DCP output) as torch.save would."""

from __future__ import annotations

import io
import struct
import zipfile
import zlib
from collections import OrderedDict
from typing import Any, BinaryIO

from ..dtypes import DType
from ..errors import CkptError
from .formats import Format
from .model import INT64_MAX, Checkpoint, MappedFile, Storage, TensorRef, collection_paused
from .pickled import Global, GlobalKind, InertGlobal
from .pickler import PickleRefused, TorchPickler
from .tensors import cast_bytes
from .tree import find_root
from .unpickler import StorageHandle, brief, describe_pid, is_device, safe_load
from .write import Progress, _chunks, _storage_chunks, cast_target
from .zipwriter import SMALL_RECORD, ZipWriter

_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, ..., name length, extra length
_MAX_PICKLE = 1 << 30
# what zipfile raises on a damaged archive (RuntimeError: an "encrypted" flag bit set)
_ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError, NotImplementedError,
               RuntimeError, zlib.error, struct.error)


def storage_loader(where: str, locate, legacy: bool = False, repeated: list[int] | None = None):
    """A persistent_load for torch's `('storage', type, key, location, numel)` records.
    `locate(key, storage)` fills in where the storage's bytes lie. Storages are shared by
    key; records naming one key must agree. `legacy`: the legacy format's records also carry a
    sixth field (None), and `('module', class, file, source)` records stand for the (inert)
    class itself."""
    storages: dict[str, StorageHandle] = {}
    devices: set[str] = set()  # locations already checked ("cpu"): one regex match per device, not per storage
    repeated = [0] if repeated is None else repeated  # bytes the file's views repeat, shared by its storages

    def load(pid):
        if legacy and len(pid) == 4 and pid[0] == "module" and isinstance(pid[1], InertGlobal):
            return pid[1]  # the class's source code in the record is never looked at
        # the legacy format adds a sixth field, view metadata of pre-1.0 storages: always None since
        if not (len(pid) in ((5, 6) if legacy else (5,)) and pid[0] == "storage"):
            raise CkptError(f"a persistent id that is not a storage record ({describe_pid(pid)})")
        if len(pid) == 6 and pid[5] is not None:
            raise CkptError("storage views of the pre-1.0 format are not supported")
        _, kind, key, location, numel = pid[:5]
        if not (isinstance(kind, Global) and kind.kind is GlobalKind.STORAGE):
            name = kind.qualname() if isinstance(kind, InertGlobal) else type(kind).__name__
            raise CkptError(f"unknown storage type {name} (a dtype ckptsurgery does not know)")
        if not (type(key) is str and type(location) is str and type(numel) is int and 0 <= numel <= INT64_MAX):
            raise CkptError(f"bad storage record for key {brief(key)!r}")
        if location not in devices:
            if not is_device(location):
                raise CkptError(f"storage {key[:40]!r} is on device {location[:40]!r}, which torch does not know")
            devices.add(location)
        nbytes = numel * (kind.dtype.itemsize if kind.dtype else 1)
        first = storages.get(key)
        if first is None:
            storage = Storage(None, -1, nbytes, key, location)
            locate(key, storage)
            first = storages[key] = StorageHandle(storage, kind.dtype, numel, repeated)
        elif first.storage.nbytes != nbytes:  # torch would take the first record's size: ambiguous
            raise CkptError(f"storage {key[:40]!r} is recorded twice with different sizes")
        return first  # as torch: the first record of a key decides its type (a view as another dtype)

    return load, storages


class _Window(io.RawIOBase):
    """A read-only, seekable file over a memoryview: zipfile reads an archive that lies inside a
    bigger file (a DCP chunk) without its bytes being copied."""

    def __init__(self, view: memoryview):
        self._view, self._pos = view, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = max(0, min(len(buffer), len(self._view) - self._pos))
        buffer[:n] = self._view[self._pos : self._pos + n]
        self._pos += n
        return n

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: len(self._view)}[whence]
        if base + offset < 0:
            raise ValueError("negative seek position")
        self._pos = base + offset
        return self._pos

    def tell(self) -> int:
        return self._pos


def read_torch_zip(path: str, root: str | None) -> Checkpoint:
    source = MappedFile(path)
    obj, events = load_torch_zip(source, 0, source.size, path)
    root_key, tensors, others = find_root(obj, root, path)
    return Checkpoint(path, Format.TORCH_ZIP, tensors, root_key, obj, sources=[source], others=others, events=events)


def load_torch_zip(source: MappedFile, start: int, length: int, where: str, repeated: list[int] | None = None):
    """The object and placeholder events of the torch.save archive at bytes [start,
    start + length) of `source`; its storages point into `source`. `repeated`: the count of
    bytes that views repeat, when several archives share one allowance (a DCP folder)."""
    path = where
    try:
        archive = zipfile.ZipFile(_Window(source.view(start, length)))
    except _ZIP_ERRORS as e:
        raise CkptError(f"{path}: broken zip archive ({e})") from None
    with archive:
        entries = {info.filename: info for info in archive.infolist()}
        if len(entries) != len(archive.infolist()):
            # torch's reader and zipfile pick different copies of a repeated name: what torch
            # loads could differ from what we list
            raise CkptError(f"{path}: the zip archive holds two records with one name; refused")
        if any(n.endswith("/constants.pkl") or "/code/" in n for n in entries):
            raise CkptError(f"{path}: a TorchScript archive (torch.jit.save), not a torch.save "
                            f"checkpoint; load it with torch.jit.load and save its state_dict()")
        pickles = [n for n in entries if n.endswith("data.pkl") and n.count("/") <= 1]
        if len(pickles) != 1:
            raise CkptError(f"{path}: a zip file without a torch data.pkl record")
        prefix = pickles[0][: -len("data.pkl")]

        def read_record(info: zipfile.ZipInfo) -> bytes:
            if info.file_size > min(_MAX_PICKLE, length):
                raise CkptError(f"{path}: {info.filename} claims {info.file_size} bytes, more than the file holds")
            try:
                return archive.read(info)
            except _ZIP_ERRORS as e:
                raise CkptError(f"{path}: cannot read {info.filename} ({e})") from None

        byteorder = entries.get(prefix + "byteorder")
        if byteorder is not None and read_record(byteorder).strip() not in (b"little", b""):
            raise CkptError(f"{path}: saved on a big-endian machine, which is not supported")

        def locate(key: str, storage: Storage) -> None:
            info = entries.get(f"{prefix}data/{key}")
            if info is None:
                raise CkptError(f"storage record data/{key} is missing from the archive")
            if info.compress_type != zipfile.ZIP_STORED:
                raise CkptError(f"storage record data/{key} is compressed; torch never writes that")
            if info.file_size < storage.nbytes:
                raise CkptError(f"storage record data/{key} holds {info.file_size} bytes, "
                                f"shorter than its {storage.nbytes}-byte tensor")
            header_at = start + info.header_offset
            if not 0 <= info.header_offset <= length - _LOCAL_HEADER.size:
                raise CkptError(f"storage record data/{key} has its header outside the archive")
            signature, name_len, extra_len = _LOCAL_HEADER.unpack(source.view(header_at, _LOCAL_HEADER.size))
            local_name = source.view(header_at + _LOCAL_HEADER.size, name_len)
            if signature != b"PK\x03\x04" or bytes(local_name) != info.filename.encode("utf-8"):
                # a central entry pointing at another record's header: torch and we would differ
                raise CkptError(f"storage record data/{key} has a broken local header")
            storage.source = source
            storage.offset = header_at + _LOCAL_HEADER.size + name_len + extra_len
            if storage.offset + storage.nbytes > start + length:
                raise CkptError(f"storage record data/{key} runs past the end of the archive")

        data = read_record(entries[pickles[0]])
        load, _ = storage_loader(path, locate, repeated=repeated)
        # data.pkl is in memory: io.BytesIO reads in C, and never allocates more than is left
        return safe_load(io.BytesIO(data), load, path)


# ---- writing ---------------------------------------------------------------------------------

ARCHIVE = "archive"  # the inner folder's name; torch.save would use the output's file name
SMALL_BATCH = 1000  # small storages handed to the zip writer at once


def write_torch(f: BinaryIO, obj: Any, cast: DType | None = None, progress: Progress | None = None,
                cast_only: dict[str, TensorRef] | None = None, inputs: list[list] | None = None) -> list:
    """Pickle `obj` (tensor references anywhere inside) into torch's zip format. Each storage is
    written once, as torch would write it: a typed storage for the dtypes that have one, an
    UntypedStorage (and `_rebuild_tensor_v3` with each tensor's own dtype) for the others.
    `cast` applies to the storages of `cast_only`'s tensors (the state dict), never to what lies
    outside it (an optimizer's step counts). `inputs`: each input's placeholder events — see
    `check_not_more_executable`. Returns the placeholder events the archive holds, in order."""
    castable = castable_storages(cast_only or {}) if cast else set()
    # storage (hashed by identity: no id() made per storage) -> (storage, key, dtype read, dtype
    # written, its record when a typed storage)
    storages: dict[Storage, tuple[Storage, str, DType, DType, tuple | None]] = {}

    def storage_record(t: TensorRef) -> tuple[str, str, str, int, DType]:
        entry = storages.get(t.storage)
        if entry is None:
            storage, key = t.storage, str(len(storages))
            written = cast_target(t.dtype, cast) if id(storage) in castable else t.dtype
            typed = None  # a typed storage's record: the same for every tensor viewing it, made once
            if written.storage:
                typed = key, "torch", written.storage, storage.nbytes // t.dtype.itemsize, written
            entry = storages[storage] = (storage, key, t.dtype, written, typed)
        storage, key, read_as, write_as, typed = entry
        if read_as is not t.dtype and (write_as is not read_as or read_as.storage or t.dtype.storage):
            raise CkptError(f"storage {storage.key[:40]!r} is viewed as both {read_as.name} and {t.dtype.name}: "
                            f"torch cannot write that as typed storages" + ("; convert without --dtype" if cast else ""))
        if typed:
            return typed
        return key, "torch.storage", "UntypedStorage", _written_size(storage, read_as, write_as), t.dtype

    pickler = TorchPickler(storage_record)
    # 200 000 tensors: as many records and memo entries made and kept, which the collector would
    # rescan again and again for nothing (see collection_paused). Not the bytes' writing below: a
    # computed tensor (a merge's) is computed there, and whatever garbage it leaves is collected
    with collection_paused():
        data_pkl = pickler.dumps(obj)
    if inputs is not None:
        check_not_more_executable(pickler.events, inputs)
    archive = ZipWriter(f)
    archive.add_bytes(f"{ARCHIVE}/data.pkl", data_pkl)
    archive.add_bytes(f"{ARCHIVE}/.format_version", b"1")
    archive.add_bytes(f"{ARCHIVE}/.storage_alignment", b"64")
    archive.add_bytes(f"{ARCHIVE}/byteorder", b"little")
    small = []  # storages written as they are read, in order, until the next one that is not
    mapped: dict[int, memoryview] = {}  # id(input) -> its whole map: a slice a storage, not three calls
    for storage, key, read_as, write_as, _ in storages.values():
        if write_as is read_as and storage.nbytes <= SMALL_RECORD:  # the common case, in one step
            source, start, nbytes = storage.source, storage.offset, storage.nbytes
            if type(source) is MappedFile and 0 <= start and 0 < nbytes and start + nbytes <= source.size:
                whole = mapped.get(id(source))
                if whole is None:
                    whole = mapped[id(source)] = memoryview(source.buffer())
                view = whole[start : start + nbytes]
            else:
                view = storage.view()  # (and its errors)
            small.append((f"{ARCHIVE}/data/{key}", view))
            if len(small) == SMALL_BATCH:  # not a name and a view held for each of 200 000 storages
                archive.add_small(small)
                small.clear()
            if progress:
                progress(storage.nbytes)
            continue
        archive.add_small(small)
        small.clear()
        if write_as is read_as:
            chunks = _storage_chunks(storage, progress)
        else:
            chunks = _chunks(cast_bytes(storage.view(), read_as, write_as), progress)
        archive.add(f"{ARCHIVE}/data/{key}", chunks, _written_size(storage, read_as, write_as))
    archive.add_small(small)
    archive.add_bytes(f"{ARCHIVE}/version", b"3\n")
    archive.close()
    return pickler.events


def castable_storages(tensors: dict[str, TensorRef]) -> set[int]:
    """The storages --dtype casts in a .pth output: those of the floating tensors, unless the
    storage also backs something that must not change under it (an integer tensor, a quantized
    tensor's scales). Ids of `Storage` objects."""
    chosen = list(tensors.values())
    castable = {id(t.storage) for t in chosen if t.dtype.floating}
    castable -= {id(t.storage) for t in chosen if not t.dtype.floating}
    castable -= {id(p.storage) for t in chosen if t.quant and t.quant.axis is not None
                 for p in (t.quant.scale, t.quant.zero_point)}
    return castable


def _written_size(storage: Storage, read_as: DType, write_as: DType) -> int:
    """A storage's bytes as written: all of them, or as many elements in the cast dtype."""
    return storage.nbytes if write_as is read_as else storage.nbytes // read_as.itemsize * write_as.itemsize


def check_not_more_executable(written: list, inputs: list[list]) -> None:
    """An unsafe torch.load imports globals and makes calls in the order it meets them, and
    stops at the first that fails — an import of a class the user does not have, a call that
    raises. So no placeholder the output keeps may be reached without first passing every
    placeholder import and call that the input's load makes before it: a rewrite that drops or
    reorders those (a pickled module replaced by its state dict, a dropped entry, a renamed key
    moved) could reach code that the input's load never did. `written` and each list of
    `inputs` (one per source file) are placeholder events (InertGlobal imports, InertObject
    calls) in order."""
    for events in inputs:
        position = {id(e): i for i, e in enumerate(events)}
        met: set[int] = set()
        prefix = 0  # events[:prefix] have all been met in the output already
        for event in written:
            if id(event) not in position:
                continue
            while prefix < len(events) and id(events[prefix]) in met:
                prefix += 1
            if position[id(event)] > prefix:
                raise PickleRefused(
                    f"a .pth output would reach {_event_name(event)} without first passing "
                    f"{_event_name(events[prefix])}, where an unsafe torch.load of the input may stop; "
                    f"write .safetensors, or keep what comes before it")
            met.add(id(event))


def _event_name(event) -> str:
    if isinstance(event, TensorRef):
        return "a tensor's attributes"
    return event.qualname() + ("" if isinstance(event, InertGlobal) else "(...)")


def torch_payload(checkpoint, tensors: dict[str, TensorRef], keep_metadata: bool = True,
                  others: dict[str, Any] | None = None) -> Any:
    """The object a .pth output holds: the original object with its root replaced by the state
    dict — `tensors`, and `others` (the root's non-tensor entries, `_extra_state`; by default
    the checkpoint's own) in the original order where their names are unchanged — with
    everything else carried through, or just the state dict. `keep_metadata`: keep the state
    dict's `_metadata` (module versions by module name) — wrong once keys are renamed."""
    others = checkpoint.others if others is None else others
    obj, root = checkpoint.obj, checkpoint.root
    if obj is None and not others and type(tensors) is OrderedDict and not vars(tensors):
        return tensors  # nothing around it or beside it (a .safetensors input): as it is, not copied
    original = obj if root == "" else obj.get(root) if type(obj) in (dict, OrderedDict) and root else None
    state = OrderedDict()
    if others and type(original) in (dict, OrderedDict):
        for key in original:
            if type(key) is str and (key in tensors or key in others):
                state[key] = tensors[key] if key in tensors else others[key]
    state.update(tensors)  # in one call: a tensor placed above keeps its place, and is the same one
    for key, value in others.items():
        if key not in state:
            state[key] = value
    if keep_metadata and type(original) is OrderedDict and "_metadata" in vars(original):
        state._metadata = original._metadata  # load_state_dict reads module versions from it
    if type(original) is dict:  # a plain dict stays one
        state = dict(state)
    if obj is None or root == "" or type(obj) not in (dict, OrderedDict):
        return state
    out = type(obj)()
    for key, value in obj.items():
        out[key] = state if key == root else value
    if type(obj) is OrderedDict and "_metadata" in vars(obj):
        out._metadata = obj._metadata
    return out
