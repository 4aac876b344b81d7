"""An unpickler that never runs code from the file.

`find_class` is the only door through which a pickle reaches a callable. It opens onto a short
allow-list of our own functions (tensor rebuilders, containers, dtype and storage tokens); every
other global becomes an inert placeholder class whose construction is recorded, never performed.
A whole pickled `nn.Module` therefore unpickles into placeholders whose `_parameters`,
`_buffers` and `_modules` we can walk without the user's code.
"""

from __future__ import annotations

import pickle
from collections import OrderedDict
from typing import Any, Callable

from .. import dtypes
from ..errors import CkptError
from .model import Storage, TensorRef


class Global:
    """An allow-listed torch value that is not called: a dtype, a storage class, a layout."""

    __slots__ = ("module", "name", "dtype")

    def __init__(self, module: str, name: str, dtype: dtypes.DType | None = None):
        self.module, self.name, self.dtype = module, name, dtype

    def __repr__(self) -> str:
        return f"{self.module}.{self.name}"


class InertObject:
    """An instance of a class we do not run. Records how the pickle built it, so that a .pth
    output can write it back exactly as it was."""

    _module = ""
    _name = ""

    def __new__(cls, *args, **kwargs):
        self = object.__new__(cls)
        self.how = "newobj"  # NEWOBJ calls only __new__
        self.args = args
        self.state = None
        self.listitems: list = []
        self.dictitems: list = []
        return self

    def __init__(self, *args, **kwargs):
        self.how = "reduce"  # REDUCE (a plain call) also runs __init__

    def __setstate__(self, state):
        self.state = state

    def append(self, item):
        self.listitems.append(item)

    def extend(self, items):
        self.listitems.extend(items)

    def __setitem__(self, key, value):
        self.dictitems.append((key, value))

    def __call__(self, *args, **kwargs):
        # `getattr(os, "system")(cmd)`: the inner call made an inert object; calling that is
        # recorded too, so the tensors around it can still be recovered
        return InertCall(self, args)

    @classmethod
    def qualname(cls) -> str:
        return f"{cls._module}.{cls._name}"

    def __repr__(self) -> str:
        return f"<inert {self.qualname()}>"


class InertCall(InertObject):
    """The result of calling an inert object: recorded, never performed."""

    def __new__(cls, callee: InertObject, args: tuple):
        self = InertObject.__new__(cls, *args)
        self.callee = callee
        self.how = "call"
        return self

    def __init__(self, *args, **kwargs):
        pass

    def qualname(self) -> str:  # an instance's name: what was called
        return f"{self.callee.qualname()}(...)"


_inert_types: dict[tuple[str, str], type] = {}


def inert_global(module: str, name: str) -> type:
    key = (module, name)
    if key not in _inert_types:
        _inert_types[key] = type(name, (InertObject,), {"_module": module, "_name": name})
    return _inert_types[key]


def is_inert_global(obj: Any) -> bool:
    return isinstance(obj, type) and issubclass(obj, InertObject)


# ---- allow-listed callables: our own code, checking their arguments --------------------------

def _expect(cond: bool, what: str) -> None:
    if not cond:
        raise CkptError(f"malformed tensor record: {what}")


def _ints(value, what: str) -> tuple[int, ...]:
    _expect(isinstance(value, (tuple, list)) and all(type(v) is int for v in value), what)
    return tuple(value)


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False, *rest):
    _expect(isinstance(storage, Storage), "storage is not a storage")
    _expect(type(storage_offset) is int, "storage offset is not an integer")
    tensor = TensorRef(storage, storage_offset, _ints(size, "bad size"), _ints(stride, "bad stride"))
    tensor.validate(f"tensor in storage {storage.key!r}")
    tensor.plain_grad = requires_grad is True
    return tensor


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, hooks, dtype, *rest):
    _expect(isinstance(dtype, Global) and dtype.dtype is not None, "unknown dtype")
    _expect(isinstance(storage, Storage), "storage is not a storage")
    if storage.dtype is not dtype.dtype:  # an untyped storage viewed as this dtype
        storage = Storage(storage.source, storage.offset, storage.nbytes // dtype.dtype.itemsize,
                          dtype.dtype, storage.key)
    return _rebuild_tensor(storage, storage_offset, size, stride, requires_grad)


