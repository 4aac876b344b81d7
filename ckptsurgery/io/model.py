"""The lazy table every reader returns: names mapped to tensor references that know their
dtype, shape and where their bytes lie, and fetch those bytes only when asked."""

from __future__ import annotations

import functools
import gc
import math
import mmap
import os
import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

from ..dtypes import DType
from ..errors import CkptError
from .pickled import InertGlobal
from .tensors import as_torch, gather, resolve_math_bits


def check_key(key: object, where: str = "") -> None:
    """State dict keys are text that every format can hold: `1` and `'1'` are not one key, and
    a lone surrogate cannot be written as UTF-8."""
    if type(key) is not str:
        shown = str(key)[:40] if type(key) in (int, float, bool, bytes) or key is None else f"<{type(key).__name__}>"
        raise CkptError(f"{where}state dict key {shown} is a {type(key).__name__}, not a string")
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        raise CkptError(f"{where}state dict key {key[:40]!r} is not valid Unicode text") from None


@contextmanager
def collection_paused() -> Iterator[None]:
    """Readers build objects by the hundred thousand and free none: the cyclic collector would
    scan them all again and again and find nothing (half the time of reading 200 000 tensors).
    Whatever cycles a hostile pickle makes are collected once the read is over."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            gc.enable()


# Descriptors: a mapped file keeps one (mmap's own copy); a file opened for copy_file_range one
# more, and at most this many of those stay open at once — a DCP folder from 1000 ranks is 1000
# data files, and the usual limit is 1024 descriptors. Writer threads (--jobs) share the table:
# `_open_lock` guards it, and a descriptor in use by one thread is never closed by another (so
# at most MAX_OPEN_FILES plus one per thread are open).
MAX_OPEN_FILES = 64
_open_files: "OrderedDict[int, MappedFile]" = OrderedDict()
_open_lock = threading.Lock()


def _close_unused_descriptors() -> None:
    """Close the least recently used descriptors beyond MAX_OPEN_FILES that no thread is using.
    The caller holds `_open_lock`."""
    excess = len(_open_files) - MAX_OPEN_FILES
    for mapped in list(_open_files.values()):  # oldest first
        if excess <= 0:
            break
        if mapped._users == 0:
            mapped._file.close()
            mapped._file = None
            del _open_files[id(mapped)]
            excess -= 1


class MappedFile:
    """A read-only memory map of one input file, opened on first use."""

    def __init__(self, path: str):
        self.path = path  # what errors name
        self.local = path  # what is opened (a downloaded remote file's temporary copy)
        self.size = os.path.getsize(path)
        self._file = None
        self._users = 0  # threads inside descriptor(): the descriptor stays open while > 0
        self._map: mmap.mmap | None = None
        self._map_lock = threading.Lock()

    def view(self, offset: int, nbytes: int) -> memoryview:
        if offset < 0 or nbytes < 0 or offset + nbytes > self.size:
            raise CkptError(f"{self.path}: data at {offset}+{nbytes} lies past the end of the file")
        if nbytes == 0:
            return memoryview(b"")
        return memoryview(self.buffer())[offset : offset + nbytes]

    def buffer(self) -> mmap.mmap:
        """The whole file, mapped read-only (the file must not be empty)."""
        if self._map is None:
            with self._map_lock:  # two writer threads must not map it twice
                if self._map is None:
                    with open(self.local, "rb") as f:  # the map keeps a descriptor of its own
                        self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return self._map

    @contextmanager
    def descriptor(self) -> Iterator[int]:
        """A descriptor of the file (for copy_file_range), open until the block ends whatever
        other threads open meanwhile; after it, only the most recently used few stay open."""
        with _open_lock:
            if self._file is None:
                self._file = open(self.local, "rb")
            _open_files.pop(id(self), None)
            _open_files[id(self)] = self  # the most recently used last
            self._users += 1
            fd = self._file.fileno()
            _close_unused_descriptors()
        try:
            yield fd
        finally:
            with _open_lock:
                self._users -= 1
                _close_unused_descriptors()

    def _close_file(self) -> None:
        with _open_lock:
            if self._file is not None:
                self._file.close()
                self._file = None
            _open_files.pop(id(self), None)

    def close(self) -> None:
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:  # a view is still alive; the OS unmaps at exit
                pass
            self._map = None
        self._close_file()


class RangeSource(ABC):
    """Bytes fetched by range when asked (a remote file: io/remote.py): `view(offset, nbytes)` as
    a mapped file's, and `stream(offset, nbytes)`, the pieces of a long range in order, for writers."""

    path: str
    size: int

    @abstractmethod
    def view(self, offset: int, nbytes: int) -> memoryview:
        """Bytes [offset, offset + nbytes), fetched."""

    @abstractmethod
    def stream(self, offset: int, nbytes: int) -> Iterator[memoryview]:
        """The same bytes in pieces, in order (several fetched at once)."""

    def close(self) -> None:
        pass


