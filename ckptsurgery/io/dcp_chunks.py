"""The tensors of a DCP folder's chunks, read when their bytes are asked for (io/dcp.py lists a
folder from `.metadata` alone): a tensor's storage whose place is found, and each chunk held to
the metadata, on first use (ChunkStorage); a tensor of several chunks put together (chunked);
and torch.save's one-tensor archives read without zipfile where they are laid out as torch lays
them out (lean_archive) — anything else by torch_zip.load_torch_zip, which says what is wrong.
Besides: a value's bytes in torch's legacy format (legacy_value), and the table of one-chunk
tensors made as `.metadata` is read, with no table of its records (Stream, read_streaming)."""

from __future__ import annotations

import io
import struct
import threading
import zlib
from typing import TYPE_CHECKING, Any

from ..dtypes import QUANTIZED
from ..errors import CkptError
from .dcp_pickles import BYTES, Restart, Unfollowed, fast_metadata
from .formats import Format
from .model import (
    Checkpoint, JoinedSource, MappedFile, Storage, TensorRef, computed_tensor, contiguous_strides, numel_of,
)
from .pickled import InertGlobal, InertObject
from .torch_legacy import MAGIC_NUMBER, PROTOCOL_VERSION
from .torch_zip import storage_loader
from .tree import find_root, place_in_tree
from .unpickler import MetadataUnpickler, safe_load

if TYPE_CHECKING:
    from .dcp import _Reader

MAX_ASSEMBLED_DIMS = 64  # torch indexes at most this many dimensions
_RESOLVING = threading.RLock()  # writer threads (--jobs) may ask for one chunk at once


def _pending_slot(name: str) -> property:
    """A Storage field that is known once the chunk is read: reading it reads the chunk."""
    slot = Storage.__dict__[name]

    def get(self):
        if self._group is not None:
            self._resolve()
        return slot.__get__(self, Storage)

    return property(get, slot.__set__)


_SOURCE, _OFFSET, _KEY, _LOCATION = (Storage.__dict__[name] for name in ("source", "offset", "key", "location"))


class ChunkGroup:
    """What the one-chunk tensors of a folder share where their dtype, sizes and the path
    before their last step are the same (_Reader.lazy_chunk): a ChunkStorage of one keeps its
    place in its own unread fields (source: the data file, offset, key: the length, location:
    the last step of its path), not in a tuple of its own (~100 B a key at 100,000 keys)."""

    __slots__ = ("reader", "dtype", "sizes", "prefix")

    def __init__(self, reader: _Reader, dtype, sizes: tuple[int, ...], prefix: str):
        self.reader, self.dtype, self.sizes, self.prefix = reader, dtype, sizes, prefix


