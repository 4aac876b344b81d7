"""An unpickler that never runs code from the file, held to the bar of torch's own
`torch/_weights_only_unpickler.py`, opcode by opcode.

- Only the opcodes torch's weights-only loader accepts are read (`ALLOWED_OPCODES`); any other —
  STACK_GLOBAL, EXT1, INST, OBJ, PERSID, BINBYTES, FRAME, BYTEARRAY8, ... — refuses the file.
- GLOBAL opens onto a short allow-list of our own functions (tensor rebuilders that check their
  arguments, a few value constructors) and immutable tokens (dtypes, storage types, qschemes).
  Every other name becomes an inert placeholder made fresh for this load: calling it records
  the call, never performs it. A whole pickled `nn.Module` therefore unpickles into placeholders
  whose `_parameters`, `_buffers` and `_modules` we walk without the user's code.
- REDUCE calls only our functions; NEWOBJ builds only placeholders; BUILD sets state only on a
  placeholder (recorded) or an OrderedDict (`_metadata` only); APPEND and SETITEM only reach
  lists, dicts and placeholders; persistent ids are storage records only.
- Containers may not nest more than MAX_NESTING deep (CPython hashes nested tuples recursively
  in C: a million of them crash the interpreter), and nothing a pickle does outlives its load.
"""

from __future__ import annotations

import io
import pickle
import re
import struct
from collections import OrderedDict
from dataclasses import replace
from itertools import repeat
from operator import is_
from typing import Any, Callable

from .. import dtypes
from ..errors import CkptError
from .model import QuantParams, Storage, TensorRef, collection_paused, contiguous_strides
from .pickled import Device, FrozenRecord, Global, GlobalKind, How, InertGlobal, InertObject, PickledSet, TorchSize

MAX_NESTING = 200
_PLAIN = {int, float, str, bytes, bool, type(None), complex, Global}  # values that hold nothing
# Hashing or comparing a tuple visits every tuple inside it, once per path: a DAG of 60 tuples
# that each hold the previous one twice costs 2**60 steps. Count the paths; refuse beyond this.
MAX_TUPLE_PATHS = 100_000
# ... and each use of a tuple as a dict key or set member hashes it again: the paths hashed in all
# are bounded too (one big tuple used as a key 100 000 times would take minutes).
MAX_HASH_WORK = 2_000_000


# Views with stride 0 can present a few stored bytes as a huge tensor, which --stats, diff and
# convert would then materialise. Real checkpoints barely do this; a file may not make us
# produce more than this many bytes it does not hold.
MAX_REPEATED_BYTES = 256 * 2**20


class StorageHandle:
    """What a persistent id unpickles to: one storage's bytes, and the typed-storage dtype of
    its record (None for an UntypedStorage record). `repeated` is shared by the handles of one
    file: the bytes its views repeat beyond what their storages hold."""

    __slots__ = ("storage", "dtype", "numel", "repeated")

    def __init__(self, storage: Storage, dtype: dtypes.DType | None, numel: int, repeated: list[int]):
        self.storage, self.dtype, self.numel, self.repeated = storage, dtype, numel, repeated


# ---- allow-listed callables: our own code, checking their arguments --------------------------

def _expect(cond: bool, what: str) -> None:
    if not cond:
        raise CkptError(f"malformed tensor record: {what}")


def _ints(value, what: str) -> tuple[int, ...]:
    _expect(type(value) in (tuple, list, TorchSize) and all(type(v) is int for v in value), what)
    return tuple(value)


def _no_hooks(hooks) -> None:
    _expect(hooks is None or (type(hooks) in (OrderedDict, dict) and not hooks), "backward hooks on a tensor")


# The dtypes whose lazy conj / neg bit torch can apply (its conj_physical and neg kernels)
_CONJ_DTYPES = ("complex64", "complex128")
_NEG_DTYPES = ("float16", "bfloat16", "float32", "float64", "int8", "int16", "int32", "int64", *_CONJ_DTYPES)


def _math_bits(metadata, dtype: dtypes.DType) -> tuple[str, ...]:
    """torch's tensor metadata: {"conj": True} / {"neg": True} for a lazily conjugated or
    negated view whose bytes are stored unresolved."""
    if metadata is None:
        return ()
    _expect(type(metadata) is dict and all(k in ("conj", "neg") and type(v) is bool for k, v in metadata.items()),
            "unknown tensor metadata")
    bits = tuple(sorted(k for k, v in metadata.items() if v))
    for bit, allowed in (("conj", _CONJ_DTYPES), ("neg", _NEG_DTYPES)):
        _expect(bit not in bits or dtype.name in allowed, f"a {bit} bit on a {dtype.name} tensor, which torch cannot apply")
    return bits