class ComputedSource:
    """Bytes made on demand — a cast, an average, an overlap — and dropped after use, so that a
    write holds one computed tensor at a time however many there are."""

    path = "<computed>"

    def __init__(self, make: Callable[[], bytes | bytearray]):
        self._make = make

    def view(self, offset: int, nbytes: int) -> memoryview:
        return memoryview(self._make())[offset : offset + nbytes]

    def close(self) -> None:
        pass


class JoinedSource:
    """Byte ranges of other sources laid end to end: a tensor whose rows lie in several files
    (the chunks of DCP ranks, the partitions of ZeRO ranks). Writers stream it range by range;
    only a span that crosses ranges is ever joined in memory."""

    path = "<joined>"

    def __init__(self, pieces: list[tuple[Any, int, int]]):
        self.pieces = [(source, offset, nbytes) for source, offset, nbytes in pieces if nbytes]
        self.size = sum(nbytes for _, _, nbytes in self.pieces)

    def ranges(self, offset: int, nbytes: int):
        """(source, offset, nbytes) of the pieces that make up [offset, offset + nbytes)."""
        base = 0
        for source, start, size in self.pieces:
            lo, hi = max(offset, base), min(offset + nbytes, base + size)
            if lo < hi:
                yield source, start + lo - base, hi - lo
            base += size

    def view(self, offset: int, nbytes: int) -> memoryview:
        parts = list(self.ranges(offset, nbytes))
        if len(parts) == 1:
            source, start, size = parts[0]
            return source.view(start, size)
        joined = bytearray()
        for source, start, size in parts:  # each piece copied before the next is made: a computed
            joined += source.view(start, size)  # source may reuse its buffer from piece to piece
        return memoryview(joined)

    def close(self) -> None:
        pass


def mapped_range(t: "TensorRef") -> "tuple[MappedFile | JoinedSource | RangeSource, int] | None":
    """(source, byte offset) where a tensor's bytes lie in order in a mapped file, or across the
    ranges of a joined one: any span of them can be viewed there without a copy. None for a
    strided view, a computed tensor (it would be made whole again for every span) or a lazily
    negated one."""
    source = t.storage.source
    if t.is_plain and t.is_contiguous and isinstance(source, (MappedFile, JoinedSource, RangeSource)):
        return source, t.byte_range()[0]
    return None


def joined_tensor(shape: tuple[int, ...], dtype: DType, pieces: list[tuple[Any, int, int]]) -> "TensorRef":
    """A contiguous tensor whose row-major bytes are `pieces` (source, offset, nbytes) in order."""
    source = JoinedSource(pieces)
    if source.size != numel_of(shape) * dtype.itemsize:
        raise CkptError(f"pieces of {source.size} bytes for a {dtype.name} tensor of shape {list(shape)}")
    return TensorRef(Storage(source, 0, source.size), 0, tuple(shape), contiguous_strides(tuple(shape)), dtype)


class Storage:
    """A run of untyped bytes (a torch storage, or the byte range of one safetensors tensor).
    The dtype belongs to the tensors viewing it, as in torch: one storage may back tensors of
    several dtypes (torch's `_rebuild_tensor_v3` route)."""

    __slots__ = ("source", "offset", "nbytes", "key", "location")

    def __init__(self, source, offset: int, nbytes: int, key: str = "", location: str = "cpu"):
        self.source = source
        self.offset = offset
        self.nbytes = nbytes
        self.key = key
        self.location = location  # the device torch.save recorded ("cuda:0"), written back as read

    def view(self) -> memoryview:
        return self.source.view(self.offset, self.nbytes)


def computed_tensor(shape: tuple[int, ...], dtype: DType, make: Callable[[], bytes | bytearray]) -> "TensorRef":
    """A tensor whose row-major bytes `make()` produces when a writer asks for them."""
    storage = Storage(ComputedSource(make), 0, numel_of(shape) * dtype.itemsize)
    return TensorRef(storage, 0, tuple(shape), contiguous_strides(tuple(shape)), dtype)


def chunked_tensor(shape: tuple[int, ...], dtype: DType, sizes: list[int],
                   make: Callable[[int], bytes | bytearray]) -> "TensorRef":
    """A tensor whose row-major bytes are the chunks `make(0)`, `make(1)`, ... of `sizes` bytes:
    writers take them one at a time, so only one chunk is ever in memory."""
    return joined_tensor(shape, dtype, [(ComputedSource(functools.partial(make, j)), 0, size)
                                        for j, size in enumerate(sizes)])