class ChunkStorage(Storage):
    """The bytes of a tensor held in DCP chunks, whose size the metadata gives: where they lie
    (`source`, `offset`, and the chunk's storage `key` and `location`) is found when first asked
    for — each chunk's archive opened and held to every check of _Reader.chunk then, before any
    byte is used. Listing a folder never asks (dtype and shape are the metadata's).
    `_pending`: what reads it, (function, *arguments) -> (source, offset, key, location), None
    once read; kept as that tuple, or (one chunk: see ChunkGroup) as its group and the fields."""

    __slots__ = ("_group",)
    source = _pending_slot("source")
    offset = _pending_slot("offset")
    key = _pending_slot("key")
    location = _pending_slot("location")

    def __init__(self, nbytes: int, pending: tuple):
        self.nbytes = nbytes
        self._group = pending

    @classmethod
    def of_chunk(cls, nbytes: int, group: ChunkGroup, source: MappedFile, offset: int, length: int,
                 step) -> "ChunkStorage":
        """The storage of a one-chunk tensor: read_chunk(reader, source, offset, length, dtype,
        sizes, key), the key being the group's prefix and `step`."""
        made = cls.__new__(cls)
        made.nbytes, made._group = nbytes, group
        _SOURCE.__set__(made, source)
        _OFFSET.__set__(made, offset)
        _KEY.__set__(made, length)
        _LOCATION.__set__(made, step)
        return made

    def unplaced(self) -> bool:
        """Whether a one-chunk storage made before its place was read (of_chunk with no place:
        io/dcp.py's streaming) has it yet."""
        return _OFFSET.__get__(self, Storage) is None

    def place(self) -> tuple:
        """(source, offset, length) of a one-chunk storage not read yet."""
        return _SOURCE.__get__(self, Storage), _OFFSET.__get__(self, Storage), _KEY.__get__(self, Storage)

    def set_place(self, source, offset: int, length: int) -> None:
        _SOURCE.__set__(self, source)
        _OFFSET.__set__(self, offset)
        _KEY.__set__(self, length)

    @property
    def _pending(self) -> tuple | None:
        group = self._group
        if type(group) is not ChunkGroup:
            return group
        step = _LOCATION.__get__(self, Storage)
        return (read_chunk, group.reader, _SOURCE.__get__(self, Storage), _OFFSET.__get__(self, Storage),
                _KEY.__get__(self, Storage), group.dtype, group.sizes,
                group.prefix + step if type(step) is str else f"{group.prefix}{step}")

    def _resolve(self) -> None:
        with _RESOLVING:
            group = self._group
            if group is None:  # another thread read it meanwhile
                return
            if type(group) is ChunkGroup:  # (what _pending gives, without the tuple)
                step = _LOCATION.__get__(self, Storage)
                fields = read_chunk(group.reader, _SOURCE.__get__(self, Storage), _OFFSET.__get__(self, Storage),
                                    _KEY.__get__(self, Storage), group.dtype, group.sizes,
                                    group.prefix + step if type(step) is str else f"{group.prefix}{step}")
            else:
                fields = group[0](*group[1:])
            for slot, value in zip((_SOURCE, _OFFSET, _KEY, _LOCATION), fields):
                slot.__set__(self, value)
            self._group = None


def short(key: str, limit: int = 200) -> str:
    """A key as an error line names it."""
    return key if len(key) <= limit else key[: limit - 3] + "..."


def chunked(reader: _Reader, key: str, dtype, size: tuple[int, ...], pieces: list) -> TensorRef:
    """The tensor of `pieces` ((offsets, sizes, place) of each chunk: checked to fit and to tile
    the tensor), each chunk read when the tensor's bytes are (ChunkStorage)."""
    if len(pieces) == 1 and pieces[0][1] == size:  # saved from one process: the chunk is the tensor
        return reader.lazy_chunk(pieces[0][2], dtype, size, key)
    chunks = [(offsets, sizes, reader.lazy_chunk(place, dtype, sizes, key)) for offsets, sizes, place in pieces]
    if _rows(chunks, size):  # split along the first dimension only (FSDP): the chunks' bytes in order
        ordered = [chunk for _, _, chunk in sorted(chunks, key=lambda piece: piece[0][0])]
        nbytes = sum(chunk.nbytes for chunk in ordered)
        if nbytes != numel_of(size) * dtype.itemsize:
            raise CkptError(f"pieces of {nbytes} bytes for a {dtype.name} tensor of shape {list(size)}")
        storage = ChunkStorage(nbytes, (_joined, chunks, ordered))
        return TensorRef(storage, 0, size, contiguous_strides(size), dtype)
    where = f"{reader.folder}: {short(key)}"
    if dtype.packed > 1 or dtype.per_byte > 1 or dtype.kind == QUANTIZED or len(size) > MAX_ASSEMBLED_DIMS:
        raise CkptError(f"{where}: a {dtype.name} tensor of {len(size)} dimensions in several chunks, which "
                        f"ckptsurgery cannot put together")

    def make():
        from .tensors import assemble

        _read_all(chunks)
        try:
            return assemble(size, dtype, [(o, s, t.data()) for o, s, t in chunks if numel_of(s)])
        except CkptError as e:
            raise CkptError(f"{where}: {e}") from None

    return computed_tensor(size, dtype, make)


