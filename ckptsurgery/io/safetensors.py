"""safetensors: an 8-byte little-endian header length, a JSON header naming each tensor's
dtype, shape and byte range, then the bytes. The reader checks everything before it is used;
the writer refuses, before anything is written, what safetensors could not load."""

from __future__ import annotations

import json
import struct
from collections import OrderedDict
from typing import Any, BinaryIO

from .. import dtypes
from ..errors import CkptError
from .formats import Format
from .model import (
    INT64_MAX, Checkpoint, MappedFile, Storage, TensorRef, check_key, collection_paused, contiguous_strides, numel_of,
)
from .write import Progress, plan_safetensors, write_tensors

MAX_HEADER = 100_000_000  # the safetensors library's own limit (bytes): it refuses a longer header
ALIASES_KEY = "ckptsurgery.aliases"  # metadata recording tied names stored once


def read_header(path: str, source: MappedFile) -> tuple[int, dict]:
    if source.size < 8:
        raise CkptError(f"{path}: too short for a safetensors file ({source.size} bytes)")
    (length,) = struct.unpack("<Q", source.view(0, 8))
    if length > min(MAX_HEADER, source.size - 8):
        raise CkptError(f"{path}: header length {length} runs past the end of the "
                        f"{source.size}-byte file (truncated or not safetensors)")
    raw = bytes(source.view(8, length))
    twice = raw.count(b'"__metadata__"') > 1
    try:
        text = raw.decode("utf-8")
        del raw  # (100,000 tensors: a 10 MB header, held once while it is parsed)
        header = json.loads(text)
        if twice:  # rare: only then pay for a check of every key
            json.loads(text, object_pairs_hook=_unique_top_level)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CkptError(f"{path}: the safetensors header is not valid JSON ({str(e)[:100]})") from None
    if not isinstance(header, dict):
        raise CkptError(f"{path}: the safetensors header is not a JSON object")
    return 8 + length, header


def _unique_top_level(pairs: list) -> dict:
    """Two `__metadata__` maps (or two entries of one name): safetensors refuses the header as
    "duplicate field", and keeping either one would be a guess."""
    if sum(k == "__metadata__" for k, _ in pairs) > 1:
        raise ValueError("__metadata__ is given twice")
    return dict(pairs)


def _metadata(path: str, header: dict) -> dict[str, str]:
    meta = header.pop("__metadata__", None)
    meta = {} if meta is None else meta  # `[]`, `""`, `0`: safetensors refuses them, as we do
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise CkptError(f"{path}: __metadata__ must map strings to strings")
    try:
        "".join(f"{k}{v}" for k, v in meta.items()).encode("utf-8")
    except UnicodeEncodeError:
        raise CkptError(f"{path}: __metadata__ holds text that is not valid Unicode (a lone surrogate)") from None
    return meta


def read_safetensors(path: str, source=None) -> Checkpoint:
    """The file at `path`; `source`: its bytes elsewhere than a local file (a remote file)."""
    source = MappedFile(path) if source is None else source
    data_start, header = read_header(path, source)
    metadata = _metadata(path, header)
    data_size = source.size - data_start
    _check_names(path, header)
    tensors: OrderedDict[str, TensorRef] = OrderedDict()
    # (dtype code, *shape) -> (dtype, torch shape, strides, bytes): checkpoints repeat a few
    # layouts over thousands of tensors, so each is checked once; a miss takes the full check
    layouts: dict[tuple, tuple] = {}
    # the usual case: in the header's order, each tensor starts where the one before ends
    position, in_order = 0, True
    for name in list(header):
        info = header.pop(name)  # each entry freed as its tensor is made: never both whole
        layout = offsets = None
        if type(info) is dict:
            code, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
            if type(code) is str and type(shape) is list and _INT.issuperset(map(type, shape)):
                layout = layouts.get((code, *shape))
        if layout is None:
            layout = _layout(f"{path}: tensor {name!r}", info)
            layouts[(info["dtype"], *info["shape"])] = layout
        dtype, shape, strides, nbytes = layout
        begin, end = offsets if type(offsets) is list and len(offsets) == 2 else (None, None)
        if not (type(begin) is int and type(end) is int and 0 <= begin <= end <= data_size and end - begin == nbytes):
            _bad_offsets(f"{path}: tensor {name!r}", offsets, data_size, nbytes, dtype)
        if begin != position:
            in_order = False
        position = end
        tensors[name] = TensorRef(Storage(source, data_start + begin, nbytes, name), 0, shape, strides, dtype)
    if not in_order:  # then every overlap and gap is found in the order of the bytes
        position = 0
        for begin, end, name in sorted((t.storage.offset - data_start, t.storage.offset - data_start + t.storage.nbytes,
                                        name) for name, t in tensors.items()):
            if begin != position:
                problem = "overlaps the tensor before it" if begin < position else "leaves a gap before it"
                raise CkptError(f"{path}: tensor {name!r} at byte {begin} {problem}")
            position = end
    if position != data_size:
        raise CkptError(f"{path}: {data_size - position} bytes after the last tensor (corrupt file)")
    tensors = _restore_aliases(path, tensors, metadata)
    return Checkpoint(path, Format.SAFETENSORS, tensors, None, None, metadata, sources=[source])


