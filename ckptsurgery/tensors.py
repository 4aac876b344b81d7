"""Tensor math on lazy tensors, for the commands that compute new values (a cast, an average,
an overlap, --stats, a value diff). Importing this module is cheap; each function imports torch."""

from __future__ import annotations

import warnings

from .dtypes import DType
from .io.model import TensorRef


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

    from .io.model import _gather

    raw = flat_view(_gather(t), t.dtype.name).view(t.shape)
    if "conj" in t.math_bits:
        raw = torch.conj_physical(raw)
    if "neg" in t.math_bits:
        raw = torch.neg(raw)
    return to_bytes(raw)


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

    from .dtypes import BITS, COMPLEX, QUANTIZED

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