def _rebuild_parameter(data, requires_grad, *rest):
    _expect(isinstance(data, TensorRef), "parameter without a tensor")
    data.requires_grad = bool(requires_grad)
    data.plain_grad = False
    return data


def _rebuild_from_type_v2(func, new_type, args, state):
    # Used for tensor subclasses. Only our own rebuilders may be called; anything else the
    # pickle offers as `func` is left inert.
    if func in _REBUILDERS and isinstance(args, tuple):
        return func(*args)
    return inert_global("torch._tensor", "_rebuild_from_type_v2")(func, new_type, args, state)


def _codecs_encode(text, encoding="utf-8"):
    # protocol 2 pickles bytes as _codecs.encode(str, "latin1")
    _expect(isinstance(text, str) and encoding in ("latin1", "latin-1"), "bad bytes record")
    return text.encode("latin1")


def _bytearray(*args):
    _expect(args == () or isinstance(args[0], (bytes, str)), "bytearray of a size")  # no bytearray(10**12)
    return bytearray(*args) if not args or isinstance(args[0], bytes) else bytearray(args[0], "latin1")


def _container(kind):
    def build(items=()):
        _expect(isinstance(items, (list, tuple, set, frozenset, dict)), f"{kind.__name__} of a non-container")
        return kind(items)

    return build


def _torch_size(dims=()):
    return tuple(_ints(dims, "bad torch.Size"))


_REBUILDERS = {_rebuild_tensor, _rebuild_tensor_v3, _rebuild_parameter}

ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch", "Size"): _torch_size,
    ("_codecs", "encode"): _codecs_encode,
}
for _builtins in ("builtins", "__builtin__"):  # protocol 2 writes Python 2's name
    ALLOWED[(_builtins, "bytearray")] = _bytearray
    for _kind in (set, frozenset, list, tuple, dict):
        ALLOWED[(_builtins, _kind.__name__)] = _container(_kind)
for _dt in dtypes.BY_NAME.values():
    ALLOWED[("torch", _dt.name)] = Global("torch", _dt.name, _dt)
    ALLOWED[("torch", _dt.storage)] = Global("torch", _dt.storage, _dt)
ALLOWED[("torch", "UntypedStorage")] = Global("torch", "UntypedStorage", dtypes.BY_NAME["uint8"])



# Python's own pure-Python unpickler, not the C one: the C unpickler grows its memo table to
# the largest index a LONG_BINPUT names, so four bytes of a hostile file could make it reserve
# tens of gigabytes; this one keeps the memo in a dict. It costs ~5 ms per 300 tensors.
class SafeUnpickler(pickle._Unpickler):
    def __init__(self, file, persistent_load: Callable[[Any], Any]):
        super().__init__(file)
        self._load_persistent = persistent_load
        self.inert: set[str] = set()

    def find_class(self, module: str, name: str) -> Any:
        allowed = ALLOWED.get((module, name))
        if allowed is not None:
            return allowed
        self.inert.add(f"{module}.{name}")
        return inert_global(module, name)

    def persistent_load(self, pid: Any) -> Any:
        return self._load_persistent(pid)


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


def safe_load(reader: BoundedReader, persistent_load: Callable[[Any], Any], where: str):
    """Unpickle one pickle at the reader's position; return (object, inert names). The reader
    is left just after the pickle."""
    unpickler = SafeUnpickler(reader, persistent_load)
    try:
        obj = unpickler.load()
    except CkptError as e:
        raise CkptError(f"{where}: {e}") from None
    except RecursionError:
        raise CkptError(f"{where}: the pickle nests too deeply") from None
    except MemoryError:
        raise CkptError(f"{where}: the pickle asks for more memory than there is") from None
    except Exception as e:  # a malformed pickle: any of a dozen exception types
        raise CkptError(f"{where}: not a valid pickle ({type(e).__name__}: {e})") from None
    return obj, unpickler.inert
