"""GGUF (llama.cpp's format), read: a little-endian header — magic `GGUF`, version (2 or 3),
tensor and key/value counts, the key/value metadata, one record per tensor (name, dimensions
innermost first, GGML type, offset) — then the tensor data, each tensor at an aligned offset.

The header is parsed here, bounded and checked before anything trusts it (the `gguf` package's
own GGUFReader builds a numpy array per metadata element, loops as long as an array's length
says without reading past the end, and checks no offset: it is no reader for a stranger's file).
The `gguf` package is still what knows the quantized GGML types (their names and block sizes) and
what dequantizes them (`gguf.quants.dequantize`); it is imported at a file's first quantized
tensor (a file of plain tensors alone does without it).

F32, F16, BF16, F64 and I8–I64 tensors are plain views of the mapped file (copied as they lie,
bit for bit); a quantized tensor is a float32 tensor whose bytes are dequantized when read, a
run of whole blocks at a time (`CHUNK_BYTES` of output per piece), exactly as
`gguf.quants.dequantize` decodes them. Its GGML type is kept on the tensor (`TensorRef.encoded`)
for inspect to show."""

from __future__ import annotations

import struct
from collections import OrderedDict

from .. import dtypes
from ..errors import CkptError
from .formats import Format
from .model import INT64_MAX, Checkpoint, Encoded, MappedFile, Storage, TensorRef, contiguous_strides, joined_tensor

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_NAME = 1 << 16  # bytes of a key or a tensor name (llama.cpp's own tensor names stop at 63)
MAX_DIMS = 4  # GGML_MAX_DIMS: llama.cpp refuses more
MAX_NESTING = 4  # arrays inside arrays (llama.cpp reads none; gguf-py writes them)
MAX_ARRAY_VALUES = 1 << 22  # elements of all metadata arrays together (a 262 144-token vocabulary is three arrays of that)
AHEAD = 2  # pieces of a quantized tensor decoded ahead of the one being written
CHUNK_BYTES = 2 << 20  # float32 output dequantized at once (whole blocks, at least one): gguf makes a few
#                        temporaries of its size; as fast as 16 MiB (numpy calls stay long), a quarter of the memory

# the GGML types whose bytes are a torch dtype's, element for element: id -> (name, torch dtype).
# The ids are GGUF's own (ggml.h's ggml_type; tests hold them to gguf's GGMLQuantizationType), so a
# file of these alone is read without importing gguf (and numpy under it)
PLAIN_TYPES = {0: ("F32", "float32"), 1: ("F16", "float16"), 30: ("BF16", "bfloat16"), 28: ("F64", "float64"),
               24: ("I8", "int8"), 25: ("I16", "int16"), 26: ("I32", "int32"), 27: ("I64", "int64")}

# GGUF value types: id -> (name, struct format of a scalar, numpy dtype of an array of them)
_SCALARS = {0: ("uint8", "<B", "<u1"), 1: ("int8", "<b", "<i1"), 2: ("uint16", "<H", "<u2"),
            3: ("int16", "<h", "<i2"), 4: ("uint32", "<I", "<u4"), 5: ("int32", "<i", "<i4"),
            6: ("float32", "<f", "<f4"), 7: ("bool", "<B", "<u1"), 10: ("uint64", "<Q", "<u8"),
            11: ("int64", "<q", "<i8"), 12: ("float64", "<d", "<f8")}
_STRING, _ARRAY, _BOOL, _UINT32 = 8, 9, 7, 4


def _gguf():
    try:
        import gguf
        import gguf.quants  # noqa: F401
    except ImportError:
        raise CkptError("reading a GGUF file needs the gguf package: pip install 'ckptsurgery[gguf]'") from None
    return gguf