def standalone(t: "TensorRef") -> "TensorRef":
    """The tensor on a storage of exactly its own bytes, so that an output holds nothing of a
    storage it shares (other tensors' bytes, a partition's padding): a view into the same file
    when it is contiguous, else computed."""
    if t.quant is not None:  # its bytes are integers beside their scales: kept as read
        return t
    if not t.is_contiguous or t.math_bits:
        return computed_tensor(t.shape, t.dtype, t.data)
    if t.storage.nbytes == t.nbytes and not t.offset:
        return t
    start = t.storage.offset + t.offset * t.dtype.itemsize
    storage = Storage(t.storage.source, start, t.nbytes, t.storage.key, t.storage.location)
    return TensorRef(storage, 0, t.shape, t.stride, t.dtype)


def contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    # checkpoints repeat a few shapes across thousands of tensors: remember the short ones
    return _remembered_strides(shape) if len(shape) <= 8 else _strides(shape)


@functools.lru_cache(maxsize=4096)
def _remembered_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    return _strides(shape)


def _strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        # past 2**63 (a zero-sized tensor's other dimensions may be huge) the figure is moot:
        # cap it, so that 20 000 huge dimensions cost no million-bit products
        step = min(step * max(size, 1), INT64_MAX + 1)
    return tuple(reversed(strides))


def numel_of(shape: tuple[int, ...]) -> int:
    """The element count; past 2**63 (which validation refuses) the exact figure stops
    mattering, so a hostile 100 000-dimension shape costs no huge multiplication."""
    if len(shape) <= 8:  # the product of a few int64s is cheap to compute exactly
        n = math.prod(shape)
        return n if n <= INT64_MAX else INT64_MAX + 1
    if 0 in shape:
        return 0
    n = 1
    for size in shape:
        n *= size
        if n > INT64_MAX:
            return INT64_MAX + 1
    return n


INT64_MAX = 2**63 - 1  # torch's sizes, strides and offsets are int64
_INT = {int}


@dataclass(frozen=True)
class QuantParams:
    """What torch pickles beside a quantized tensor: its scheme and scale(s), zero point(s) and,
    per channel, the axis. Scales and zero points are floats and ints, or tensors per channel."""

    scheme: Any  # the unpickler's token for torch.per_tensor_affine, ...
    scale: Any
    zero_point: Any
    axis: int | None = None


@dataclass(frozen=True)
class Encoded:
    """How the file stores a tensor that is decoded as it is read (a GGUF tensor of quantized
    blocks, read as float32): its own type's name ("Q4_K") and its bytes there, which inspect shows."""

    type: str
    nbytes: int