def _read_all(chunks: list) -> None:
    """Open and check every chunk of a tensor, the empty ones too, before any of its bytes are
    used (as when chunks were read with the folder)."""
    for _, _, chunk in chunks:
        _ = chunk.storage.source  # (reads it)


def _joined(chunks: list, ordered: list) -> tuple:
    """Where the bytes of a tensor split into whole rows lie: its chunks' ranges in order."""
    _read_all(chunks)
    source = JoinedSource([(t.storage.source, *t.byte_range()) for t in ordered])
    return source, 0, "", "cpu"


def _rows(pieces: list, size: tuple[int, ...]) -> bool:
    """Whether chunks are whole rows of the tensor, one after another from row 0 to the last
    (how FSDP and Shard(0) split): their bytes laid end to end are the tensor's."""
    if not size:
        return False
    row = 0
    for offsets, sizes, _ in sorted(pieces, key=lambda piece: piece[0][0]):
        if offsets[0] != row or any(offsets[1:]) or sizes[1:] != size[1:]:
            return False
        row += sizes[0]
    return row == size[0]


def read_chunk(reader: _Reader, source: MappedFile, offset: int, length: int, dtype, sizes: tuple[int, ...],
               key: str) -> tuple:
    """(source, offset, key, location) of a chunk's bytes, read and checked (_Reader.chunk)."""
    chunk = reader.chunk(f"{reader.folder}: {short(key)}", (source, offset, length), dtype, sizes)
    storage = chunk.storage
    return storage.source, chunk.byte_range()[0], storage.key, storage.location


# ---- chunk archives, read without zipfile ----------------------------------------------------------
# A folder of 100 000 chunks opens 100 000 archives when its bytes are read: zipfile and the
# restricted unpickler take ~150 µs an archive. torch.save lays out a one-tensor archive the same
# way every time, and chunks of one dtype and shape hold the same data.pkl byte for byte: where
# an archive is laid out exactly so (lean_archive: the records zipfile and load_torch_zip would
# read, their CRCs, names and local headers, checked as they check them) and its data.pkl has
# been read once by load_torch_zip into one plain tensor on one storage record (template_of), the
# tensor is that one on this archive's record (lean_storage: located as torch_zip's locate does).
# Anything else, or any check failing, and load_torch_zip reads the archive, and says what is wrong.

_EOCD = struct.Struct("<4s4H2LH")  # zipfile's structEndArchive
_LOCATOR = struct.Struct("<4sLQL")  # structEndArchive64Locator
_EOCD64 = struct.Struct("<4sQ2H2L4Q")  # structEndArchive64
_CENTRAL = struct.Struct("<4s4B4HL2L5H2L")  # structCentralDir
_LOCAL = struct.Struct("<4s2B4HL2L2H")  # structFileHeader
_NOT_READ = 0x01 | 0x20 | 0x40  # encrypted, compressed patch, strong encryption: zipfile will not read them
_MAX_PICKLE = 1 << 30  # as torch_zip
_PRINTABLE = bytes(range(0x20, 0x7F))  # the bytes of a name zipfile and torch read alike