class _Header:
    """A cursor over the mapped file: every read checked against its end."""

    def __init__(self, path: str, source: MappedFile):
        self.path, self.source, self.size = path, source, source.size
        self.pos = 0
        self.values = 0  # array elements read so far (MAX_ARRAY_VALUES)

    def fail(self, text: str):
        raise CkptError(f"{self.path}: {text}")

    def take(self, n: int, what: str) -> memoryview:
        if n > self.size - self.pos:
            self.fail(f"{what} at byte {self.pos} ({n:,} bytes) runs past the end of the {self.size:,}-byte file "
                      f"(truncated or not GGUF)")
        view = self.source.view(self.pos, n)
        self.pos += n
        return view

    def number(self, fmt: str, what: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def raw_string(self, what: str, limit: int | None = None) -> bytes:
        n = self.number("<Q", f"the length of {what}")
        if limit is not None and n > limit:
            self.fail(f"{what} is {n:,} bytes long, more than the {limit:,} allowed")
        return bytes(self.take(n, what))

    def name(self, what: str) -> str:
        raw = self.raw_string(what, MAX_NAME)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            self.fail(f"{what} {raw[:40]!r} is not valid UTF-8")

    def value(self, kind: int, what: str, depth: int = 0):
        if kind in _SCALARS:
            value = self.number(_SCALARS[kind][1], what)
            return bool(value) if kind == _BOOL else value
        if kind == _STRING:  # text from the file: shown and carried as text, odd bytes replaced
            return self.raw_string(what).decode("utf-8", errors="replace")
        if kind != _ARRAY:
            self.fail(f"{what} has value type {kind}, which GGUF does not define")
        if depth >= MAX_NESTING:
            self.fail(f"{what} nests arrays more than {MAX_NESTING} deep")
        inner = self.number("<I", f"the element type of {what}")
        count = self.number("<Q", f"the length of {what}")
        least = struct.calcsize(_SCALARS[inner][1]) if inner in _SCALARS else 8 if inner == _STRING else 12
        if inner not in _SCALARS and inner not in (_STRING, _ARRAY):
            self.fail(f"{what} is an array of value type {inner}, which GGUF does not define")
        if count > (self.size - self.pos) // least:
            self.fail(f"{what} claims {count:,} elements, more than the rest of the {self.size:,}-byte file holds")
        self.values += count
        if self.values > MAX_ARRAY_VALUES:
            self.fail(f"{what}: the metadata's arrays hold more than {MAX_ARRAY_VALUES:,} values in all")
        if inner in _SCALARS:
            import numpy as np

            items = np.frombuffer(self.take(count * least, what), _SCALARS[inner][2])
            return items.astype(bool).tolist() if inner == _BOOL else items.tolist()
        return [self.value(inner, what, depth + 1) for _ in range(count)]


def _version(h: _Header) -> int:
    if h.size < 24:
        h.fail(f"too short for a GGUF file ({h.size} bytes)")
    h.take(4, "the magic")
    version = h.number("<I", "the version")
    if version and not version & 0xFFFF:
        h.fail("a big-endian GGUF file (version bytes swapped); ckptsurgery reads little-endian GGUF only: "
               "convert it with gguf-py's gguf_convert_endian.py first")
    if version == 1:
        h.fail("GGUF version 1 (llama.cpp before August 2023) is not supported: convert the model again with a "
               "current llama.cpp")
    if version not in VERSIONS:
        h.fail(f"GGUF version {version}; ckptsurgery reads versions 2 and 3")
    return version


def read_gguf(path: str) -> Checkpoint:
    gguf = None  # imported at the first quantized tensor
    source = MappedFile(path)
    h = _Header(path, source)
    _version(h)
    n_tensors = h.number("<Q", "the tensor count")
    n_kv = h.number("<Q", "the metadata count")
    rest = h.size - h.pos
    if n_kv > rest // 13:  # a key's length, a type and at least one byte of value
        h.fail(f"the header claims {n_kv:,} metadata entries, more than the {h.size:,}-byte file could hold")
    if n_tensors > rest // 24:  # a name's length, the dimension count, the type and the offset
        h.fail(f"the header claims {n_tensors:,} tensors, more than the {h.size:,}-byte file could describe")
    metadata: dict = {}
    kinds: dict[str, int] = {}
    for i in range(n_kv):
        key = h.name(f"metadata key {i}")
        if key in metadata:
            h.fail(f"metadata key {key[:60]!r} is given twice")
        kind = h.number("<I", f"the type of metadata {key[:60]!r}")
        kinds[key] = kind
        metadata[key] = h.value(kind, f"metadata {key[:60]!r}")
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if "general.alignment" in metadata and (kinds["general.alignment"] != _UINT32 or not alignment
                                            or alignment & (alignment - 1)):
        h.fail(f"general.alignment {alignment!r} is not a power of two stored as uint32")
    records = []
    names: set[str] = set()
    for i in range(n_tensors):
        name = h.name(f"the name of tensor {i}")
        if name in names:
            h.fail(f"tensor {name[:60]!r} is listed twice")
        names.add(name)
        n_dims = h.number("<I", f"the dimension count of {name[:60]!r}")
        if n_dims > MAX_DIMS:
            h.fail(f"tensor {name[:60]!r} has {n_dims:,} dimensions; GGUF holds at most {MAX_DIMS}")
        dims = struct.unpack(f"<{n_dims}Q", h.take(8 * n_dims, f"the dimensions of {name[:60]!r}"))
        type_id = h.number("<I", f"the type of {name[:60]!r}")
        offset = h.number("<Q", f"the offset of {name[:60]!r}")
        records.append((name, dims, type_id, offset))
    data_start = -(-h.pos // alignment) * alignment
    tensors: OrderedDict[str, TensorRef] = OrderedDict()
    spans = []
    decodable: dict[int, bool] = {}
    for name, dims, type_id, offset in records:
        where = f"{path}: tensor {name[:60]!r}"
        plain = PLAIN_TYPES.get(type_id)
        if plain is not None:
            qtype, dtype = None, dtypes.BY_NAME[plain[1]]
            block, type_size, type_name = 1, dtype.itemsize, plain[0]
        else:
            gguf = gguf or _gguf()
            try:
                qtype = gguf.GGMLQuantizationType(type_id)
            except ValueError:
                raise CkptError(f"{where}: GGML type {type_id} is not one gguf {_version_of()} knows "
                                f"(a newer llama.cpp's type?)") from None
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
            type_name = qtype.name
        shape = tuple(reversed(dims))  # GGUF lists the innermost dimension first
        numel = 1
        for d in dims:
            numel *= d
            if numel > INT64_MAX or d > INT64_MAX:
                raise CkptError(f"{where}: shape {list(shape)} holds more elements than torch can address")
        if dims and dims[0] % block:
            raise CkptError(f"{where}: {type_name} rows of {dims[0]} elements are not whole blocks of {block}")
        nbytes = numel // block * type_size
        if offset % alignment:
            raise CkptError(f"{where}: offset {offset} is not a multiple of the alignment {alignment}")
        if offset > h.size or nbytes > h.size - data_start - offset:
            raise CkptError(f"{where}: its {nbytes:,} bytes at offset {offset:,} of the data lie past the end of "
                            f"the {h.size:,}-byte file (truncated?)")
        spans.append((offset, offset + nbytes, name))
        start = data_start + offset
        if qtype is None:
            tensors[name] = TensorRef(Storage(source, start, nbytes, name), 0, shape, contiguous_strides(shape), dtype)
        else:
            if type_id not in decodable:
                decodable[type_id] = _can_dequantize(gguf, qtype, type_size)
            tensors[name] = _quantized(source, start, numel, qtype, block, type_size, shape,
                                       None if decodable[type_id] else where)
            tensors[name].encoded = Encoded(qtype.name, nbytes)
    position, before = 0, None
    for begin, end, name in sorted(spans):
        if begin < position:
            raise CkptError(f"{path}: tensor {name[:60]!r} overlaps the bytes of tensor {before[:60]!r}")
        position, before = max(position, end), name
    return Checkpoint(path, Format.GGUF, tensors, None, None, metadata, sources=[source])


def _version_of() -> str:
    from importlib.metadata import version

    return version("gguf")


def _can_dequantize(gguf, qtype, type_size: int) -> bool:
    """Whether gguf.quants decodes this type (a block of zeros tried once per file and type)."""
    import numpy as np

    try:
        gguf.quants.dequantize(np.zeros((1, type_size), np.uint8), qtype)
    except NotImplementedError:
        return False
    return True


class _Blocks:
    """The float32 values of `count` whole blocks of a quantized tensor starting at byte `start`
    of the mapped file, dequantized by gguf when viewed: only the blocks a view covers. A view of
    the whole piece starts the next piece of the tensor (`following`) in a thread of its own, so
    that a writer copying one piece out finds the next one decoded (numpy lets go of the GIL)."""

    path = "<dequantized>"

    def __init__(self, source: MappedFile, start: int, count: int, qtype, block: int, type_size: int,
                 refused: str | None):
        self.source, self.start, self.count = source, start, count
        self.qtype, self.block, self.type_size, self.refused = qtype, block, type_size, refused
        self.following: _Blocks | None = None
        self._ahead = None  # the Future of this whole piece's values, started by the piece before

    def view(self, offset: int, nbytes: int) -> memoryview:
        if self.refused:
            raise CkptError(f"{self.refused}: gguf {_version_of()} cannot dequantize {self.qtype.name}")
        if nbytes <= 0:
            return memoryview(b"")
        per_block = self.block * 4
        if offset == 0 and nbytes == self.count * per_block:  # the whole piece: as a writer reads it
            ahead, self._ahead = self._ahead, None
            following = self.following
            for _ in range(AHEAD):  # the next pieces decode while this one is written out
                if following is None or following.refused:
                    break
                if following._ahead is None:
                    following._ahead = _decoder().submit(following._values, 0, following.count)
                following = following.following
            values = ahead.result() if ahead is not None else self._values(0, self.count)
            return memoryview(values)
        first, last = offset // per_block, -(-(offset + nbytes) // per_block)
        skip = offset - first * per_block
        return memoryview(self._values(first, last - first))[skip : skip + nbytes]

    def _values(self, first: int, count: int):
        """Blocks [first, first + count) dequantized: their float32 values' bytes (a numpy array)."""
        import numpy as np
        from gguf.quants import dequantize

        raw = self.source.view(self.start + first * self.type_size, count * self.type_size)
        values = dequantize(np.frombuffer(raw, np.uint8).reshape(1, -1), self.qtype)
        return np.ascontiguousarray(values, np.float32).reshape(-1).view(np.uint8)

    def close(self) -> None:
        self._ahead = None


_pool = None


def _decoder():
    """The threads that decode the next pieces while the writer copies the last one out (numpy
    lets go of the GIL: on two cores, two pieces decode at once)."""
    global _pool
    if _pool is None:
        from concurrent.futures import ThreadPoolExecutor

        _pool = ThreadPoolExecutor(max_workers=AHEAD, thread_name_prefix="ckptsurgery-gguf")
    return _pool


def _quantized(source: MappedFile, start: int, numel: int, qtype, block: int, type_size: int,
               shape: tuple[int, ...], refused: str | None) -> TensorRef:
    """A float32 tensor of `shape` whose bytes are the blocks at `start`, dequantized piece by piece."""
    blocks = numel // block
    step = max(1, CHUNK_BYTES // (block * 4))
    pieces = [(_Blocks(source, start + first * type_size, min(step, blocks - first), qtype, block, type_size,
                       refused), 0, min(step, blocks - first) * block * 4)
              for first in range(0, blocks, step)]
    for (piece, _, _), (after, _, _) in zip(pieces, pieces[1:]):
        piece.following = after
    return joined_tensor(shape, dtypes.BY_NAME["float32"], pieces)
