"""A small pickler (protocol 2, as torch.save writes) for what a checkpoint holds: containers,
numbers, strings, tensor references, torch tokens and the inert placeholders the reader made.
Our own, so that the output is byte-for-byte the same on every run (no set-order or memo
surprises) and so that placeholders are written back exactly as they were read, never imported."""

from __future__ import annotations

import struct
from collections import OrderedDict
from typing import Any, Callable

from ..errors import CkptError
from .model import Storage, TensorRef
from .unpickler import Global, InertCall, InertObject, is_inert_global

_BATCH = 1000


class TorchPickler:
    def __init__(self, storage_record: Callable[[Storage], tuple[str, str, int]]):
        """`storage_record(storage)` -> (key, storage class name, numel) as written."""
        self._storage_record = storage_record
        self._out = bytearray()
        self._memo: dict[int, int] = {}
        self._keep: list = []  # keeps memoized objects alive so their ids stay unique

    def dumps(self, obj: Any) -> bytes:
        self._out += b"\x80\x02"
        self._save(obj)
        self._out += b"."
        return bytes(self._out)

    # -- helpers -------------------------------------------------------------------------------
    def _global(self, module: str, name: str) -> None:
        self._out += b"c" + module.encode() + b"\n" + name.encode() + b"\n"

    def _memoize(self, obj: Any) -> None:
        index = len(self._memo)
        self._memo[id(obj)] = index
        self._keep.append(obj)
        self._out += b"q" + bytes([index]) if index < 256 else b"r" + struct.pack("<I", index)

    def _tuple(self, items) -> None:
        if not items:
            self._out += b")"
            return
        if len(items) <= 3:
            for item in items:
                self._save(item)
            self._out += b"\x85\x86\x87"[len(items) - 1 : len(items)]
            return
        self._out += b"("
        for item in items:
            self._save(item)
        self._out += b"t"

    def _appends(self, items) -> None:
        items = list(items)
        for start in range(0, len(items), _BATCH):
            self._out += b"("
            for item in items[start : start + _BATCH]:
                self._save(item)
            self._out += b"e"

    def _setitems(self, pairs) -> None:
        pairs = list(pairs)
        for start in range(0, len(pairs), _BATCH):
            self._out += b"("
            for key, value in pairs[start : start + _BATCH]:
                self._save(key)
                self._save(value)
            self._out += b"u"

    def _reduce(self, module: str, name: str, args: tuple) -> None:
        self._global(module, name)
        self._tuple(args)
        self._out += b"R"

    # -- the dispatch --------------------------------------------------------------------------
    def _save(self, obj: Any) -> None:
        out = self._out
        kind = type(obj)
        if obj is None:
            out += b"N"
        elif obj is True or obj is False:
            out += b"\x88" if obj else b"\x89"
        elif kind is int:
            if 0 <= obj < 256:
                out += b"K" + bytes([obj])
            elif 0 <= obj < 65536:
                out += b"M" + struct.pack("<H", obj)
            elif -(2**31) <= obj < 2**31:
                out += b"J" + struct.pack("<i", obj)
            else:
                raw = obj.to_bytes((obj.bit_length() + 8) // 8, "little", signed=True)
                if len(raw) > 255:
                    raise CkptError("an integer too large to write")
                out += b"\x8a" + bytes([len(raw)]) + raw
        elif kind is float:
            out += b"G" + struct.pack(">d", obj)
        elif kind is str:
            raw = obj.encode("utf-8", "surrogatepass")
            out += b"X" + struct.pack("<I", len(raw)) + raw
        elif kind is bytes:  # how protocol 2 spells bytes
            self._reduce("_codecs", "encode", (obj.decode("latin1"), "latin1"))
        elif kind is Global:
            self._global(obj.module, obj.name)
        elif is_inert_global(obj):
            self._global(obj._module, obj._name)
        elif id(obj) in self._memo:
            index = self._memo[id(obj)]
            out += b"h" + bytes([index]) if index < 256 else b"j" + struct.pack("<I", index)
        elif kind is tuple:
            self._tuple(obj)
        elif kind is list:
            out += b"]"
            self._memoize(obj)
            self._appends(obj)
        elif kind is dict:
            out += b"}"
            self._memoize(obj)
            self._setitems(obj.items())
        elif kind is OrderedDict:
            self._reduce("collections", "OrderedDict", ())
            self._memoize(obj)
            self._setitems(obj.items())
            if vars(obj):  # a state dict's `_metadata`
                self._save(dict(vars(obj)))
                out += b"b"
        elif kind in (set, frozenset):
            self._reduce("__builtin__", kind.__name__, (_stable_order(obj),))
            self._memoize(obj)
        elif kind is bytearray:
            self._reduce("__builtin__", "bytearray", (obj.decode("latin1"), "latin-1"))
            self._memoize(obj)
        elif kind is complex:
            self._reduce("__builtin__", "complex", (obj.real, obj.imag))
        elif kind is TensorRef:
            self._tensor(obj)
        elif isinstance(obj, InertObject):
            self._inert(obj)
        else:
            raise CkptError(f"cannot write an object of type {kind.__name__} into a .pth file")

    def _tensor(self, tensor: TensorRef) -> None:
        key, storage_class, numel = self._storage_record(tensor.storage)
        if tensor.requires_grad is not None:
            self._global("torch._utils", "_rebuild_parameter")
        self._global("torch._utils", "_rebuild_tensor_v2")
        self._out += b"("
        self._tuple(("storage", Global("torch", storage_class), key, "cpu", numel))
        self._out += b"Q"
        self._save(tensor.offset)
        self._tuple(tensor.shape)
        self._tuple(tensor.stride)
        self._out += b"\x88" if tensor.plain_grad else b"\x89"
        self._reduce("collections", "OrderedDict", ())
        self._out += b"tR"
        if tensor.requires_grad is not None:
            self._out += b"\x88" if tensor.requires_grad else b"\x89"
            self._reduce("collections", "OrderedDict", ())
            self._out += b"\x87R"
        self._memoize(tensor)

    def _inert(self, obj: InertObject) -> None:
        if isinstance(obj, InertCall):
            self._save(obj.callee)
        else:
            self._global(obj._module, obj._name)
        self._tuple(obj.args)
        self._out += b"\x81" if obj.how == "newobj" else b"R"
        self._memoize(obj)
        if obj.listitems:
            self._appends(obj.listitems)
        if obj.dictitems:
            self._setitems(obj.dictitems)
        if obj.state is not None:
            self._save(obj.state)
            self._out += b"b"


def _stable_order(items) -> list:
    try:
        return sorted(items)
    except TypeError:
        return sorted(items, key=repr)