def _grad(requires_grad, dtype: dtypes.DType) -> bool:
    _expect(type(requires_grad) is bool, "requires_grad is not a bool")
    # torch refuses to load such a tensor: a rewrite must not quietly make it loadable
    _expect(not requires_grad or dtype.kind in (dtypes.FLOAT, dtypes.FLOAT8, dtypes.COMPLEX),
            f"requires_grad on a {dtype.name} tensor, which torch refuses")
    return requires_grad


def _tensor(handle, offset, size, stride, dtype: dtypes.DType, **extra) -> TensorRef:
    tensor = TensorRef(handle.storage, offset, _ints(size, "bad size"), _ints(stride, "bad stride"), dtype, **extra)
    tensor.validate(lambda: f"tensor in storage {handle.storage.key[:40]!r}")
    if tensor.stride == contiguous_strides(tensor.shape):  # the common case: no element repeats
        return tensor
    handle.repeated[0] += tensor.repeated_bytes()
    if handle.repeated[0] > MAX_REPEATED_BYTES:
        raise CkptError(f"tensors view their storages' bytes over and over (stride 0), adding up to more "
                        f"than {MAX_REPEATED_BYTES >> 20} MiB the file does not hold: refused")
    return tensor


def _typed(handle) -> dtypes.DType:
    """The dtype torch gives a tensor rebuilt with `_rebuild_tensor_v2` over this storage: the
    first record's (torch caches one typed storage per key; an UntypedStorage as uint8)."""
    _expect(isinstance(handle, StorageHandle), "storage is not a storage")
    return handle.dtype or dtypes.BY_NAME["uint8"]


def _rebuild_tensor(storage, storage_offset, size, stride):
    return _tensor(storage, storage_offset, size, stride, _typed(storage))


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata=None):
    dtype = _typed(storage)
    _expect(dtype.kind != dtypes.QUANTIZED, "a quantized storage without its scales")
    _no_hooks(backward_hooks)
    return _tensor(storage, storage_offset, size, stride, dtype,
                   plain_grad=_grad(requires_grad, dtype), math_bits=_math_bits(metadata, dtype))


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None):
    _expect(isinstance(storage, StorageHandle), "storage is not a storage")
    _expect(isinstance(dtype, Global) and dtype.kind is GlobalKind.DTYPE, "unknown dtype")
    _expect(dtype.dtype.kind != dtypes.QUANTIZED, "a quantized dtype without its scales")
    _no_hooks(backward_hooks)
    return _tensor(storage, storage_offset, size, stride, dtype.dtype,
                   plain_grad=_grad(requires_grad, dtype.dtype), math_bits=_math_bits(metadata, dtype.dtype))


def _quant_params(params) -> QuantParams:
    _expect(type(params) is tuple and params and isinstance(params[0], Global) and params[0].kind is GlobalKind.QSCHEME,
            "bad quantizer parameters")
    scheme = params[0]
    # the schemes torch's _rebuild_qtensor rebuilds; it raises on the symmetric ones
    _expect(scheme.name in ("per_tensor_affine", "per_channel_affine", "per_channel_affine_float_qparams"),
            f"quantization scheme {scheme.name}, which torch cannot load")
    if scheme.name.startswith("per_tensor"):
        _expect(len(params) == 3 and type(params[1]) is float and type(params[2]) is int, "bad per-tensor scale")
        return QuantParams(scheme, params[1], params[2])
    _expect(len(params) == 4 and all(isinstance(p, TensorRef) and p.is_plain for p in params[1:3])
            and type(params[3]) is int, "bad per-channel scales")
    _expect(params[1].dtype.kind == dtypes.FLOAT and params[2].dtype.kind in (dtypes.FLOAT, dtypes.INT),
            "per-channel scales or zero points of a dtype torch does not use")
    return QuantParams(scheme, params[1], params[2], params[3])


