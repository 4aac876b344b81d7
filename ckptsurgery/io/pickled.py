"""The values a checkpoint's pickle holds besides containers, numbers, strings and tensors:
allow-listed torch tokens, the inert placeholders that stand for everything else, and torch's
small value types kept as what they were pickled as (so that a .pth output writes them back)."""

from __future__ import annotations

from enum import Enum
from typing import Any

from .. import dtypes


class GlobalKind(Enum):
    """What an allow-listed Global stands for."""

    TENSOR_TYPE = "tensor-type"  # torch.Tensor, the type of a plain tensor
    DTYPE = "dtype"
    STORAGE = "storage"  # a typed storage class, or UntypedStorage
    QSCHEME = "qscheme"


class How(Enum):
    """How the pickle built an InertObject."""

    REDUCE = "reduce"  # REDUCE: a placeholder global called
    NEWOBJ = "newobj"  # NEWOBJ: a placeholder class instantiated (cls.__new__(cls, *args))
    CALL = "call"  # REDUCE on what an earlier call returned


class Global:
    """An allow-listed torch value that is never called: a dtype, a storage type, a qscheme.
    Immutable, so that no pickle can change what it means for a file read later."""

    __slots__ = ("module", "name", "dtype", "kind")

    def __init__(self, module: str, name: str, kind: GlobalKind, dtype: dtypes.DType | None = None):
        for slot, value in (("module", module), ("name", name), ("kind", kind), ("dtype", dtype)):
            object.__setattr__(self, slot, value)

    def __setattr__(self, name, value):
        raise AttributeError("allow-listed tokens are immutable")

    def __repr__(self) -> str:
        return f"{self.module}.{self.name}"


class InertGlobal:
    """A global the pickle names that we do not import: a placeholder, fresh for each load."""

    __slots__ = ("module", "name")

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def qualname(self) -> str:
        return f"{self.module}.{self.name}"

    def __repr__(self) -> str:
        return f"<inert {self.qualname()}>"


class InertObject:
    """What the pickle built by calling a placeholder (`how`: REDUCE or NEWOBJ), or by calling
    such a result (CALL). Records how, so that a .pth output writes it back exactly as read."""

    __slots__ = ("callee", "how", "args", "state", "listitems", "dictitems")

    def __init__(self, callee: "InertGlobal | InertObject", how: How, args: tuple):
        self.callee, self.how, self.args = callee, how, args
        self.state: Any = None
        self.listitems: list = []
        self.dictitems: list = []

    def qualname(self) -> str:
        callee, calls = self.callee, ""
        while isinstance(callee, InertObject):  # a loop: chains of calls may be long
            callee, calls = callee.callee, calls + "(...)"
        return callee.qualname() + calls

    @property
    def module(self) -> str:
        callee = self.callee
        while isinstance(callee, InertObject):
            callee = callee.callee
        return callee.module

    def __repr__(self) -> str:
        return f"<inert {self.qualname()}>"


class FrozenRecord:
    """A placeholder instance frozen into a value once built, so that it can be a dict key (a
    MetadataIndex in DCP's metadata): its class's name and its state's items."""

    __slots__ = ("qualname", "fields", "_hash")

    def __init__(self, qualname: str, fields: tuple):
        self.qualname, self.fields = qualname, fields
        self._hash = hash((qualname, fields))  # raises TypeError for an unhashable field

    def __eq__(self, other):
        return isinstance(other, FrozenRecord) and (self.qualname, self.fields) == (other.qualname, other.fields)

    def __hash__(self):
        return self._hash

    def __repr__(self) -> str:
        return f"<{self.qualname} record>"


class TorchSize(tuple):
    """A `torch.Size` (written back as one, not as a plain tuple)."""


class Device:
    """A `torch.device`, kept as its arguments."""

    __slots__ = ("args",)

    def __init__(self, args: tuple):
        self.args = args

    def __eq__(self, other):
        return isinstance(other, Device) and other.args == self.args

    def __hash__(self):
        return hash(self.args)

    def __repr__(self) -> str:
        return f"device{self.args!r}"


class PickledSet(set):
    """A set as the pickle listed it: written back in that order (a set's own order follows
    hashes, which for tensors are their addresses, and for strings vary from run to run)."""

    def __init__(self, items: list):
        super().__init__(items)
        self.items = items


def inert_names(obj: Any) -> list[str]:
    """The globals (module.name) of every placeholder `obj` holds, anywhere inside it: what an
    unsafe torch.load of a file that pickles `obj` would import. Walks containers and what a
    placeholder was built from, each object once, without recursion."""
    found: set[str] = set()
    seen: set[int] = set()
    stack = [obj]
    while stack:
        value = stack.pop()
        if id(value) in seen or isinstance(value, (str, bytes, int, float, bool, type(None))):
            continue
        seen.add(id(value))
        if isinstance(value, InertGlobal):
            found.add(value.qualname())
        elif isinstance(value, InertObject):
            stack += [value.callee, value.args, value.state, value.listitems, value.dictitems]
        elif isinstance(value, dict):
            stack += [*value.keys(), *value.values()]
        elif isinstance(value, (list, tuple, set, frozenset)):
            stack += list(value)
        elif isinstance(value, FrozenRecord):
            stack += [value.fields]
    return sorted(found)
