"""The dtype table: one row per dtype torch 2.13 can save, naming it the way torch, torch's
pickles and safetensors each do. Everything that maps between formats looks it up here, and
tests/test_dtypes.py checks the table against torch's and safetensors' own lists, so that a new
torch dtype shows up as a failing test, not as a wrong file."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import CkptError

# kinds: what a dtype's bytes mean, which decides what may be done with them
FLOAT = "float"  # full-precision floating point: the only kind --dtype casts
FLOAT8 = "float8"  # 8-bit (and packed 4-bit) floats: meaningless without their scales
COMPLEX = "complex"
INT = "int"
BOOL = "bool"
BITS = "bits"  # opaque bit containers (torch.bits8, ...)
QUANTIZED = "quantized"  # integers with a scale and zero point beside them


@dataclass(frozen=True)
class DType:
    name: str  # torch's name without the "torch." prefix
    itemsize: int  # bytes per element, as torch's element_size()
    kind: str
    safetensors: str | None  # safetensors' code ("F32"); None: safetensors cannot hold it
    storage: str | None  # the typed-storage class torch pickles ("FloatStorage"); None: torch
    #                      writes an UntypedStorage and `_rebuild_tensor_v3` with the dtype
    repr_name: str | None = None  # the plain dtype of the same bytes, for quantized/packed ones
    packed: int = 1  # safetensors elements per torch element (F4: two 4-bit floats per byte)
    per_byte: int = 1  # elements per byte of the sub-byte quantized dtypes, packed row by row

    @property
    def floating(self) -> bool:
        """Cast by --dtype: float16/bfloat16/float32/float64 only."""
        return self.kind == FLOAT

    @property
    def view_name(self) -> str:
        """The torch dtype to view these bytes as for arithmetic or copying."""
        return self.repr_name or self.name

    def __repr__(self) -> str:
        return self.name


_TABLE = [
    DType("float64", 8, FLOAT, "F64", "DoubleStorage"),
    DType("float32", 4, FLOAT, "F32", "FloatStorage"),
    DType("float16", 2, FLOAT, "F16", "HalfStorage"),
    DType("bfloat16", 2, FLOAT, "BF16", "BFloat16Storage"),
    DType("float8_e4m3fn", 1, FLOAT8, "F8_E4M3", None),
    DType("float8_e5m2", 1, FLOAT8, "F8_E5M2", None),
    DType("float8_e4m3fnuz", 1, FLOAT8, "F8_E4M3FNUZ", None),
    DType("float8_e5m2fnuz", 1, FLOAT8, "F8_E5M2FNUZ", None),
    DType("float8_e8m0fnu", 1, FLOAT8, "F8_E8M0", None),
    DType("float4_e2m1fn_x2", 1, FLOAT8, "F4", None, repr_name="uint8", packed=2),
    DType("complex32", 4, COMPLEX, None, None),
    DType("complex64", 8, COMPLEX, "C64", "ComplexFloatStorage"),
    DType("complex128", 16, COMPLEX, None, "ComplexDoubleStorage"),
    DType("int64", 8, INT, "I64", "LongStorage"),
    DType("int32", 4, INT, "I32", "IntStorage"),
    DType("int16", 2, INT, "I16", "ShortStorage"),
    DType("int8", 1, INT, "I8", "CharStorage"),
    DType("uint8", 1, INT, "U8", "ByteStorage"),
    DType("uint16", 2, INT, "U16", None),
    DType("uint32", 4, INT, "U32", None),
    DType("uint64", 8, INT, "U64", None),
    DType("bool", 1, BOOL, "BOOL", "BoolStorage"),
    DType("bits8", 1, BITS, None, None, repr_name="uint8"),
    DType("bits16", 2, BITS, None, None, repr_name="int16"),
    DType("bits1x8", 1, BITS, None, None, repr_name="uint8"),
    DType("bits2x4", 1, BITS, None, None, repr_name="uint8"),
    DType("bits4x2", 1, BITS, None, None, repr_name="uint8"),
    DType("qint8", 1, QUANTIZED, None, "QInt8Storage", repr_name="int8"),
    DType("quint8", 1, QUANTIZED, None, "QUInt8Storage", repr_name="uint8"),
    DType("qint32", 4, QUANTIZED, None, "QInt32Storage", repr_name="int32"),
    DType("quint4x2", 1, QUANTIZED, None, "QUInt4x2Storage", repr_name="uint8", per_byte=2),
    DType("quint2x4", 1, QUANTIZED, None, "QUInt2x4Storage", repr_name="uint8", per_byte=4),
]

BY_NAME = {d.name: d for d in _TABLE}
BY_SAFETENSORS = {d.safetensors: d for d in _TABLE if d.safetensors}

# Quantization schemes torch pickles beside a quantized tensor's scales.
QSCHEMES = ("per_tensor_affine", "per_tensor_symmetric", "per_channel_affine",
            "per_channel_symmetric", "per_channel_affine_float_qparams")

# What --dtype accepts: the short names, then torch's own (torch.float16, torch.half, ...).
CAST_TARGETS = {"fp32": BY_NAME["float32"], "fp16": BY_NAME["float16"], "bf16": BY_NAME["bfloat16"],
                "float32": BY_NAME["float32"], "float16": BY_NAME["float16"], "bfloat16": BY_NAME["bfloat16"],
                "float": BY_NAME["float32"], "half": BY_NAME["float16"]}


def by_name(name: str) -> DType:
    try:
        return BY_NAME[name]
    except KeyError:
        raise CkptError(f"unknown dtype {name!r}") from None


def convertible(source: DType, target: DType) -> bool:
    """Whether torch can copy values of `source` into `target` (a cast, an overlap): numbers to
    numbers, complex to complex only; never quantized, packed or opaque bits."""
    numeric = (FLOAT, FLOAT8, INT, BOOL)
    if source.packed > 1 or target.packed > 1:
        return source is target
    if source.kind == COMPLEX or target.kind == COMPLEX:
        return source.kind == target.kind
    return source.kind in numeric and target.kind in numeric


def why_not_safetensors(dtype: DType) -> str | None:
    """None if safetensors can hold the dtype, else the reason, for a one-line refusal."""
    if dtype.safetensors:
        return None
    if dtype.kind == QUANTIZED:
        return (f"{dtype.name} is a quantized dtype: safetensors has no place for its scales and "
                f"zero points; write a .pth, or dequantize first")
    return f"safetensors has no {dtype.name} dtype; write a .pth instead"