def _rebuild_qtensor(storage, storage_offset, size, stride, quantizer_params, requires_grad, backward_hooks):
    dtype = _typed(storage)
    _expect(dtype.kind == dtypes.QUANTIZED, "a quantized tensor on a storage that is not quantized")
    _no_hooks(backward_hooks)
    quant = _quant_params(quantizer_params)
    tensor = _tensor(storage, storage_offset, size, stride, dtype, plain_grad=_grad(requires_grad, dtype), quant=quant)
    if quant.axis is not None:
        _expect(0 <= quant.axis < len(tensor.shape) and quant.scale.shape == quant.zero_point.shape
                == (tensor.shape[quant.axis],), "per-channel scales do not match the tensor")
    return tensor


def _rebuild_parameter(data, requires_grad, backward_hooks):
    return _rebuild_parameter_with_state(data, requires_grad, backward_hooks, None)


def _object_state(state) -> bool:
    """A state torch's `_set_obj_state` accepts: None, a dict, or a (dict, slots) pair."""
    if state is None or type(state) is dict:
        return True
    return type(state) is tuple and len(state) == 2 and all(s is None or type(s) is dict for s in state)


def _rebuild_parameter_with_state(data, requires_grad, backward_hooks, state):
    _expect(isinstance(data, TensorRef) and data.requires_grad is None, "parameter without a tensor")
    _grad(requires_grad, data.dtype)
    _no_hooks(backward_hooks)
    _expect(_object_state(state), "a parameter state torch refuses")
    # a new reference: the pickle may use `data` elsewhere as a plain tensor (same storage, so
    # the two stay tied); attributes set on the parameter are carried into .pth outputs
    return replace(data, requires_grad=requires_grad, plain_grad=False, param_state=state)


def _rebuild_from_type_v2(func, new_type, args, state):
    # How torch pickles a tensor with attributes, or of a subclass: the type and the attributes
    # are kept (and written back) with the tensor. Only our own rebuilders may be called;
    # anything else the pickle offers as `func` stays inert.
    if func in _REBUILDERS and type(args) is tuple:
        tensor = func(*args)
        _expect(_object_state(state), "a tensor state torch refuses")
        plain = new_type is ALLOWED[("torch", "Tensor")] and (state is None or state == {})
        return tensor if plain else replace(tensor, wrap=(new_type, state))
    return InertObject(InertGlobal("torch._tensor", "_rebuild_from_type_v2"), How.REDUCE, (func, new_type, args, state))


def _codecs_encode(text, encoding="utf-8"):
    # protocol 2 pickles bytes as _codecs.encode(str, "latin1")
    _expect(type(text) is str and encoding in ("latin1", "latin-1"), "bad bytes record")
    return text.encode("latin1")


def _bytes(*args):
    _expect(args == (), "bytes of an argument")  # protocol 2 spells b"" as bytes()
    return b""


def _bytearray(*args):
    _expect(args == () or (len(args) == 1 and type(args[0]) is bytes), "bytearray of a size or text")
    return bytearray(*args)


def _hashable(keys) -> None:
    """torch hashes a placeholder's instance by running its class's code, which may raise
    (argparse.Namespace is unhashable); we cannot know, so we refuse it as a key or member."""
    if any(isinstance(k, InertObject) for k in keys):
        raise CkptError("malformed pickle: an instance of a class it does not allow as a dict key or set member")


def _set(items=()):
    _expect(type(items) in (list, tuple), "set of a non-list")
    _hashable(items)
    return PickledSet(list(items))


def _complex(real=0.0, imag=0.0):
    _expect(type(real) in (int, float) and type(imag) in (int, float), "complex of non-numbers")
    return complex(real, imag)


def _torch_size(dims=()):
    return TorchSize(_ints(dims, "bad torch.Size"))


# torch's device types (c10/core/DeviceType.h), as torch.device() and storage locations take them
# (tests/test_dtypes.py checks each against torch.device)
DEVICE_TYPES = ("cpu", "cuda", "mkldnn", "opengl", "opencl", "ideep", "hip", "fpga", "maia", "xla",
                "vulkan", "xpu", "mps", "meta", "hpu", "ve", "lazy", "ipu", "mtia", "privateuseone")
_DEVICE = re.compile(r"(%s)(:(0|[1-9][0-9]{0,3}))?" % "|".join(DEVICE_TYPES))


def is_device(text: str) -> bool:
    """A device string torch accepts ("cpu", "cuda:0"); torch refuses any other at load."""
    return type(text) is str and _DEVICE.fullmatch(text) is not None