def lean_archive(view: memoryview) -> tuple | None:
    """(data.pkl's bytes, {name: (header offset, size, CRC)}, the archive's folder prefix) of a
    torch.save archive laid out as torch lays out one: an end record with no comment, after its
    zip64 record and locator, right after the central directory; entries stored, unencrypted,
    with printable ASCII names, no extra field or comment, none twice; one data.pkl; byteorder
    little, if there. None for anything else."""
    length = len(view)
    if length < _EOCD.size + _LOCATOR.size + _EOCD64.size:
        return None
    end = length - _EOCD.size
    sig, disk, disk_cd, _, _, size, at, comment = _EOCD.unpack_from(view, end)
    if sig != b"PK\x05\x06" or comment or disk or disk_cd:
        return None
    record = end - _LOCATOR.size - _EOCD64.size
    sig, disk, where, disks = _LOCATOR.unpack_from(view, end - _LOCATOR.size)
    if sig != b"PK\x06\x07" or disk or disks > 1 or where != record:  # (no zip64 records: zipfile's other reading)
        return None
    sig, record_size, _, _, disk, disk_cd, count, count_all, size, at = _EOCD64.unpack_from(view, record)
    if (sig != b"PK\x06\x06" or record_size != _EOCD64.size - 12 or disk or disk_cd or count != count_all
            or at + size != record):  # (zipfile's concat is 0)
        return None
    entries, pos, pickles = {}, at, []
    while pos < record:
        if pos + _CENTRAL.size > record:
            return None
        (sig, _, _, version, _, flags, method, _, _, crc, packed, size, name_len, extra_len, comment_len, _, _, _,
         header) = _CENTRAL.unpack_from(view, pos)
        name = bytes(view[pos + _CENTRAL.size : pos + _CENTRAL.size + name_len])
        pos += _CENTRAL.size + name_len
        if (sig != b"PK\x01\x02" or version > 63 or flags & _NOT_READ or method or packed != size or extra_len
                or comment_len or pos > record or name.translate(None, _PRINTABLE) or name in entries
                or name.endswith(b"/constants.pkl") or b"/code/" in name):  # (a TorchScript archive)
            return None
        entries[name] = (header, size, crc)
        if name.endswith(b"data.pkl") and name.count(b"/") <= 1:
            pickles.append(name)
    starts = sorted(header for header, _, _ in entries.values())
    if len(entries) != count or len(pickles) != 1 or len(set(starts)) != len(starts):
        return None
    following = dict(zip(starts, starts[1:] + [at]))  # where each entry must end (newer zipfiles check)
    prefix = pickles[0][: -len(b"data.pkl")]
    data = _lean_member(view, pickles[0], entries[pickles[0]], following)
    order = entries.get(prefix + b"byteorder")
    if data is None or len(data) > _MAX_PICKLE or order is not None and (
            (order := _lean_member(view, prefix + b"byteorder", order, following)) is None
            or order.strip() not in (b"little", b"")):
        return None
    return data, entries, prefix.decode()


def _lean_member(view: memoryview, name: bytes, entry: tuple, following: dict) -> bytes | None:
    """An entry's bytes as zipfile reads them (its local header, name and CRC checked, its bytes
    before the next entry), or None."""
    header, size, crc = entry
    limit = following[header]
    if header + _LOCAL.size > limit:
        return None
    sig, _, _, _, _, _, _, _, _, _, name_len, extra_len = _LOCAL.unpack_from(view, header)
    start = header + _LOCAL.size + name_len + extra_len
    if sig != b"PK\x03\x04" or bytes(view[header + _LOCAL.size : header + _LOCAL.size + name_len]) != name \
            or start + size > limit:
        return None
    data = bytes(view[start : start + size])
    return data if zlib.crc32(data) == crc else None


def template_of(value: Any, events: list, pickle: bytes, where: str) -> TensorRef | None:
    """What load_torch_zip made of a chunk's data.pkl, where every archive holding that data.pkl
    makes the same tensor on its own storage record: a plain contiguous tensor (what _Reader.chunk
    takes), no event, one storage record in the pickle. Else None."""
    if not (type(value) is TensorRef and not events and value.wrap is None and value.param_state is None
            and value.quant is None and not value.math_bits and value.is_contiguous):
        return None
    load, storages = storage_loader(where, lambda key, storage: None, repeated=[0])
    try:
        safe_load(io.BytesIO(pickle), load, where)
    except CkptError:
        return None
    return value if list(storages) == [value.storage.key] else None


def lean_storage(source: MappedFile, offset: int, length: int, lean: tuple, like: Storage) -> Storage | None:
    """The storage record `like` names, in this archive, located and checked as torch_zip's
    locate does; None where a check fails."""
    view, (_, entries, prefix) = source.view(offset, length), lean
    entry = entries.get(f"{prefix}data/{like.key}".encode())
    if entry is None or entry[1] < like.nbytes or not 0 <= entry[0] <= length - _LOCAL.size:  # (torch_zip reads
        return None  # a storage record itself: no CRC, no check of where the next entry starts)
    header = entry[0]
    sig, _, _, _, _, _, _, _, _, _, name_len, extra_len = _LOCAL.unpack_from(view, header)
    start = header + _LOCAL.size + name_len + extra_len
    name = f"{prefix}data/{like.key}".encode()
    if sig != b"PK\x03\x04" or bytes(view[header + _LOCAL.size : header + _LOCAL.size + name_len]) != name \
            or start + like.nbytes > length:
        return None
    return Storage(source, offset + start, like.nbytes, like.key, like.location)


