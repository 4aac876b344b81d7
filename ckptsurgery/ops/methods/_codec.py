"""Raw little-endian bytes <-> numpy, bfloat16 included: how a merge reads its inputs' values and
writes its result's, rounding as torch's CPU conversion rounds."""

from __future__ import annotations

_NUMPY = {"float16": "<f2", "float32": "<f4", "float64": "<f8"}


def decode(buffer, dtype: str, wide: str):
    """Values of `dtype` (float16, bfloat16, float32, float64) as a `wide` array (float32 or
    float64). May be a read-only view of `buffer`: callers never write into it."""
    import numpy as np

    if dtype == "bfloat16":  # the upper half of a float32
        values = (np.frombuffer(buffer, "<u2").astype(np.uint32) << 16).view(np.float32)
    else:
        values = np.frombuffer(buffer, _NUMPY[dtype])
    return values if values.dtype == np.dtype(wide) else values.astype(wide)


def encode(values, dtype: str) -> memoryview:
    """`values` rounded to `dtype` as torch's CPU conversion rounds them (to nearest, ties to
    even; every NaN becomes 0xFFFF in bfloat16), as raw little-endian bytes (a view of an array
    made here: no copy when `values` already has that dtype)."""
    import numpy as np

    with np.errstate(all="ignore"):  # beyond float16's range is inf, as in torch: no warning
        if dtype != "bfloat16":
            out = np.ascontiguousarray(values, dtype=_NUMPY[dtype])
        else:
            bits = values.astype(np.float32, copy=False).view(np.uint32)
            out = ((bits + np.uint32(0x7FFF) + ((bits >> 16) & 1)) >> 16).astype("<u2")
            out[np.isnan(values)] = 0xFFFF
    return memoryview(out).cast("B")