def _torch_device(kind, index=None):
    _expect(is_device(kind) and (index is None or (type(index) is int and 0 <= index < 10_000 and ":" not in kind)),
            "a torch.device torch itself would refuse")
    return Device((kind,) if index is None else (kind, index))


_REBUILDERS = {_rebuild_tensor, _rebuild_tensor_v2, _rebuild_tensor_v3, _rebuild_qtensor}

# (module, name) -> a function we call, or an immutable token. Everything else is inert.
ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_qtensor"): _rebuild_qtensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch", "Size"): _torch_size,
    ("torch", "device"): _torch_device,
    ("torch", "Tensor"): Global("torch", "Tensor", GlobalKind.TENSOR_TYPE),  # the type of a plain tensor
    ("_codecs", "encode"): _codecs_encode,
}
for _builtins in ("builtins", "__builtin__"):  # protocol 2 writes Python 2's name
    ALLOWED[(_builtins, "bytes")] = _bytes
    ALLOWED[(_builtins, "bytearray")] = _bytearray
    ALLOWED[(_builtins, "set")] = _set
    ALLOWED[(_builtins, "complex")] = _complex
for _dt in dtypes.BY_NAME.values():
    ALLOWED[("torch", _dt.name)] = Global("torch", _dt.name, GlobalKind.DTYPE, _dt)
    if _dt.storage:
        ALLOWED[("torch", _dt.storage)] = Global("torch", _dt.storage, GlobalKind.STORAGE, _dt)
for _module in ("torch", "torch.storage"):
    ALLOWED[(_module, "UntypedStorage")] = Global(_module, "UntypedStorage", GlobalKind.STORAGE)
for _scheme in dtypes.QSCHEMES:
    ALLOWED[("torch", _scheme)] = Global("torch", _scheme, GlobalKind.QSCHEME)
_CALLABLE = {id(v) for v in ALLOWED.values() if callable(v) and not isinstance(v, Global)}


def is_dotted_name(text: str) -> bool:
    """A Python module path or qualified name: what GLOBAL may name, and what we write back."""
    return isinstance(text, str) and all(part.isidentifier() for part in text.split("."))


# The opcodes torch's weights-only unpickler reads (torch/_weights_only_unpickler.py, torch 2.13).
ALLOWED_OPCODES = {
    pickle.GLOBAL, pickle.NEWOBJ, pickle.REDUCE, pickle.BUILD, pickle.APPEND, pickle.APPENDS,
    pickle.SETITEM, pickle.SETITEMS, pickle.MARK, pickle.TUPLE, pickle.TUPLE1, pickle.TUPLE2,
    pickle.TUPLE3, pickle.NONE, pickle.NEWFALSE, pickle.NEWTRUE, pickle.EMPTY_TUPLE,
    pickle.EMPTY_LIST, pickle.EMPTY_DICT, pickle.EMPTY_SET, pickle.BININT, pickle.BININT1,
    pickle.BININT2, pickle.BINFLOAT, pickle.BINUNICODE, pickle.SHORT_BINSTRING, pickle.BINPERSID,
    pickle.BINGET, pickle.LONG_BINGET, pickle.BINPUT, pickle.LONG_BINPUT, pickle.LONG1,
    pickle.PROTO, pickle.STOP,
}
_OPCODE_NAMES = {getattr(pickle, n)[0]: n for n in dir(pickle) if n.isupper() and isinstance(getattr(pickle, n), bytes)
                 and len(getattr(pickle, n)) == 1}


class _Dispatch(dict):
    def __missing__(self, code: int):
        name = _OPCODE_NAMES.get(code)
        if name is None:
            raise CkptError(f"not a valid pickle (unknown opcode byte {code:#04x})")
        raise CkptError(f"the pickle uses opcode {name}, which checkpoints never need "
                        f"(torch's weights-only loader refuses it too)")


