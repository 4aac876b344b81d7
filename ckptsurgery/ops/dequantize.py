"""`--dequantize`: FP8 releases read back as full-precision weights, as an input's tensors, before
any command selects, renames or writes them.

Each scaled weight `X.weight` (float8_e4m3fn or float8_e5m2) becomes float32(W) · s, cast to the
output dtype (bfloat16 unless `--dtype`), the scale expanded as its layout says:

- block-scaled (DeepSeek-V3): `X.weight_scale_inv` [⌈M/B⌉, ⌈N/B⌉], W[i, j] · s[⌊i/B⌋, ⌊j/B⌋],
  B = 128 or `config.json`'s `quantization_config.weight_block_size` beside the input. Despite its
  name the scale multiplies, as DeepSeek's `weight_dequant` does (`y = x * s` in float32, stored
  as bfloat16) and transformers' `Fp8Dequantize`;
- `X.weight_scale` (compressed-tensors, FBGEMM): shape [] or [1] per tensor, [M] or [M, 1] per
  output channel (a row of W), or the block grid above; multiplied as those libraries do.

The scales are dropped, and so are `X.input_scale` (and FBGEMM's `input_scale_ub`): static
activation scales, which a dequantized model does not use. Each weight is a chunked tensor whose
chunks are whole block rows (`CHUNK_BYTES` of output or one block row), computed when written:
memory stays flat in the model's size. Scales are read and checked (shape, finite values) before
anything is written; a weight without its scale, or a scale without its weight, is refused."""

from __future__ import annotations

import functools
import json
import math
import os
import threading
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Iterator

from ..dtypes import BY_NAME, DType
from ..errors import CkptError
from ..io import Checkpoint, TensorRef
from .reports import Dequantized

FP8 = ("float8_e4m3fn", "float8_e5m2")  # the weight dtypes dequantized
DEFAULT_BLOCK = (128, 128)  # DeepSeek-V3's block, when no config.json says otherwise
DEFAULT_DTYPE = "bfloat16"
MAX_CONFIG = 16 << 20  # a config.json is a few KB
CHUNK_BYTES = 16 << 20  # output bytes computed at once (rounded to whole block rows, at least one)

SCALE_INV, SCALE = ".weight_scale_inv", ".weight_scale"
INPUT_SCALES = (".input_scale", ".input_scale_ub")  # activation scales: unused once dequantized

BLOCK, PER_TENSOR, PER_CHANNEL = "block", "per-tensor", "per-channel"


# each thread's last chunk made: a merge or a fold reads a chunk in spans of its own, and a span
# that ends inside a chunk would otherwise compute it again for the next span
_last = threading.local()


@dataclass(frozen=True)
class _Plan:
    weight: TensorRef
    scale: object  # a float32 torch tensor: [] per tensor, [M, 1] per channel, the block grid
    scheme: str


def block_size_of(input: str) -> tuple[tuple[int, int], str | None]:
    """The block size, and the config.json it came from (None: the default): the input's folder's
    config.json, or the one beside an input file."""
    folder = input if os.path.isdir(input) else (os.path.dirname(input) or ".")
    config = os.path.join(folder, "config.json")
    if not os.path.isfile(config):
        return DEFAULT_BLOCK, None
    if os.path.getsize(config) > MAX_CONFIG:
        raise CkptError(f"{config}: larger than {MAX_CONFIG >> 20} MB; not a model's config.json")
    try:
        with open(config, encoding="utf-8") as f:
            quant = json.load(f).get("quantization_config") or {}
    except (OSError, ValueError, AttributeError, RecursionError):
        return DEFAULT_BLOCK, None  # not ours to judge: a config.json that is not a model's
    block = quant.get("weight_block_size") if isinstance(quant, dict) else None
    if block is None:
        return DEFAULT_BLOCK, None
    if not (isinstance(block, list) and len(block) == 2 and all(type(b) is int and b > 0 for b in block)):
        raise CkptError(f"{config}: quantization_config.weight_block_size {str(block)[:40]}: give two positive "
                        f"integers [rows, columns]")
    return (block[0], block[1]), config


def _is_fp8(t: TensorRef) -> bool:
    return t.dtype.name in FP8


def _scale(path: str, name: str, t: TensorRef):
    """The scale's values in float32, checked to be finite."""
    import torch

    from ..io.tensors import as_torch

    if not t.dtype.floating or not t.is_plain:
        raise CkptError(f"{path}: {name} is {t.dtype.name}, not a floating scale (float32, bfloat16, float16)")
    s = as_torch(t).to(torch.float32)
    if not bool(torch.isfinite(s).all()):
        raise CkptError(f"{path}: {name} holds NaN or infinite scales; the weight cannot be dequantized")
    return s


