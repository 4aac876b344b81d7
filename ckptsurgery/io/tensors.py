"""torch views of a lazy tensor's bytes, for the work that computes values (a cast, a strided
gather, an average, an overlap, --stats, a value diff). Importing this module is cheap; each
function imports torch. Tensors are taken by what they offer (`data()`, `dtype`, `shape`, ...),
so this module imports nothing of the lazy table: `model` builds on it, not the reverse."""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING

from ..dtypes import DType

if TYPE_CHECKING:
    from .model import TensorRef


def flat_view(buffer, dtype_name: str):
    """A 1-d torch tensor over `buffer` without copying it. Buffers of memory-mapped inputs are
    read-only: callers only read through the view."""
    import torch

    dtype = getattr(torch, dtype_name)
    if not len(buffer):
        return torch.empty(0, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns that the buffer is not writable
        raw = torch.frombuffer(buffer, dtype=torch.uint8)
    return raw if dtype is torch.uint8 else raw.view(dtype)


def as_torch(t: TensorRef):
    """A torch view of the tensor's bytes: no copy for a contiguous tensor of a mapped file.
    Quantized and packed dtypes come as their plain integer representation."""
    return flat_view(t.data(), t.dtype.view_name).view(t.shape)


def resolve_math_bits(t: TensorRef) -> bytearray:
    """The row-major bytes of a lazily conjugated or negated view, with the bit applied."""
    import torch

    raw = flat_view(gather(t), t.dtype.name).view(t.shape)
    if "conj" in t.math_bits:
        raw = torch.conj_physical(raw)
    if "neg" in t.math_bits:
        raw = torch.neg(raw)
    return to_bytes(raw)


_SAME_SIZE_INT = {1: "uint8", 2: "int16", 4: "int32", 8: "int64"}


def gather(t: TensorRef) -> bytearray:
    """Copy a strided view into row-major bytes (imports torch; only non-contiguous views need it)."""
    out = bytearray(t.nbytes)
    if out:  # move whole elements as integers of the same width (two for 16 bytes): bit for bit
        width = t.dtype.itemsize
        lanes = 2 if width == 16 else 1
        as_int = _SAME_SIZE_INT[width // lanes]
        src = flat_view(t.storage.view(), as_int)
        shape, stride, offset = t.shape, t.stride, t.offset
        if lanes == 2:
            shape, stride, offset = shape + (2,), tuple(s * 2 for s in stride) + (1,), offset * 2
        flat_view(out, as_int).view(shape).copy_(src.as_strided(shape, stride, offset))
    return out


def to_bytes(tensor) -> bytearray:
    """A torch tensor's row-major bytes."""
    out = bytearray(tensor.numel() * tensor.element_size())
    if out:
        resolved = tensor.resolve_conj().resolve_neg()
        flat_view(out, str(tensor.dtype).removeprefix("torch.")).view(tensor.shape).copy_(resolved)
    return out


def cast_bytes(data, source: DType, target: DType) -> bytearray:
    """Raw little-endian elements of one dtype converted to another, straight into the output."""
    out = bytearray(len(data) // source.itemsize * target.itemsize)
    if out:
        flat_view(out, target.name).copy_(flat_view(data, source.name))
    return out


def values(t: TensorRef):
    """The tensor's values as a flat torch tensor that converts to float64, or None for dtypes
    whose elements are not single numbers (complex, packed 4-bit, opaque bits). A quantized
    tensor is dequantized: (q - zero_point) * scale."""
    import torch

    from ..dtypes import BITS, COMPLEX, QUANTIZED

    if t.dtype.kind in (COMPLEX, BITS) or t.dtype.packed > 1 or t.dtype.per_byte > 1:
        return None
    x = as_torch(t)
    q = t.quant
    if t.dtype.kind != QUANTIZED or q is None:
        return x.reshape(-1)
    x = x.to(torch.float64)
    if q.axis is None:
        return ((x - q.zero_point) * q.scale).reshape(-1)
    shape = [1] * x.dim()
    shape[q.axis] = -1
    scale = as_torch(q.scale).to(torch.float64).view(shape)
    zero = as_torch(q.zero_point).to(torch.float64).view(shape)
    return ((x - zero) * scale).reshape(-1)


def assemble(shape: tuple[int, ...], dtype: DType, pieces: list[tuple[tuple, tuple, object]]) -> bytearray:
    """The row-major bytes of a tensor put together from blocks: (offsets, sizes, row-major
    bytes of the block). The blocks must tile the tensor exactly — every element written once —
    else CkptError. Elements move as same-width integers: bit for bit, whatever the dtype."""
    import torch

    from ..errors import CkptError

    out = bytearray(math.prod(shape) * dtype.itemsize)
    if not out:
        return out
    lanes = 2 if dtype.itemsize == 16 else 1
    as_int = _SAME_SIZE_INT[dtype.itemsize // lanes]
    lane = (lanes,) if lanes > 1 else ()
    whole = flat_view(out, as_int).view(*shape, *lane)
    written = torch.zeros(shape, dtype=torch.bool)
    for offsets, sizes, data in pieces:
        region = tuple(slice(o, o + s) for o, s in zip(offsets, sizes))
        if bool(written[region].any()):
            raise CkptError(f"chunks at {list(offsets)} and another one overlap")
        whole[region] = flat_view(data, as_int).view(*sizes, *lane)
        written[region] = True
    if not bool(written.all()):
        raise CkptError("its chunks leave part of the tensor unwritten")
    return out