# Python's own pure-Python unpickler, not the C one, restricted to ALLOWED_OPCODES: the C
# unpickler grows its memo table to the largest index a LONG_BINPUT names, so four bytes of a
# hostile file could make it reserve tens of gigabytes; this one keeps the memo in a dict.
class SafeUnpickler(pickle._Unpickler):
    dispatch = _Dispatch()

    def __init__(self, file, persistent_load: Callable[[Any], Any]):
        super().__init__(file, encoding="utf-8")
        self._source = file  # what a frame's length is held to (MetadataUnpickler.load_frame)
        self._load_persistent = persistent_load
        # what an unsafe torch.load of this pickle would do with placeholders, in order: import
        # one (its InertGlobal, once) or call one (the InertObject made): see write.check_not_more_executable
        self.events: list = []
        self._placeholders: dict[tuple[str, str], InertGlobal] = {}
        self._depth: dict[int, int] = {}  # id -> nesting depth, of containers built so far
        self._tuple_paths: dict[int, int] = {}  # id -> tuples reached from this tuple, counted per path
        self._hash_work = 0  # tuple paths hashed so far, as dict keys and set members
        self._alive: list = []  # keeps them alive, so that their ids stay theirs

    def load(self):
        """Python's own loop, reading the file directly: FRAME is refused here, so its unframer
        would only add a call to every read (~50 per tensor)."""
        self.read, self.readline = self._file_read, self._file_readline
        self.metastack, self.stack, self.proto = [], [], 0
        self.append = self.stack.append
        read, dispatch, memo, unpack = self.read, self.dispatch, self.memo, struct.unpack
        try:
            while True:
                key = read(1)
                # the three opcodes of every other step of a state dict, without a call each
                if key == b"r":  # LONG_BINPUT
                    memo[unpack("<I", read(4))[0]] = self.stack[-1]
                elif key == b"h":  # BINGET
                    self.append(memo[read(1)[0]])
                elif key == b"K":  # BININT1
                    self.append(read(1)[0])
                elif key:
                    dispatch[key[0]](self)
                else:
                    raise EOFError
        except pickle._Stop as stop:
            return stop.value

    # -- nesting ---------------------------------------------------------------------------
    # A state dict of 200 000 tensors builds ~1.2 M containers; the bookkeeping costs a few C-level
    # maps over the children. Three kinds of results are not recorded at all: tuples of plain
    # values (a tensor's size, stride and storage record), containers built empty, and plain
    # tensors. Their parents count them as depth 0 (one less than a tuple of values or an empty
    # container is: only ever at the bottom, so the bound is MAX_NESTING + 1) and a tuple among
    # them as one path (exactly what it is).
    def _nested(self, obj, children) -> Any:
        """Record `obj`, built from `children`."""
        is_tuple = type(obj) is tuple
        if is_tuple and set(map(type, children)) <= _PLAIN:
            return obj
        depths = self._depth
        # per child, the paths it adds if it is not recorded: 1 for a tuple of values, else 0
        unrecorded_paths = map(is_, map(type, children), repeat(tuple)) if is_tuple else None
        if depths.keys().isdisjoint(map(id, children)):  # the common case: none of them nests
            depth, paths = 1, (1 + sum(unrecorded_paths) if is_tuple else 0)
        else:
            depth = 1 + max(map(depths.get, map(id, children), repeat(0)), default=0)
            if depth > MAX_NESTING:
                raise CkptError(f"the pickle nests containers more than {MAX_NESTING} deep")
            paths = 1 + sum(map(self._tuple_paths.get, map(id, children), unrecorded_paths)) if is_tuple else 0
        key = id(obj)
        if is_tuple:
            if paths > MAX_TUPLE_PATHS:
                raise CkptError(f"the pickle builds tuples within tuples along more than {MAX_TUPLE_PATHS} paths "
                                f"(a shared-subtuple bomb)")
            self._tuple_paths[key] = paths
        known = depths.get(key)
        if known is None:
            self._alive.append(obj)  # keeps it alive, so that its id stays its own
        if known is None or depth > known:
            depths[key] = depth
        return obj

    def _grow(self, container, children) -> None:
        """A container that gained children is at least one deeper than each of them."""
        depths = self._depth
        depth = 1 + max(map(depths.get, map(id, children), repeat(0)), default=0)
        key = id(container)
        known = depths.get(key)
        if known is None:
            self._alive.append(container)
        elif known >= depth:
            return
        if depth > MAX_NESTING:
            raise CkptError(f"the pickle nests containers more than {MAX_NESTING} deep")
        depths[key] = depth

    # -- globals and calls -----------------------------------------------------------------
    def find_class(self, module: str, name: str) -> Any:
        if not (is_dotted_name(module) and is_dotted_name(name)):
            raise CkptError(f"the pickle names a global that is not a Python name: {module[:60]!r} {name[:60]!r}")
        allowed = ALLOWED.get((module, name))
        if allowed is not None:
            return allowed
        key = (module, name)
        if key not in self._placeholders:
            self._placeholders[key] = InertGlobal(module, name)
            self.events.append(self._placeholders[key])
        return self._placeholders[key]

    def load_global(self):
        module = self.readline()[:-1].decode("utf-8")
        name = self.readline()[:-1].decode("utf-8")
        self.append(self.find_class(module, name))

    def load_reduce(self):
        stack = self.stack
        args = stack.pop()
        func = stack[-1]
        if type(args) is not tuple:
            raise CkptError("malformed pickle: a call whose arguments are not a tuple")
        if id(func) in _CALLABLE:
            if func is _set and args and type(args[0]) in (list, tuple):
                self._hashing(args[0])
            result = func(*args)
            # torch runs more code here than we do — a placeholder's call, or setattr of a
            # tensor's or parameter's attributes — and any of it may raise: an event too
            if type(result) is TensorRef:
                if result.wrap is None and result.param_state is None:
                    stack[-1] = result  # a plain tensor: nothing nests in it
                    return
                self.events.append(result)
            elif type(result) is InertObject:
                self.events.append(result)
        elif type(func) is InertGlobal:
            result = InertObject(func, How.REDUCE, args)
            self.events.append(result)
        elif type(func) is InertObject:  # a call on what an earlier call returned: it holds that too
            result = InertObject(func, How.CALL, args)
            self.events.append(result)
            args = (func, *args)
        else:
            raise CkptError(f"malformed pickle: it calls {_describe(func)}, which is not callable here")
        stack[-1] = self._nested(result, args) if args else result  # a call of nothing builds afresh

    def load_newobj(self):
        args = self.stack.pop()
        cls = self.stack.pop()
        if not isinstance(cls, InertGlobal) or type(args) is not tuple:
            raise CkptError(f"malformed pickle: NEWOBJ on {_describe(cls)}, which is not a class it may create")
        obj = InertObject(cls, How.NEWOBJ, args)
        self.events.append(obj)
        self.append(self._nested(obj, args))

    def load_build(self):
        state = self.stack.pop()
        inst = self.stack[-1]
        if type(inst) is InertObject:
            if inst.state is not None:
                raise CkptError(f"malformed pickle: it sets the state of {inst.qualname()} twice")
            inst.state = state
        elif type(inst) is OrderedDict:
            # a state dict's `_metadata` (module versions), and nothing else: an attribute
            # named `items` or `keys` would change what the dict shows to its readers
            if type(state) is not dict or set(state) != {"_metadata"}:
                raise CkptError("malformed pickle: it sets attributes other than _metadata on an OrderedDict")
            inst._metadata = state["_metadata"]
        else:
            raise CkptError(f"malformed pickle: it sets state on {_describe(inst)}")
        self._grow(inst, (state,))

    def load_binpersid(self):
        pid = self.stack.pop()
        if type(pid) is not tuple:
            raise CkptError("malformed pickle: a persistent id that is not a storage record")
        self.append(self._load_persistent(pid))

    # -- containers ------------------------------------------------------------------------
    def load_tuple(self):
        items = self.pop_mark()
        self.append(self._nested(tuple(items), items))

    def load_tuple1(self):
        self.stack[-1] = self._nested((self.stack[-1],), self.stack[-1:])

    def load_tuple2(self):
        items = self.stack[-2:]
        self.stack[-2:] = [self._nested(tuple(items), items)]

    def load_tuple3(self):
        items = self.stack[-3:]
        self.stack[-3:] = [self._nested(tuple(items), items)]

    def load_empty_list(self):
        self.append([])

    def load_empty_dictionary(self):
        self.append({})

    def load_empty_set(self):
        self.append(set())

    def _list_target(self):
        target = self.stack[-1]
        if type(target) is not list and type(target) is not InertObject:
            raise CkptError(f"malformed pickle: it appends to {_describe(target)}")
        return target

    def load_append(self):
        item = self.stack.pop()
        target = self._list_target()
        (target.listitems if type(target) is InertObject else target).append(item)
        self._grow(target, (item,))

    def load_appends(self):
        items = self.pop_mark()
        target = self._list_target()
        (target.listitems if type(target) is InertObject else target).extend(items)
        self._grow(target, items)

    def _hashing(self, keys) -> None:
        """Account for hashing `keys`: a tuple costs a step per path through it."""
        self._hash_work += sum(self._tuple_paths.get(id(k), 1) for k in keys if isinstance(k, tuple))
        if self._hash_work > MAX_HASH_WORK:
            raise CkptError(f"the pickle hashes tuples along more than {MAX_HASH_WORK} paths in all "
                            f"(one big tuple used as a key over and over)")

    def _set_items(self, items: list) -> None:
        target = self.stack[-1]
        _hashable(items[::2])
        self._hashing(items[::2])
        if type(target) is InertObject:
            target.dictitems.extend(zip(items[::2], items[1::2]))
        elif type(target) in (dict, OrderedDict):
            for i in range(0, len(items), 2):
                target[items[i]] = items[i + 1]
        else:
            raise CkptError(f"malformed pickle: it sets items on {_describe(target)}")
        self._grow(target, items)

    def load_setitem(self):
        value = self.stack.pop()
        key = self.stack.pop()
        self._set_items([key, value])

    def load_setitems(self):
        self._set_items(self.pop_mark())

    def load_stop(self):
        # torch.save leaves exactly the object; anything else on the stack would be dropped by
        # a rewrite — and with it, say, a failing import that stops an unsafe load early
        if len(self.stack) != 1 or self.metastack:
            raise CkptError("malformed pickle: values left over on its stack at the end")
        raise pickle._Stop(self.stack.pop())



