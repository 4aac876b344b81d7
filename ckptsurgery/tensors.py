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
        return torch.frombuffer(buffer, dtype=dtype)


def as_torch(t: TensorRef):
    """A torch view of the tensor's bytes: no copy for a contiguous tensor of a mapped file."""
    return flat_view(t.data(), t.dtype.name).view(t.shape)


def to_bytes(tensor) -> bytearray:
    """A torch tensor's row-major bytes."""
    out = bytearray(tensor.numel() * tensor.element_size())
    if out:
        flat_view(out, str(tensor.dtype).removeprefix("torch.")).view(tensor.shape).copy_(tensor)
    return out


def cast_bytes(data, source: DType, target: DType) -> bytearray:
    """Raw little-endian elements of one dtype converted to another, straight into the output."""
    out = bytearray(len(data) // source.itemsize * target.itemsize)
    if out:
        flat_view(out, target.name).copy_(flat_view(data, source.name))
    return out