def _plan_one(path: str, name: str, weight: TensorRef, scale_name: str, scale: TensorRef,
              block: tuple[int, int]) -> _Plan:
    shape, sshape = tuple(weight.shape), tuple(scale.shape)
    rows = shape[0] if shape else 1
    grid = (-(-shape[0] // block[0]), -(-shape[1] // block[1])) if len(shape) == 2 else None
    if scale_name.endswith(SCALE_INV):
        scheme = BLOCK if sshape == grid else None
    elif sshape in ((), (1,)):
        scheme = PER_TENSOR
    elif sshape in ((rows,), (rows, 1)) and len(shape) >= 1:
        scheme = PER_CHANNEL
    else:
        scheme = BLOCK if sshape == grid else None
    if scheme is None:
        want = (f"[{grid[0]}, {grid[1]}] (blocks of {block[0]}×{block[1]})" if grid else "a 2-D weight")
        if not scale_name.endswith(SCALE_INV):
            want = f"[], [1], [{rows}], [{rows}, 1] or {want}"
        raise CkptError(f"{path}: {scale_name} has shape {list(sshape)}, which does not fit {name} {list(shape)}: "
                        f"want {want}")
    s = _scale(path, scale_name, scale)
    if scheme == PER_TENSOR:
        s = s.reshape(())
    elif scheme == PER_CHANNEL:
        s = s.reshape(rows, *([1] * (len(shape) - 1)))
    return _Plan(weight, s, scheme)


def _rows_per_chunk(plan: _Plan, block: tuple[int, int], out: DType) -> int:
    shape = plan.weight.shape
    row_bytes = max(1, math.prod(shape[1:]) * out.itemsize)
    step = block[0] if plan.scheme == BLOCK else 1
    return step * max(1, CHUNK_BYTES // (row_bytes * step))


def _dequantized(plan: _Plan, block: tuple[int, int], out: DType) -> TensorRef:
    """The weight as a chunked tensor of `out`: whole block rows computed per chunk."""
    from ..io.model import chunked_tensor

    w = plan.weight
    shape = tuple(w.shape)
    rows = shape[0] if shape else 1
    per_row = math.prod(shape[1:]) if shape else 1
    step = _rows_per_chunk(plan, block, out)
    bounds = [(lo, min(lo + step, rows)) for lo in range(0, rows, step)] or [(0, 0)]
    sizes = [(hi - lo) * per_row * out.itemsize for lo, hi in bounds]

    key = object()  # this tensor, in the thread's one-chunk memory

    def make(j: int) -> bytearray:
        import torch

        from ..io.tensors import flat_view, to_bytes

        lo, hi = bounds[j]
        if hi == lo:
            return bytearray()
        last = getattr(_last, "chunk", None)
        if last is not None and last[0] is key and last[1] == j:  # a reader that takes a chunk in pieces
            return last[2]
        _last.chunk = None
        data = w.data()[lo * per_row * w.dtype.itemsize: hi * per_row * w.dtype.itemsize]
        x = _widened(data, w.dtype).view(hi - lo, *shape[1:])
        s = plan.scale
        if plan.scheme == PER_TENSOR:
            x.mul_(s)
        elif plan.scheme == PER_CHANNEL:
            x.mul_(s[lo:hi])
        else:  # the block rows' scales over the rows only; over the columns through a view of x
            s = s[lo // block[0]: -(-hi // block[0])].repeat_interleave(block[0], dim=0)[: hi - lo]
            full = shape[1] // block[1]
            x[:, : full * block[1]].view(hi - lo, full, block[1]).mul_(s[:, :full, None])
            if full < s.shape[1]:
                x[:, full * block[1]:].mul_(s[:, full:])
        made = to_bytes(x.to(getattr(torch, out.name)))  # the float32 product, then one rounding
        _last.chunk = (key, j, made)
        return made

    return chunked_tensor(shape, out, sizes, make)


@functools.lru_cache(maxsize=None)
def _table(name: str):
    """The float32 value of each of the 256 bytes of a float8 dtype, as torch converts them."""
    import torch

    return torch.arange(256, dtype=torch.uint8).view(getattr(torch, name)).to(torch.float32).numpy()


def _widened(data, dtype: DType):
    """float8 bytes as a new float32 tensor: a look-up of each byte's value (bit for bit torch's
    own conversion, which is 2-3 times slower on a CPU)."""
    import numpy as np
    import torch

    return torch.from_numpy(_table(dtype.name)[np.frombuffer(data, dtype=np.uint8)])


def dequantize_checkpoint(ckpt: Checkpoint, input: str, dtype: DType | None) -> tuple[Checkpoint, Dequantized]:
    """`ckpt` with its scaled FP8 weights dequantized (to `dtype`, else bfloat16) and their scales
    and activation scales gone; what was done. Everything is checked before anything is computed."""
    out = dtype or BY_NAME[DEFAULT_DTYPE]
    tensors = ckpt.tensors
    path = ckpt.path
    block, config = block_size_of(input)
    plans: dict[str, _Plan] = {}
    scales: list[str] = []
    for name, t in tensors.items():
        if name.endswith(SCALE_INV) or name.endswith(SCALE):
            suffix = SCALE_INV if name.endswith(SCALE_INV) else SCALE
            weight_name = name[: -len(suffix)] + ".weight"
            weight = tensors.get(weight_name)
            if weight is None or not _is_fp8(weight):
                what = "there is no such tensor" if weight is None else f"it is {weight.dtype.name}, not float8"
                raise CkptError(f"{path}: {name} is a scale without its weight {weight_name} ({what}); nothing to "
                                f"dequantize with it")
            if weight_name in plans:
                raise CkptError(f"{path}: {weight_name} has two scales ({weight_name}_scale_inv and "
                                f"{weight_name}_scale); which one is meant?")
            plans[weight_name] = _plan_one(path, weight_name, weight, name, t, block)
            scales.append(name)
    unscaled = [name for name, t in tensors.items() if _is_fp8(t) and name not in plans]
    if unscaled:
        more = f" … (+{len(unscaled) - 3})" if len(unscaled) > 3 else ""
        raise CkptError(f"{path}: {', '.join(unscaled[:3])}{more}: float8 without a scale beside it "
                        f"(.weight_scale_inv or .weight_scale); it cannot be dequantized")
    modules = {name[: -len(".weight")] for name in plans}
    dropped_inputs = [name for name in tensors
                      if any(name.endswith(s) and name[: -len(s)] in modules for s in INPUT_SCALES)]
    gone = set(scales) | set(dropped_inputs)
    rebuilt = OrderedDict()
    for name, t in tensors.items():
        if name in gone:
            continue
        rebuilt[name] = _dequantized(plans[name], block, out) if name in plans else t
    schemes: dict[str, int] = {}
    for plan in plans.values():
        schemes[plan.scheme] = schemes.get(plan.scheme, 0) + 1
    uses_block = BLOCK in schemes
    report = Dequantized(
        tensors=list(plans), dtype=out.name, schemes=schemes,
        block_size=list(block) if uses_block else None, block_size_from=config if uses_block else None,
        scales_dropped=scales, input_scales_dropped=dropped_inputs)
    # a metadata `dtype` would now be untrue; the others (content hashes) the writer handles
    metadata = {k: v for k, v in ckpt.metadata.items() if k != "dtype"} if plans else ckpt.metadata
    return replace(ckpt, tensors=rebuilt, metadata=metadata), report


@contextmanager
def open_input(input: str, root: str | None = None, dequantize: bool = False,
               dtype: DType | None = None) -> Iterator[tuple[Checkpoint, Dequantized | None]]:
    """The input checkpoint, dequantized when asked (with what was done; None when not asked)."""
    from ..io import open_checkpoint

    with open_checkpoint(input, root) as ckpt:
        if not dequantize:
            yield ckpt, None
        else:
            yield dequantize_checkpoint(ckpt, input, dtype)


def with_dequantized(report, done: Dequantized | None):
    """The report, saying what was dequantized."""
    return report if done is None else replace(report, dequantized=done)


def open_inputs(stack, paths: list[str], root: str | None, dequantize: bool,
                dtype: DType | None) -> tuple[list[Checkpoint], Dequantized | None]:
    """Several inputs (a merge's), entered on `stack`, each dequantized when asked; what was done
    to them all (None when not asked)."""
    opened = [stack.enter_context(open_input(path, root, dequantize, dtype)) for path in paths]
    return [ckpt for ckpt, _ in opened], combined([done for _, done in opened if done is not None])


def combined(dones: list[Dequantized]) -> Dequantized | None:
    """What was dequantized across several inputs: the names of each (a name the inputs share
    counted in each), the schemes summed."""
    if not dones:
        return None
    schemes: dict[str, int] = {}
    for done in dones:
        for scheme, n in done.schemes.items():
            schemes[scheme] = schemes.get(scheme, 0) + n
    blocked = [d for d in dones if d.block_size is not None]
    return Dequantized(tensors=[n for d in dones for n in d.tensors], dtype=dones[0].dtype, schemes=schemes,
                       block_size=blocked[0].block_size if blocked else None,
                       block_size_from=blocked[0].block_size_from if blocked else None,
                       scales_dropped=[n for d in dones for n in d.scales_dropped],
                       input_scales_dropped=[n for d in dones for n in d.input_scales_dropped])