# ---- values that are not torch.save archives: torch's legacy format -------------------------------

def _no_persistent_load(pid):
    raise CkptError("a persistent id where torch's loader takes none")


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


# ---- the table of tensors, made as .metadata is read (dcp_pickles._Fast's sink) -------------------

class _Value:
    """An entry that is not a tensor (BytesStorageMetadata), streamed: read once every place is
    known, in torch's order (Stream.finish); meanwhile its place in the tree."""

    __slots__ = ("key", "path", "place")

    def __init__(self, key: str, path: tuple):
        self.key, self.path, self.place = key, path, None


def _named(path: tuple) -> str:
    """The key a planner path names: its steps joined by dots (a list index among them too)."""
    try:
        return ".".join(path)
    except TypeError:
        return ".".join(map(str, path))


class Stream:
    """read_dcp's tensors and tree, made as fast_metadata reads `.metadata` (its sink): where
    every entry is a tensor of one chunk or a value, each path (of strings) and place read in the
    entries' order, no table of them is ever made — a tensor is made when its path is read and
    given its place when its storage record is (see dcp_pickles._Fast). What
    dcp._read_fast_with checks, it checks; any other file is a Restart (or a refusal), and
    read_dcp reads it the tables' way."""

    named = (TensorRef, _Value)  # what a storage record names, in the memo

    def __init__(self, reader: _Reader):
        self.reader, self.tree, self.order = reader, {}, []
        self.layouts: dict[int, tuple] = {}  # id(spec) -> (strides, nbytes, spec, ...): see tensor
        self.parents: dict[str, dict] = {}
        self.last: dict[Any, int] = {}  # a file's name -> the offset of the last place in it
        self.ordered = True  # each file's places in increasing order: no two keys name one range
        self.budget = [1024]  # list slots paths may make: the entries' count more (_Fast.planner sets it)

    def tensor(self, key: str, spec: Any, path: tuple) -> TensorRef:
        """The tensor of an entry (`spec`), at `path` in the tree, without its place yet."""
        laid = self.layouts.get(id(spec))
        if laid is None:
            if spec is BYTES:
                return self.value(key, path)
            if spec is None:
                raise Restart("a key's path twice")
            dtype, size, chunks = spec  # checked as read: sizes, chunks fitting and tiling the size
            if len(chunks) != 1 or chunks[0][1] != size:
                raise Restart("a tensor of several chunks")
            # (strides, nbytes, spec, dtype, size, first step -> its ChunkGroup where paths have two)
            laid = self.layouts[id(spec)] = (contiguous_strides(size), TensorRef(None, 0, size, (), dtype).nbytes,
                                             spec, dtype, size, {})
        if _named(path) != key:
            raise Restart("a planner path naming another key")
        strides, nbytes, _, dtype, size, groups = laid
        two = len(path) == 2 and type(path[1]) is str
        group = groups.get(path[0]) if two else None
        if group is None:
            group = self.reader.group(dtype, size, path[:-1])
            if two:
                groups[path[0]] = group
        made = TensorRef(ChunkStorage.of_chunk(nbytes, group, None, None, None, path[-1]), 0, size, strides, dtype)
        self.order.append(made)
        if two:  # as dcp._read_fast_with
            node = self.parents.get(path[0])
            if node is not None and path[1] not in node:
                node[path[1]] = made
                return made
        tree = self.tree
        place_in_tree(tree, path, made, self.reader.folder, self.budget)
        if two:
            self.parents[path[0]] = tree[path[0]]
        return made

    def value(self, key: str, path: tuple) -> _Value:
        """A value's entry, at `path` in the tree (itself there until it is read)."""
        if _named(path) != key:
            raise Restart("a planner path naming another key")
        made = _Value(key, path)
        self.order.append(made)
        place_in_tree(self.tree, path, made, self.reader.folder, self.budget)
        if len(path) == 2 and type(path[1]) is str:
            self.parents.setdefault(path[0], self.tree[path[0]])
        return made

    def place(self, tensor: TensorRef | _Value, offsets: Any, name: Any, offset: Any, length: Any) -> None:
        """A storage record's place for the chunk of `tensor` at `offsets` (a value's: None)."""
        if type(tensor) is _Value:
            if tensor.place is not None:
                raise Unfollowed("two storage records for one value")
            if offsets is not None:
                raise Restart("a storage record of a chunk of a value")
            tensor.place = (name, offset, length)
        else:
            storage = tensor.storage
            if not storage.unplaced():
                raise Unfollowed("two storage records for one chunk")
            if offsets != (0,) * len(tensor.shape):  # (its one chunk covers it: it begins at 0)
                raise Restart("a storage record of a chunk the entry does not have")
            storage.set_place(name, offset, length)
        last = self.last.get(name)
        if last is not None and offset <= last:
            self.ordered = False
        self.last[name] = offset

    def finish(self, root: str | None) -> Checkpoint:
        """Each tensor's place checked to lie in its file (files opened in the entries' order, as
        dcp._read_fast_with opens them), the root found."""
        if not self.ordered:
            raise Restart("places not in order: two keys may name one")
        reader = self.reader
        folder, lengths, deferred = reader.folder, reader._lengths, []
        for position, tensor in enumerate(self.order):
            if type(tensor) is _Value:
                if tensor.place is None:
                    raise CkptError(f"{folder}: the metadata does not say where a value lies")
                deferred.append((position, tensor, reader.place(*tensor.place, folder)))
                continue
            storage = tensor.storage  # (its place in its own fields: see ChunkStorage.place, set_place)
            offset = _OFFSET.__get__(storage, Storage)
            if offset is None:
                raise CkptError(f"{folder}: the metadata does not say where a chunk lies")
            source, offset, length = reader.place(_SOURCE.__get__(storage, Storage), offset,
                                                  _KEY.__get__(storage, Storage), folder)
            _SOURCE.__set__(storage, source)
            _KEY.__set__(storage, lengths.setdefault(length, length))
        self.order = []
        # the values, read as torch's loader reads them: file by file, in the order the files first
        # appear (their events in that order), as dcp._read_fast_with
        for _, value, place in sorted(deferred, key=lambda item: (reader.rank(item[2]), item[0])):
            node = self.tree
            for step in value.path[:-1]:
                node = node[step]
            node[value.path[-1]] = reader.value(place, f"{folder}: {short(value.key)}")
        root_key, tensors, others = find_root(self.tree, root, folder, same=True)
        return Checkpoint(folder, Format.DCP, tensors, root_key, self.tree, sources=list(reader.files.values()),
                          others=others, events=reader.events,
                          distinct=not deferred)  # (each tensor its own ChunkStorage; a value's may share)


class Refused(Exception):
    """A folder whose `.metadata` streamed whole, refused after (a place, a value, the root): the
    tables' way makes the same checks of the same records, and would refuse it too — only the
    restricted unpickler's route reads it again (for its words), not the tables' way as well."""


def read_streaming(reader: _Reader, root: str | None, meta_file: MappedFile) -> Checkpoint | None:
    """read_dcp of the folder of `reader` (a new one: torch's own records make no events) whose
    `.metadata` Stream takes, or None (read it another way); Refused where it is refused once
    streamed (a CkptError of finish: fast_metadata gives none)."""
    try:
        stream = Stream(reader)
        fast_metadata(meta_file.buffer(), stream)
    except Unfollowed:
        reader.release()
        return None
    try:
        return stream.finish(root)
    except Unfollowed:  # (a Restart: places not in order)
        reader.release()
        return None
    except CkptError:
        reader.release()
        raise Refused from None