_INT = {int}


def _check_names(path: str, header: dict) -> None:
    """Every name is valid Unicode: checked in one step, and name by name only to find the one that is not."""
    try:
        "".join(header).encode("utf-8")
    except UnicodeEncodeError:
        for name in header:
            check_key(name, f"{path}: ")


def _layout(where: str, info) -> tuple:
    """(dtype, torch shape, strides, bytes) of one header entry, checked; or the error that names its fault."""
    if not isinstance(info, dict):
        raise CkptError(f"{where}: entry is not an object")
    code = info.get("dtype")
    dtype = dtypes.BY_SAFETENSORS.get(code) if type(code) is str else None
    if dtype is None:
        raise CkptError(f"{where}: unknown dtype {str(code)[:20]!r} (no torch dtype ckptsurgery knows)")
    shape = info.get("shape")
    if not (isinstance(shape, list) and all(type(s) is int and 0 <= s <= INT64_MAX for s in shape)):
        raise CkptError(f"{where}: shape {str(shape)[:60]} is not a list of non-negative integers below 2^63")
    shape = _torch_shape(where, dtype, tuple(shape))
    return dtype, shape, contiguous_strides(shape), numel_of(shape) * dtype.itemsize


def _bad_offsets(where: str, offsets, data_size: int, nbytes: int, dtype: dtypes.DType) -> None:
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
        raise CkptError(f"{where}: data_offsets {str(offsets)[:60]} is not a pair of integers")
    begin, end = offsets
    if not 0 <= begin <= end <= data_size:
        raise CkptError(f"{where}: data_offsets {offsets} lie outside the {data_size}-byte data")
    raise CkptError(f"{where}: {end - begin} bytes for {nbytes // dtype.itemsize} {dtype.name} elements")


