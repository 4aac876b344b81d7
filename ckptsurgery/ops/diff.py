"""diff: two checkpoints compared key by key — keys on one side only, shape and dtype changes,
and values that differ beyond a tolerance."""

from __future__ import annotations

from ..errors import CkptError
from ..io import TensorRef, open_checkpoint


_COMPARE_CHUNK = 16 * 1024 * 1024


def _same_bytes(a: TensorRef, b: TensorRef) -> bool:
    """Bit for bit, and for quantized tensors the same scales and zero points too."""
    va, vb = memoryview(a.data()).cast("B"), memoryview(b.data()).cast("B")
    same = all(va[i : i + _COMPARE_CHUNK] == vb[i : i + _COMPARE_CHUNK] for i in range(0, len(va), _COMPARE_CHUNK))
    return same and _quant_key(a) == _quant_key(b)


def _quant_key(t: TensorRef):
    q = t.quant
    if q is None:
        return None
    if q.axis is None:
        return q.scheme.name, q.scale, q.zero_point
    return q.scheme.name, q.axis, bytes(q.scale.data()), bytes(q.zero_point.data())


def _numbers(t: TensorRef):
    """The values as a flat float64 (or complex128) torch tensor; None where elements are not
    numbers (bits, packed 4-bit)."""
    import torch

    from ..dtypes import COMPLEX
    from ..io.tensors import as_torch, values

    if t.dtype.kind == COMPLEX:  # real and imaginary parts side by side, each compared
        return torch.view_as_real(as_torch(t).reshape(-1).to(torch.complex128)).reshape(-1)
    flat = values(t)  # dequantized, for quantized tensors
    return None if flat is None else flat.to(torch.float64)


def _max_abs_diff(a: TensorRef, b: TensorRef) -> float:
    """Largest |a - b| (of either part, for complex values), in float64 and in chunks; NaN facing
    NaN counts as equal, NaN facing a number as infinitely far. Elements that are not numbers
    differ infinitely when their bytes differ."""
    import torch

    fa, fb = _numbers(a), _numbers(b)
    if fa is None or fb is None:
        return float("inf")
    worst = 0.0
    step = 1 << 22
    for start in range(0, fa.numel(), step):
        x, y = fa[start : start + step], fb[start : start + step]
        gap = (x - y).abs()
        both_nan = torch.isnan(x) & torch.isnan(y)
        gap = torch.where(both_nan, torch.zeros_like(gap), gap)
        gap = torch.where(torch.isnan(gap), torch.full_like(gap, float("inf")), gap)
        same_inf = torch.isinf(x) & (x == y)
        gap = torch.where(same_inf, torch.zeros_like(gap), gap)
        if gap.numel():
            worst = max(worst, float(gap.max()))
    return worst


def diff(a: str, b: str, *, atol: float = 0.0, root: str | None = None) -> dict:
    """Keys only in A or B, shape and dtype changes, and values that differ beyond `atol`
    (0: bit-exact). `identical` is the verdict the exit code follows."""
    if atol < 0:
        raise CkptError("--atol must not be negative")
    with open_checkpoint(a, root) as ca, open_checkpoint(b, root) as cb:
        only_a = [k for k in ca.tensors if k not in cb.tensors]
        only_b = [k for k in cb.tensors if k not in ca.tensors]
        shape_changed, dtype_changed, value_changed = [], [], []
        equal = 0
        for name, ta in ca.tensors.items():
            tb = cb.tensors.get(name)
            if tb is None:
                continue
            if ta.shape != tb.shape:
                shape_changed.append({"name": name, "a": list(ta.shape), "b": list(tb.shape)})
            elif ta.dtype is not tb.dtype:
                dtype_changed.append({"name": name, "a": ta.dtype.name, "b": tb.dtype.name})
            elif _same_bytes(ta, tb):
                equal += 1
            else:
                worst = _max_abs_diff(ta, tb)
                if atol == 0 or worst > atol:
                    value_changed.append({"name": name, "max_abs_diff": worst})
                else:
                    equal += 1
    identical = not (only_a or only_b or shape_changed or dtype_changed or value_changed)
    return {"a": a, "b": b, "atol": atol, "identical": identical, "equal": equal, "only_in_a": only_a,
            "only_in_b": only_b, "shape_changed": shape_changed, "dtype_changed": dtype_changed,
            "value_changed": value_changed}
