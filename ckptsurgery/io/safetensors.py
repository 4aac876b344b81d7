"""Reader for safetensors: an 8-byte little-endian header length, a JSON header naming each
tensor's dtype, shape and byte range, then the bytes. Everything is checked before it is used."""

from __future__ import annotations

import json
import struct
from collections import OrderedDict

from .. import dtypes
from ..errors import CkptError
from .model import Checkpoint, MappedFile, Storage, TensorRef, contiguous_strides, numel_of

MAX_HEADER = 100 * 1024 * 1024  # the safetensors library's own limit
ALIASES_KEY = "ckptsurgery.aliases"  # metadata recording tied names stored once


def read_header(path: str, source: MappedFile) -> tuple[int, dict]:
    if source.size < 8:
        raise CkptError(f"{path}: too short for a safetensors file ({source.size} bytes)")
    (length,) = struct.unpack("<Q", source.view(0, 8))
    if length > min(MAX_HEADER, source.size - 8):
        raise CkptError(f"{path}: header length {length} runs past the end of the "
                        f"{source.size}-byte file (truncated or not safetensors)")
    try:
        header = json.loads(bytes(source.view(8, length)).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise CkptError(f"{path}: the safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CkptError(f"{path}: the safetensors header is not a JSON object")
    return 8 + length, header


def _metadata(path: str, header: dict) -> dict[str, str]:
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise CkptError(f"{path}: __metadata__ must map strings to strings")
    return meta


def read_safetensors(path: str) -> Checkpoint:
    source = MappedFile(path)
    data_start, header = read_header(path, source)
    metadata = _metadata(path, header)
    data_size = source.size - data_start
    tensors: OrderedDict[str, TensorRef] = OrderedDict()
    spans = []
    for name, info in header.items():
        where = f"{path}: tensor {name!r}"
        if not isinstance(info, dict):
            raise CkptError(f"{where}: entry is not an object")
        dtype = dtypes.BY_SAFETENSORS.get(info.get("dtype"))
        if dtype is None:
            raise CkptError(f"{where}: unknown dtype {info.get('dtype')!r}")
        shape, offsets = info.get("shape"), info.get("data_offsets")
        if not (isinstance(shape, list) and all(type(s) is int and s >= 0 for s in shape)):
            raise CkptError(f"{where}: shape {shape!r} is not a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
            raise CkptError(f"{where}: data_offsets {offsets!r} is not a pair of integers")
        begin, end = offsets
        numel = numel_of(tuple(shape))
        if not 0 <= begin <= end <= data_size:
            raise CkptError(f"{where}: data_offsets {offsets} lie outside the {data_size}-byte data")
        if end - begin != numel * dtype.itemsize:
            raise CkptError(f"{where}: {end - begin} bytes for {numel} {dtype.name} elements")
        spans.append((begin, end, name))
        storage = Storage(source, data_start + begin, numel, dtype, name)
        tensors[name] = TensorRef(storage, 0, tuple(shape), contiguous_strides(tuple(shape)))
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            problem = "overlaps the tensor before it" if begin < position else "leaves a gap before it"
            raise CkptError(f"{path}: tensor {name!r} at byte {begin} {problem}")
        position = end
    if position != data_size:
        raise CkptError(f"{path}: {data_size - position} bytes after the last tensor (corrupt file)")
    _restore_aliases(path, tensors, metadata)
    return Checkpoint(path, "safetensors", tensors, None, None, metadata, sources=[source])


def _restore_aliases(path: str, tensors: OrderedDict, metadata: dict[str, str]) -> None:
    """Tied names written once by ckptsurgery come back as views of the same storage, in their
    original place: the metadata lists [alias, target, position]."""
    if ALIASES_KEY not in metadata:
        return
    try:
        aliases = json.loads(metadata[ALIASES_KEY])
        items = list(tensors.items())
        for alias, target, position in aliases:
            items.insert(position, (alias, tensors[target]))
    except (ValueError, TypeError, KeyError) as e:
        raise CkptError(f"{path}: malformed {ALIASES_KEY} metadata ({e})") from None
    tensors.clear()
    tensors.update(items)
