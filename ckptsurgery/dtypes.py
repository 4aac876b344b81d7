"""The dtype table: one row per dtype, naming it the way torch, torch's pickles and
safetensors each do. Everything that maps between formats looks it up here."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import CkptError


@dataclass(frozen=True)
class DType:
    name: str  # torch's name without the "torch." prefix
    itemsize: int
    safetensors: str  # safetensors' code ("F32")
    storage: str  # the legacy typed-storage class torch pickles ("FloatStorage")
    floating: bool

    def __repr__(self) -> str:
        return self.name


_TABLE = [
    DType("float64", 8, "F64", "DoubleStorage", True),
    DType("float32", 4, "F32", "FloatStorage", True),
    DType("float16", 2, "F16", "HalfStorage", True),
    DType("bfloat16", 2, "BF16", "BFloat16Storage", True),
    DType("float8_e4m3fn", 1, "F8_E4M3", "Float8_e4m3fnStorage", True),
    DType("float8_e5m2", 1, "F8_E5M2", "Float8_e5m2Storage", True),
    DType("complex64", 8, "C64", "ComplexFloatStorage", False),
    DType("int64", 8, "I64", "LongStorage", False),
    DType("int32", 4, "I32", "IntStorage", False),
    DType("int16", 2, "I16", "ShortStorage", False),
    DType("int8", 1, "I8", "CharStorage", False),
    DType("uint8", 1, "U8", "ByteStorage", False),
    DType("uint16", 2, "U16", "UInt16Storage", False),
    DType("uint32", 4, "U32", "UInt32Storage", False),
    DType("uint64", 8, "U64", "UInt64Storage", False),
    DType("bool", 1, "BOOL", "BoolStorage", False),
]

BY_NAME = {d.name: d for d in _TABLE}
BY_SAFETENSORS = {d.safetensors: d for d in _TABLE}
BY_STORAGE = {d.storage: d for d in _TABLE}

# What --dtype accepts.
CAST_TARGETS = {"fp32": BY_NAME["float32"], "fp16": BY_NAME["float16"], "bf16": BY_NAME["bfloat16"]}


def by_name(name: str) -> DType:
    try:
        return BY_NAME[name]
    except KeyError:
        raise CkptError(f"unknown dtype {name!r}") from None
