"""Tensor math on lazy tensors: the one place besides casts and --stats that imports torch,
and only when a command computes new values (a cast, an average, an overlap, a value diff)."""

from __future__ import annotations

import warnings

from .io.model import TensorRef


def as_torch(t: TensorRef):
    """A torch view of the tensor's bytes: no copy for a contiguous tensor of a mapped file.
    Read-only by contract: callers never write into it."""
    import torch

    data = t.data()
    dtype = getattr(torch, t.dtype.name)
    if not len(data):
        return torch.empty(t.shape, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns that an mmap'd buffer is read-only
        return torch.frombuffer(data, dtype=dtype).view(t.shape)


def to_bytes(tensor) -> bytearray:
    """A torch tensor's row-major bytes."""
    import torch

    out = bytearray(tensor.numel() * tensor.element_size())
    if out:
        torch.frombuffer(out, dtype=tensor.dtype).view(tensor.shape).copy_(tensor)
    return out


def torch_dtype(t: TensorRef):
    import torch

    return getattr(torch, t.dtype.name)