@dataclass(eq=False, slots=True)
class TensorRef:
    """One tensor: a view (offset, shape, stride, in elements of its dtype) into a storage."""

    storage: Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: DType
    requires_grad: bool | None = None  # the flag of a pickled nn.Parameter; None otherwise
    plain_grad: bool = False  # a plain tensor saved with requires_grad=True (kept when rewritten)
    quant: QuantParams | None = None  # a quantized tensor's scales (its bytes are the integers)
    math_bits: tuple[str, ...] = ()  # torch's lazy "conj"/"neg" bits: the bytes are stored unresolved
    param_state: Any = None  # attributes pickled on an nn.Parameter, carried into .pth outputs
    wrap: tuple | None = None  # (type, attributes) of a tensor torch pickled via _rebuild_from_type_v2
    encoded: Encoded | None = None  # decoded as it is read: how the file stores it (see Encoded)

    @property
    def numel(self) -> int:
        return numel_of(self.shape)

    @property
    def nbytes(self) -> int:
        dtype = self.dtype
        if dtype.per_byte > 1:  # quint4x2, quint2x4: each row packed into whole bytes
            rows = numel_of(self.shape[:-1]) if self.shape else 1
            return rows * -(-(self.shape[-1] if self.shape else 1) // dtype.per_byte)
        return numel_of(self.shape) * dtype.itemsize

    @property
    def is_contiguous(self) -> bool:
        return self.stride == contiguous_strides(self.shape) or all(
            size <= 1 or stride == want
            for size, stride, want in zip(self.shape, self.stride, contiguous_strides(self.shape))
        )

    @property
    def is_plain(self) -> bool:
        """Its bytes mean what they say: no scales beside them and no lazy bits to apply."""
        return self.quant is None and not self.math_bits

    def validate(self, where: "str | Callable[[], str]") -> None:
        """Check that the view lies inside its storage, before anything trusts it. `where`
        names the tensor in an error (a callable: rendered only then)."""
        try:
            self._validate()
        except CkptError as e:
            raise CkptError(f"{where() if callable(where) else where}: {e}") from None

    def repeated_bytes(self) -> int:
        """The bytes of a view whose elements overlap (stride 0, or strides that cross): more
        elements than lie between its first and last. 0 for an ordinary view."""
        if self.numel <= 1 or self.dtype.per_byte > 1:
            return 0
        span = 1 + sum((size - 1) * stride for size, stride in zip(self.shape, self.stride))
        return self.nbytes if self.numel > span else 0

    def _validate(self) -> None:
        shape, stride = self.shape, self.stride
        if len(shape) != len(stride):
            raise CkptError(f"shape {_dims(shape)} and stride {_dims(stride)} disagree")
        numbers = shape + stride + (self.offset,)
        # all in C: a state dict of 200 000 tensors validates each
        if set(map(type, numbers)) != _INT or min(numbers) < 0 or max(numbers) > INT64_MAX:
            raise CkptError("a shape, stride or offset that is negative, not an integer or beyond torch's int64")
        if self.nbytes > INT64_MAX:
            raise CkptError(f"shape {_dims(shape)} holds more bytes than torch can address")
        numel = self.numel
        if numel == 0:
            return
        if self.dtype.per_byte > 1:  # packed rows: only whole, contiguous tensors
            if self.offset or not self.is_contiguous or self.nbytes > self.storage.nbytes:
                raise CkptError(f"a {self.dtype.name} tensor that is a view, or larger than its storage")
            return
        if stride == contiguous_strides(shape):
            last = self.offset + numel - 1
        else:
            last = self.offset + sum((size - 1) * step for size, step in zip(shape, stride))
        held = self.storage.nbytes // self.dtype.itemsize
        if last >= held:
            raise CkptError(
                f"tensor of shape {_dims(shape)} reaches element {last} "
                f"of a storage holding {held}"
            )

    def view_key(self) -> tuple:
        """Equal for two names that are the same view of the same bytes (tied weights)."""
        return id(self.storage), self.offset, self.shape, self.stride, self.dtype.name, self.math_bits, id(self.quant)

    def byte_range(self) -> tuple[int, int]:
        """(offset in the source file, length) of a contiguous tensor's bytes."""
        return self.storage.offset + self.offset * self.dtype.itemsize, self.nbytes

    def data(self) -> memoryview | bytes:
        """The tensor's bytes in row-major order, with any conj/neg bit applied (a quantized
        tensor's bytes are its integers: see `quant`)."""
        if self.math_bits:
            return resolve_math_bits(self)
        if self.is_contiguous:
            start = self.offset * self.dtype.itemsize
            return self.storage.view()[start : start + self.nbytes]
        return gather(self)

    def to_torch(self):
        """A torch tensor holding a copy of the data (imports torch)."""
        return as_torch(self).clone()


def _dims(values: tuple) -> str:
    text = str(list(values))
    return text if len(text) <= 80 else text[:77] + "..."


@dataclass
class Checkpoint:
    """What a reader returns. `tensors` is the state dict at `root`; `others` the non-tensor
    entries beside them in it (`_extra_state`); `obj` the whole unpickled object (None for
    safetensors), so that a .pth output can carry the rest through."""

    path: str
    format: str  # a formats.Format, or a ShardedFormat when read through an index (both text)
    tensors: dict[str, TensorRef]
    root: str | None = None
    obj: Any = None
    metadata: dict[str, str] = field(default_factory=dict)
    sources: list[MappedFile] = field(default_factory=list)
    others: dict[str, Any] = field(default_factory=dict)
    # placeholder imports and calls an unsafe torch.load would make, in order (unpickler.events)
    events: list = field(default_factory=list)
    distinct: bool = False  # each tensor on a storage of its own, as the reader knows: shares_with need not look

    @property
    def inert(self) -> list[str]:
        """The names of the globals left inert (placeholders), sorted."""
        return sorted({e.qualname() for e in self.events if isinstance(e, InertGlobal)})

    def close(self) -> None:
        for source in self.sources:
            source.close()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def shares_with(self) -> Mapping[str, str | None]:
        """For each tensor, the first earlier tensor whose bytes it shares (tied weights, views)."""
        if self.distinct:
            return _Alone(self.tensors)
        first: dict[int, str] = {}
        out: dict[str, str | None] = {}
        for name, t in self.tensors.items():
            owner = first.setdefault(id(t.storage), name)
            out[name] = None if owner == name else owner
        return out


class _Alone(Mapping):
    """shares_with of tensors that share no storage: None for each name, as asked (not a dict of
    them all: 100,000 keys' is ~4 MB, and the table of storages behind it ~8 MB more)."""

    def __init__(self, tensors: dict):
        self._tensors = tensors

    def __getitem__(self, name: str) -> None:
        if name not in self._tensors:
            raise KeyError(name)
        return None

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)
