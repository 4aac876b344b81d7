"""A small pickler (protocol 2, as torch.save writes) for what a checkpoint holds: containers,
numbers, strings, tensor references, torch tokens and the inert placeholders the reader made.
Our own, so that the output is byte-for-byte the same on every run (no set-order or memo
surprises), and so that an output never means more than its input:

- every global name is checked to be a dotted Python name before it is written (a newline in a
  name would otherwise become opcodes in the output);
- placeholders are written back with exactly the construct that built them (GLOBAL + REDUCE,
  NEWOBJ, a call on a call) — the writer never adds a call the input did not make;
- tensors are written the way torch 2.13 writes them: `_rebuild_tensor_v2` over a typed
  storage, `_rebuild_tensor_v3` over an UntypedStorage for the newer dtypes, `_rebuild_qtensor`
  for quantized ones, `_rebuild_parameter(_with_state)` around parameters.
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from itertools import islice
from typing import Any, Callable

from ..dtypes import QUANTIZED, DType
from ..errors import CkptError
from .model import TensorRef
from .pickled import Device, Global, How, InertGlobal, InertObject, PickledSet, TorchSize
from .unpickler import is_dotted_name

_BATCH = 1000
_LAYOUTS_KEPT = 4096  # the plain tensors' layouts whose opcodes are kept (see _plain_tensor)

# storage_record(tensor) -> (key, storage module, storage class, element count, dtype written)
StorageRecord = Callable[[TensorRef], "tuple[str, str, str, int, DType]"]


class PickleRefused(CkptError):
    """What the input holds cannot be written as a .pth (the message says why)."""


def _int_op(value: int) -> bytes:
    """The opcode of an int, in the shortest form protocol 2 has."""
    if 0 <= value < 256:
        return b"K" + bytes([value])
    if 0 <= value < 65536:
        return b"M" + struct.pack("<H", value)
    if -(2**31) <= value < 2**31:
        return b"J" + struct.pack("<i", value)
    raw = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
    if len(raw) > 255:
        raise CkptError("an integer too large to write")
    return b"\x8a" + bytes([len(raw)]) + raw


_OP_U32 = struct.Struct("<cI")  # an opcode and its 4-byte argument: X (a string's length), r (a memo index)


def _str_op(text: str) -> bytes:
    raw = text.encode("utf-8", "surrogatepass")
    return _OP_U32.pack(b"X", len(raw)) + raw


def _put_op(index: int) -> bytes:
    return b"q" + bytes((index,)) if index < 256 else _OP_U32.pack(b"r", index)


class TorchPickler:
    def __init__(self, storage_record: StorageRecord):
        self._storage_record = storage_record
        self._out = bytearray()
        self._memo: dict[int, int] = {}
        self._keep: list = []  # keeps memoized objects alive so their ids stay unique
        self._open: set[int] = set()  # tuples and placeholder calls being written
        self._imported: set[int] = set()
        self._globals: dict[tuple[str, str], bytes] = {}
        self._texts: dict[str, bytes] = {}
        self._int_tuples: dict[tuple, bytes] = {}
        self._plain_pieces: dict[tuple, tuple[bytes, bytes]] = {}  # see _plain_tensor
        self.events: list = []  # the placeholders imported (first time) and called, in write order

    def dumps(self, obj: Any) -> bytearray:
        """The pickle of `obj`: the pickler's own buffer, not a copy (200 000 tensors: 32 MB)."""
        self._out += b"\x80\x02"
        try:
            self._save(obj)
        except RecursionError:
            raise PickleRefused("it nests too deeply to be written") from None
        except CkptError as e:
            raise PickleRefused(str(e)) from None
        self._out += b"."
        return self._out

    # -- helpers -------------------------------------------------------------------------------
    def _global(self, module: str, name: str) -> None:
        self._out += self._global_op(module, name)

    def _global_op(self, module: str, name: str) -> bytes:
        opcode = self._globals.get((module, name))
        if opcode is None:  # checked and encoded once: a state dict names the same few per tensor
            if not (is_dotted_name(module) and is_dotted_name(name)):  # the reader checks too
                raise CkptError(f"cannot write the global {module[:60]!r}.{name[:60]!r}: not a Python name")
            opcode = self._globals[(module, name)] = b"c" + module.encode() + b"\n" + name.encode() + b"\n"
        return opcode

    def _text(self, text: str) -> bytes:
        """The opcodes of a string that recurs (a device, "storage"), encoded once."""
        opcode = self._texts.get(text)
        if opcode is None:
            start = len(self._out)
            self._save(text)  # through the one encoder, then taken back from the output
            opcode = self._texts[text] = bytes(self._out[start:])
            del self._out[start:]
        return opcode

    def _ints(self, values: tuple[int, ...]) -> bytes:
        """The opcodes of a tuple of ints (a shape, a stride), encoded once per distinct tuple."""
        opcode = self._int_tuples.get(values)
        if opcode is None:
            start = len(self._out)
            self._tuple_items(values)
            opcode = self._int_tuples[values] = bytes(self._out[start:])
            del self._out[start:]
        return opcode

    def _memoize(self, obj: Any) -> None:
        if id(obj) in self._memo:  # reached again while it was being written: see _enter
            raise CkptError("an object whose construction contains the object itself")
        index = len(self._memo)
        self._memo[id(obj)] = index
        self._keep.append(obj)
        self._out += _put_op(index)

    def _tuple_items(self, items) -> None:
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

    def _enter(self, obj: Any) -> None:
        """Tuples and placeholder calls are memoized only once built: one reached again from
        inside its own arguments (through a list) cannot be written without making the call
        twice, so it is refused — the input built it once."""
        if id(obj) in self._open:
            raise CkptError("an object whose construction contains the object itself")
        self._open.add(id(obj))

    def _tuple(self, obj: tuple) -> None:
        # memoized, as pickle does: a DAG of tuples is written once per node, not once per path
        self._enter(obj)
        self._tuple_items(obj)
        self._open.discard(id(obj))
        if obj:
            self._memoize(obj)

    def _appends(self, items) -> None:
        items = list(items)
        for start in range(0, len(items), _BATCH):
            self._out += b"("
            for item in items[start : start + _BATCH]:
                self._save(item)
            self._out += b"e"

    def _setitems(self, pairs) -> None:
        out, memo = self._out, self._memo
        pairs = iter(pairs)
        while batch := list(islice(pairs, _BATCH)):  # not 200 000 pairs listed at once
            out += b"("
            for key, value in batch:
                # a state dict's names and tensors: the common case, without the dispatch
                if type(key) is str:
                    out += _str_op(key)
                else:
                    self._save(key)
                if type(value) is TensorRef and id(value) not in memo:
                    self._tensor(value)
                else:
                    self._save(value)
            out += b"u"

    def _reduce(self, module: str, name: str, args: tuple) -> None:
        self._global(module, name)
        self._tuple_items(args)
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
            out += _int_op(obj)
        elif kind is str:
            out += _str_op(obj)
        elif kind is float:
            out += b"G" + struct.pack(">d", obj)
        elif id(obj) in self._memo:  # before the kinds that are memoized
            index = self._memo[id(obj)]
            out += b"h" + bytes((index,)) if index < 256 else _OP_U32.pack(b"j", index)
        elif kind is TensorRef:
            self._tensor(obj)
        elif kind is Global:
            self._global(obj.module, obj.name)
        elif kind is InertGlobal:
            self._global(obj.module, obj.name)
            if id(obj) not in self._imported:
                self._imported.add(id(obj))
                self.events.append(obj)
        elif kind is bytes:  # how protocol 2 spells bytes (b"" too: torch's safe loader refuses bytes())
            self._reduce("_codecs", "encode", (obj.decode("latin1"), "latin1"))
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
            if "_metadata" in vars(obj):  # a state dict's module versions
                self._save({"_metadata": obj._metadata})
                out += b"b"
        elif kind is PickledSet:  # in the order the input listed it
            self._reduce("__builtin__", "set", (obj.items,))
            self._memoize(obj)
        elif kind is set:
            self._reduce("__builtin__", "set", (_stable_order(obj),))
            self._memoize(obj)
        elif kind is bytearray:
            self._reduce("__builtin__", "bytearray", (bytes(obj),) if obj else ())
            self._memoize(obj)
        elif kind is complex:
            self._reduce("__builtin__", "complex", (obj.real, obj.imag))
        elif kind is TorchSize:
            self._reduce("torch", "Size", (tuple(obj),))
        elif kind is Device:
            self._reduce("torch", "device", obj.args)
        elif kind is InertObject:
            self._inert(obj)
        else:
            raise CkptError(f"cannot write an object of type {kind.__name__} into a .pth file")

    def _tensor(self, tensor: TensorRef) -> None:
        if tensor.requires_grad is None and tensor.wrap is None and tensor.quant is None and not tensor.math_bits:
            record = self._storage_record(tensor)
            if record[2] != "UntypedStorage" and record[4].kind != QUANTIZED:
                self._plain_tensor(tensor, record)
                return
        self._enter(tensor)
        parameter = tensor.requires_grad is not None
        with_state = tensor.param_state is not None
        if parameter:  # _rebuild_parameter(tensor, requires_grad, hooks) or ..._with_state(..., state)
            self._global("torch._utils", "_rebuild_parameter_with_state" if with_state else "_rebuild_parameter")
            self._out += b"("
        if tensor.wrap is not None:  # _rebuild_from_type_v2(rebuild, type, args, state)
            self._global("torch._tensor", "_rebuild_from_type_v2")
            self._out += b"("
            record = self._rebuild_call(tensor)
            self._save(tensor.wrap[0])
            self._out += b"("
            self._rebuild_args(tensor, record)
            self._out += b"t"
            self._save(tensor.wrap[1])
            self._out += b"tR"
        else:
            record = self._rebuild_call(tensor)
            self._out += b"("
            self._rebuild_args(tensor, record)
            self._out += b"tR"
        if parameter:
            self._out += b"\x88" if tensor.requires_grad else b"\x89"
            self._reduce("collections", "OrderedDict", ())
            if with_state:
                self._save(tensor.param_state)
            self._out += b"tR"
        if tensor.wrap is not None or tensor.param_state is not None:
            self.events.append(tensor)  # setting its attributes may raise in torch: see the reader
        self._open.discard(id(tensor))
        self._memoize(tensor)

    def _plain_tensor(self, tensor: TensorRef, record: tuple) -> None:
        """What `_tensor` writes for the usual tensor — `_rebuild_tensor_v2` over a typed storage,
        nothing around it — as the storage's key and the memo index between two pieces encoded
        once per layout (storage class, location, size, offset, shape, stride, requires_grad): a
        state dict holds 200 000 of them, in a few layouts. It holds nothing, so it cannot be
        reached from inside itself (no `_enter`), and `_save` found it in no memo."""
        key, module, storage_class, numel, _ = record
        layout = (module, storage_class, tensor.storage.location, numel, tensor.offset, tensor.shape, tensor.stride,
                  tensor.plain_grad)
        pieces = self._plain_pieces.get(layout)
        if pieces is None:
            pieces = self._plain_layout(*layout)
            if len(self._plain_pieces) < _LAYOUTS_KEPT:  # views at many offsets of one storage: not one kept each
                self._plain_pieces[layout] = pieces
        before, after = pieces
        index = len(self._memo)
        self._memo[id(tensor)] = index
        self._keep.append(tensor)
        self._out += b"".join((before, _str_op(key), after, _put_op(index)))

    def _plain_layout(self, module: str, storage_class: str, location: str, numel: int, offset: int,
                      shape: tuple, stride: tuple, plain_grad: bool) -> tuple[bytes, bytes]:
        """The opcodes of a plain tensor before and after its storage's key (see _plain_tensor)."""
        return (self._global_op("torch._utils", "_rebuild_tensor_v2") + b"((" + self._text("storage")
                + self._global_op(module, storage_class),
                self._text(location) + _int_op(numel) + b"tQ" + _int_op(offset) + self._ints(shape)
                + self._ints(stride) + (b"\x88" if plain_grad else b"\x89")
                + self._global_op("collections", "OrderedDict") + b")RtR")

    def _rebuild_call(self, tensor: TensorRef) -> tuple:
        """Write the rebuild function torch 2.13 uses for this tensor; return its storage record."""
        record = self._storage_record(tensor)
        if tensor.quant is not None:
            name = "_rebuild_qtensor"
        elif record[2] == "UntypedStorage":
            name = "_rebuild_tensor_v3"
        else:
            name = "_rebuild_tensor_v2"
        if record[4].kind == QUANTIZED and tensor.quant is None:
            raise CkptError(f"a {record[4].name} tensor without its scales and zero points")
        self._global("torch._utils", name)
        return record

    def _rebuild_args(self, tensor: TensorRef, record: tuple) -> None:
        key, module, storage_class, numel, dtype = record
        self._out += b"(" + self._text("storage")  # the storage record, a persistent id
        self._global(module, storage_class)
        self._save(key)
        # as read: torch.load cannot restore some locations without map_location (or at all),
        # and an unsafe load stops there — writing "cpu" would let it go on
        self._out += self._text(tensor.storage.location)
        self._save(numel)
        self._out += b"tQ"
        self._save(tensor.offset)
        self._out += self._ints(tensor.shape) + self._ints(tensor.stride)
        q = tensor.quant
        if q is not None:
            self._tuple_items((q.scheme, q.scale, q.zero_point) if q.axis is None
                              else (q.scheme, q.scale, q.zero_point, q.axis))
        self._out += b"\x88" if tensor.plain_grad else b"\x89"
        self._reduce("collections", "OrderedDict", ())
        if storage_class == "UntypedStorage":
            self._global("torch", dtype.name)
        if tensor.math_bits:
            self._save({bit: True for bit in tensor.math_bits})

    def _inert(self, obj: InertObject) -> None:
        self._enter(obj)
        self._save(obj.callee)
        self._tuple_items(obj.args)
        self._out += b"\x81" if obj.how is How.NEWOBJ else b"R"
        self.events.append(obj)
        self._open.discard(id(obj))
        self._memoize(obj)
        if obj.listitems:
            self._appends(obj.listitems)
        if obj.dictitems:
            self._setitems(obj.dictitems)
        if obj.state is not None:
            self._save(obj.state)
            self._out += b"b"


def _stable_order(items) -> list:
    """A set made by the library (not read from a file): sorted, for the same bytes every run."""
    try:
        return sorted(items)
    except TypeError:
        raise CkptError("a set of values that cannot be ordered cannot be written reproducibly") from None