for _code in ALLOWED_OPCODES:
    SafeUnpickler.dispatch[_code[0]] = pickle._Unpickler.dispatch[_code[0]]
for _code, _method in ((pickle.GLOBAL, "load_global"), (pickle.STOP, "load_stop"),
                       (pickle.REDUCE, "load_reduce"), (pickle.NEWOBJ, "load_newobj"),
                       (pickle.BUILD, "load_build"), (pickle.BINPERSID, "load_binpersid"),
                       (pickle.TUPLE, "load_tuple"), (pickle.TUPLE1, "load_tuple1"), (pickle.TUPLE2, "load_tuple2"),
                       (pickle.TUPLE3, "load_tuple3"), (pickle.EMPTY_LIST, "load_empty_list"),
                       (pickle.EMPTY_DICT, "load_empty_dictionary"), (pickle.EMPTY_SET, "load_empty_set"),
                       (pickle.APPEND, "load_append"), (pickle.APPENDS, "load_appends"),
                       (pickle.SETITEM, "load_setitem"), (pickle.SETITEMS, "load_setitems")):
    SafeUnpickler.dispatch[_code[0]] = getattr(SafeUnpickler, _method)
assert set(SafeUnpickler.dispatch) == {c[0] for c in ALLOWED_OPCODES}