def _torch_shape(where: str, dtype: dtypes.DType, shape: tuple[int, ...]) -> tuple[int, ...]:
    """safetensors counts the 4-bit elements of F4; torch's float4_e2m1fn_x2 counts pairs."""
    if dtype.packed == 1:
        return shape
    if not shape or shape[-1] % dtype.packed:
        raise CkptError(f"{where}: {dtype.safetensors} needs a last dimension divisible by {dtype.packed}")
    return shape[:-1] + (shape[-1] // dtype.packed,)


def safetensors_shape(dtype: dtypes.DType, shape: tuple[int, ...]) -> list[int]:
    """The shape as safetensors writes it (the inverse of `_torch_shape`)."""
    if dtype.packed == 1:
        return list(shape)
    if not shape:
        raise CkptError(f"a 0-d {dtype.name} tensor has no safetensors shape; write a .pth instead")
    return [*shape[:-1], shape[-1] * dtype.packed]


def parse_aliases(text: str) -> list[tuple[str, str, int]]:
    """[[alias, target, position], ...] as ckptsurgery writes it, checked entry by entry."""
    try:
        entries = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise CkptError(f"malformed {ALIASES_KEY} metadata ({str(e)[:80]})") from None
    if type(entries) is not list or not all(
        type(e) is list and len(e) == 3 and type(e[0]) is str and type(e[1]) is str and type(e[2]) is int
        for e in entries
    ):
        raise CkptError(f"malformed {ALIASES_KEY} metadata: expected [[alias, target, position], ...]")
    return [tuple(e) for e in entries]


def _restore_aliases(path: str, tensors: OrderedDict, metadata: dict[str, str]) -> OrderedDict:
    """Tied names written once by ckptsurgery come back as views of the same storage, in their
    original place: the metadata lists [alias, target, position]. Aliases may only add names
    for tensors that are stored: an alias that names a stored tensor, or another alias, or
    points at no stored tensor, is an error, never a replacement."""
    if ALIASES_KEY not in metadata:
        return tensors
    try:
        aliases = parse_aliases(metadata[ALIASES_KEY])
    except CkptError as e:
        raise CkptError(f"{path}: {e}") from None
    total = len(tensors) + len(aliases)
    placed: dict[int, tuple[str, TensorRef]] = {}
    added: set[str] = set()
    for alias, target, position in aliases:
        check_key(alias, f"{path}: {ALIASES_KEY}: ")
        problem = (
            "names a stored tensor" if alias in tensors else
            "is listed twice" if alias in added else
            f"points at {target[:40]!r}, which is not a stored tensor" if target not in tensors else
            f"has position {position}, taken or outside 0..{total - 1}" if not 0 <= position < total or position in placed else
            None
        )
        if problem:
            raise CkptError(f"{path}: {ALIASES_KEY}: alias {alias[:40]!r} {problem}")
        added.add(alias)
        placed[position] = (alias, tensors[target])
    stored = iter(tensors.items())
    return OrderedDict(placed[i] if i in placed else next(stored) for i in range(total))


# ---- writing ---------------------------------------------------------------------------------

def check_safetensors(stored: list) -> None:
    """Refuse, before anything is written, what a safetensors file cannot hold loadably."""
    for name, t, dtype in stored:
        if name == "__metadata__":
            raise CkptError("a tensor named __metadata__ cannot be written to safetensors (the name is "
                            "reserved there); rename it first")
        reason = dtypes.why_not_safetensors(dtype)
        if reason:
            raise CkptError(f"tensor {name!r}: {reason}")
        safetensors_shape(dtype, t.shape)  # raises for shapes safetensors cannot state


def write_safetensors(f: BinaryIO, tensors: dict[str, TensorRef], metadata: dict[str, str],
                      cast: dtypes.DType | None = None, progress: Progress | None = None, plan: tuple | None = None) -> None:
    """`plan`: what plan_safetensors(tensors, cast) returned and check_safetensors accepted, when
    the caller has it (200 000 tensors are not planned twice)."""
    if plan is None:
        plan = plan_safetensors(tensors, cast)
        check_safetensors(plan[0])
    stored, aliases = plan
    meta = {k: v for k, v in metadata.items() if k != ALIASES_KEY}
    meta["format"] = "pt"
    if aliases:
        meta[ALIASES_KEY] = json.dumps(aliases, separators=(",", ":"), ensure_ascii=False)
    with collection_paused():  # a dict and a list per tensor, kept until dumped: see collection_paused
        header: dict[str, Any] = {"__metadata__": dict(sorted(meta.items()))}
        offset, layouts = 0, {}  # (dtype name, shape) -> (code, shape as written, bytes): a few, repeated
        for name, t, dtype in stored:
            layout = layouts.get((dtype.name, t.shape))
            if layout is None:
                layout = layouts[(dtype.name, t.shape)] = (dtype.safetensors, safetensors_shape(dtype, t.shape),
                                                      numel_of(t.shape) * dtype.itemsize)
            code, shape, size = layout
            header[name] = {"dtype": code, "shape": shape, "data_offsets": [offset, offset + size]}
            offset += size
        raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * ((-len(raw)) % 8)  # the library pads the header to 8 bytes
    if len(raw) > MAX_HEADER:  # safetensors would refuse the file ("header too large"); nothing is kept
        raise CkptError(f"the safetensors header would be {len(raw):,} bytes, more than the {MAX_HEADER:,} "
                        f"safetensors reads: write fewer tensors per file (--max-shard-size) or less metadata "
                        f"(--no-metadata)")
    f.write(struct.pack("<Q", len(raw)) + raw)
    write_tensors(f, stored, progress)
