"""Reader for torch's zip format (torch.save since 1.6): `<archive>/data.pkl` holds the object
graph, `<archive>/data/<key>` the raw bytes of each storage, stored uncompressed."""

from __future__ import annotations

import io
import struct
import zipfile
import zlib

from ..errors import CkptError
from .model import INT64_MAX, Checkpoint, MappedFile, Storage
from .tree import find_root
from .pickled import Global, InertGlobal
from .unpickler import StorageHandle, brief, describe_pid, is_device, safe_load

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
        if not (isinstance(kind, Global) and kind.kind == "storage"):
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
    return Checkpoint(path, "torch-zip", tensors, root_key, obj, sources=[source], others=others, events=events)


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