class MetadataUnpickler(SafeUnpickler):
    """For the metadata files of distributed checkpoints (DCP's `.metadata`): a plain
    `pickle.dump` of the engine's own dataclasses, protocol 4. On top of SafeUnpickler's rules it
    reads the protocol-4 opcodes such a dump uses, and lets instances of `key_classes` be dict
    keys, as FrozenRecords of their state (DCP keys `storage_data` by MetadataIndex). Every class
    is still a placeholder: nothing is imported or called."""

    dispatch = _Dispatch(SafeUnpickler.dispatch)
    key_classes: frozenset[str] = frozenset()

    def load_frame(self):
        # A frame only tells a reader how much to fetch at once; the opcodes read the same
        # without it (Python's unframer would add a call to each of ~15 M reads of a
        # 100 000-chunk .metadata). Its length is read, and the bytes follow in the stream —
        # all of them: Python's unpickler, which torch's loader is, refuses a frame that runs
        # past the end ("pickle data was truncated"), so a cut file is refused here too.
        (size,) = struct.unpack("<Q", self.read(8))
        if size > _MAX_FRAME:
            raise CkptError(f"a protocol-4 frame of {size} bytes, more than any metadata file holds")
        left = _bytes_left(self._source)
        if left is not None and size > left:
            raise CkptError(f"not a valid pickle (a frame of {size} bytes runs past the end, {left} left: "
                            f"truncated? torch's loader refuses it too)")

    def _set_items(self, items: list) -> None:
        items = list(items)
        for i in range(0, len(items), 2):
            key = items[i]
            if type(key) is InertObject and key.qualname() in self.key_classes:
                self._hashing([v for v in key.state.values() if isinstance(v, tuple)] if type(key.state) is dict else [])
                items[i] = _frozen(key)
        super()._set_items(items)


def _frozen(obj: InertObject) -> FrozenRecord:
    state = obj.state
    if obj.how is not How.NEWOBJ or obj.args or type(state) is not dict or not all(type(k) is str for k in state):
        raise CkptError(f"malformed pickle: a {obj.qualname()} key that is not a plain record")
    try:
        return FrozenRecord(obj.qualname(), tuple(state.items()))
    except TypeError:  # hash(): a field holding a list or dict
        raise CkptError(f"malformed pickle: a {obj.qualname()} key with a field that cannot be a key") from None


_MAX_FRAME = 1 << 30


def _bytes_left(file) -> int | None:
    """The bytes a reader the unpickler reads from has not given yet (a BoundedReader, a BytesIO)."""
    if isinstance(file, BoundedReader):
        return file.left
    if isinstance(file, io.BytesIO):
        return file.getbuffer().nbytes - file.tell()
    return None
PROTOCOL4_OPCODES = {pickle.FRAME, pickle.STACK_GLOBAL, pickle.MEMOIZE, pickle.SHORT_BINUNICODE}
for _code in PROTOCOL4_OPCODES:
    MetadataUnpickler.dispatch[_code[0]] = pickle._Unpickler.dispatch[_code[0]]
MetadataUnpickler.dispatch[pickle.FRAME[0]] = MetadataUnpickler.load_frame


def _describe(obj: Any) -> str:
    """A short name for an object from the pickle, for an error message (never its repr: a
    hostile object's repr can be huge or deep)."""
    if isinstance(obj, (Global, InertGlobal)):
        return repr(obj)
    if isinstance(obj, InertObject):
        return f"an instance of {obj.qualname()}"
    if isinstance(obj, TensorRef):
        return "a tensor"
    if isinstance(obj, StorageHandle):
        return "a storage"
    return f"a value of type {type(obj).__name__}"


def brief(value: Any, limit: int = 40) -> str:
    """A value from the file as short text, never through the repr of a container (a hostile
    DAG of lists renders in 2**depth steps)."""
    if type(value) in (str, int, float, bool) or value is None:
        text = str(value) if type(value) is not int or value.bit_length() < 200 else "<a huge int>"
        return text[:limit]
    return f"<{type(value).__name__}>"


def describe_pid(pid: Any) -> str:
    if type(pid) is tuple and pid and type(pid[0]) is str:
        return f"a {pid[0][:40]!r} record"
    return _describe(pid)


class BoundedReader:
    """The file interface the unpickler reads through, over bytes or a memory map. A read longer
    than what is left fails before anything is allocated: a pickle's length fields cannot make
    us reserve gigabytes (a plain file object would allocate the claimed size first)."""

    def __init__(self, buffer, position: int = 0):
        self._buffer = buffer  # bytes or mmap: both slice and find
        self._size = len(buffer)
        self.position = position

    def read(self, n: int = -1) -> bytes:
        left = self._size - self.position
        if n is None or n < 0:
            n = left
        if n > left:
            raise CkptError(f"not a valid pickle (a {n}-byte record runs past the end: truncated?)")
        data = self._buffer[self.position : self.position + n]
        self.position += n
        return data

    def readline(self) -> bytes:
        end = self._buffer.find(b"\n", self.position)
        return self.read((self._size if end < 0 else end + 1) - self.position)

    def peek(self, n: int = 1) -> bytes:
        return self._buffer[self.position : self.position + max(n, 1)]

    @property
    def left(self) -> int:
        """Bytes not read yet."""
        return self._size - self.position


def safe_load(reader: BoundedReader, persistent_load: Callable[[Any], Any], where: str,
              unpickler_class: type[SafeUnpickler] = SafeUnpickler):
    """Unpickle one pickle at the reader's position; return (object, placeholder events in
    order: see SafeUnpickler.events). The reader is left just after the pickle."""
    unpickler = unpickler_class(reader, persistent_load)
    try:
        with collection_paused():
            obj = unpickler.load()
    except CkptError as e:
        raise CkptError(f"{where}: {e}") from None
    except RecursionError:
        raise CkptError(f"{where}: the pickle nests too deeply") from None
    except MemoryError:
        raise CkptError(f"{where}: the pickle asks for more memory than there is") from None
    except Exception as e:  # a malformed pickle: any of a dozen exception types
        raise CkptError(f"{where}: not a valid pickle ({type(e).__name__}: {str(e)[:200]})") from None
    return obj, unpickler.events
