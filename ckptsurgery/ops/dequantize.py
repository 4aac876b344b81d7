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
anything is written; a weight without its scale, or a scale without its weight, is refused.

The arithmetic is numpy's (torch is not imported): a float8 byte has 256 values, so the elements
that share a scale (a block, a row, a tensor) share 256 possible results, computed once per scale
exactly as above (float32 product, one cast, bit for bit torch's) and looked up for each byte.
While a writer writes a chunk, worker threads make the next one (`_Ahead`)."""

from __future__ import annotations

import functools
import json
import math
import os
import threading
from collections import OrderedDict
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
    scale: object  # float32 numpy: [1] per tensor, [M] per channel, the block grid
    scheme: str


def block_size_of(input: str, ckpt: Checkpoint) -> tuple[tuple[int, int], str | None]:
    """The block size, and the config.json it came from (None: the default): the input's folder's
    config.json, or the one beside an input file — a remote input's fetched (io/remote.py), at the
    commit `ckpt`'s weights were read at."""
    from ..io.formats import is_remote

    if is_remote(input):
        from ..io.remote import commit_of, config_beside

        config, raw = config_beside(input, MAX_CONFIG, commit_of(ckpt))
    else:
        folder = input if os.path.isdir(input) else (os.path.dirname(input) or ".")
        config = os.path.join(folder, "config.json")
        if not os.path.isfile(config):
            return DEFAULT_BLOCK, None
        if os.path.getsize(config) > MAX_CONFIG:
            raise CkptError(f"{config}: larger than {MAX_CONFIG >> 20} MB; not a model's config.json")
        try:
            with open(config, "rb") as f:
                raw = f.read()
        except OSError:
            raw = None
    try:
        quant = json.loads(raw.decode("utf-8")).get("quantization_config") or {} if raw is not None else {}
    except (ValueError, AttributeError, RecursionError):
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
    """The scale's values as a flat float32 numpy array, checked to be finite."""
    import numpy as np

    if not t.dtype.floating or not t.is_plain:
        raise CkptError(f"{path}: {name} is {t.dtype.name}, not a floating scale (float32, bfloat16, float16)")
    data = t.data()
    if t.dtype.name == "bfloat16":  # the top half of a float32: widened exactly
        s = (np.frombuffer(data, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
    else:  # float16 widened exactly, float64 rounded to nearest even, as torch casts them
        s = np.frombuffer(data, dtype=t.dtype.name).astype(np.float32)
    if not bool(np.isfinite(s).all()):
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
    return _Plan(weight, s.reshape(sshape) if scheme == BLOCK else s, scheme)


def _rows_per_chunk(plan: _Plan, block: tuple[int, int], out: DType) -> int:
    shape = plan.weight.shape
    row_bytes = max(1, math.prod(shape[1:]) * out.itemsize)
    step = block[0] if plan.scheme == BLOCK else 1
    return step * max(1, CHUNK_BYTES // (row_bytes * step))


class _Weight:
    """A dequantized weight: a chunked tensor whose chunks are whole block rows (`CHUNK_BYTES` of
    output, or one block row), each made when read, or ahead of its reader (`_Ahead`)."""

    def __init__(self, plan: _Plan, block: tuple[int, int], out: DType):
        self.plan, self.block, self.out = plan, block, out
        shape = tuple(plan.weight.shape)
        rows = shape[0] if shape else 1
        self.per_row = math.prod(shape[1:]) if shape else 1
        step = _rows_per_chunk(plan, block, out)
        self.bounds = [(lo, min(lo + step, rows)) for lo in range(0, rows, step)] or [(0, 0)]
        self.sizes = [(hi - lo) * self.per_row * out.itemsize for lo, hi in self.bounds]
        self.shape = shape
        self.following: _Weight | None = None  # the next weight of the checkpoint: likely read next

    def tensor(self) -> TensorRef:
        from ..io.model import chunked_tensor

        return chunked_tensor(self.shape, self.out, self.sizes, self.make)

    def parts(self, j: int) -> tuple[memoryview, list]:
        """Chunk j's buffer, and the tasks that fill it: its rows in as many parts as there are
        workers, each part's scales tabled and its bytes looked up on their own."""
        import numpy as np

        w, per_row, (lo, hi) = self.plan.weight, self.per_row, self.bounds[j]
        data = w.data()[lo * per_row * w.dtype.itemsize: hi * per_row * w.dtype.itemsize]
        buffer = _buffers.get(self.sizes[j])  # every byte written: not zeroed first
        made = memoryview(buffer)
        o = buffer.view(_BITS[self.out.itemsize]).reshape(hi - lo, per_row)
        w8 = np.frombuffer(data, dtype=np.uint8).reshape(hi - lo, per_row)
        n = min(_ahead.workers, hi - lo)
        cuts = [(hi - lo) * k // n for k in range(n + 1)]
        return made, [functools.partial(_fill_part, o[a:z], w8[a:z], self.plan, self.block, self.out, lo + a)
                      for a, z in zip(cuts, cuts[1:])]

    def make(self, j: int) -> memoryview:
        lo, hi = self.bounds[j]
        if hi == lo:
            return memoryview(b"")
        last = getattr(_last, "chunk", None)
        if last is not None and last[0] is self and last[1] == j:  # a reader that takes a chunk in pieces
            return last[2]
        _last.chunk = None
        job = _ahead.take(self, j)
        if job is None:  # not made ahead: its first part made here, the others by the workers meanwhile
            made, tasks = self.parts(j)
            job = _Job(made, [_ahead.submit(task) for task in tasks[1:]])
            tasks[0]()
        made = job.result()
        _ahead.start(self.upcoming(j, _ahead.depth))
        _last.chunk = (self, j, made)
        return made

    def upcoming(self, j: int, n: int) -> Iterator[tuple[_Weight, int]]:
        """The n chunks after chunk j, read in order: this weight's, then the following weights'."""
        weight, k = self, j + 1
        while n > 0 and weight is not None:
            if k == len(weight.bounds):
                weight, k = weight.following, 0
                continue
            lo, hi = weight.bounds[k]
            if hi > lo:
                yield weight, k
                n -= 1
            k += 1


def _fill_part(o, w8, plan: _Plan, block: tuple[int, int], out: DType, lo: int) -> None:
    import numpy as np

    with np.errstate(all="ignore"):  # overflows to infinity, NaN bytes: torch's results, silently
        _fill(o, w8, plan, block, out, lo)


class _Job:
    """A chunk being made: its buffer, and the parts still being filled in the workers."""

    def __init__(self, made: memoryview, futures: list):
        self.made, self.futures = made, futures

    def result(self) -> memoryview:
        for f in self.futures:
            f.result()  # a part's error raised here, in the reader
        return self.made

    def cancel(self) -> None:
        for f in self.futures:
            f.cancel()


class _Ahead:
    """Chunks made by worker threads, ahead of the reader and beside it: a writer takes a
    weight's chunks in order, and numpy's gathers (like the write's system call) leave Python's
    lock free, so that computing and writing overlap, and a chunk not made ahead (a weight's
    first) is made by the reader and the workers at once. Only the next `depth` chunks of the
    weight last read are made ahead, and at most `MAX` wait at once (the oldest dropped):
    memory stays a few chunks whatever the reader does. One core: nothing made ahead."""

    MAX = 4

    def __init__(self):
        self.lock = threading.Lock()
        self.waiting: OrderedDict = OrderedDict()  # (_Weight, chunk) -> _Job
        self.pool = None
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        self.workers = min(2, cores)
        self.depth = 1 if self.workers > 1 else 0

    def _pool(self):
        if self.pool is None:
            with self.lock:
                if self.pool is None:
                    from concurrent.futures import ThreadPoolExecutor

                    self.pool = ThreadPoolExecutor(self.workers, thread_name_prefix="dequantize")
        return self.pool

    def submit(self, task):
        return self._pool().submit(task)

    def take(self, weight: _Weight, j: int) -> _Job | None:
        with self.lock:
            return self.waiting.pop((weight, j), None)

    def start(self, chunks) -> None:
        """Chunks ((weight, j), ...) begun in the workers, those not begun already."""
        for weight, j in chunks:
            with self.lock:
                if (weight, j) in self.waiting:
                    continue
            try:
                made, tasks = weight.parts(j)
            except Exception:  # noqa: BLE001 -- raised again when (if ever) the chunk is read, for its own weight
                return
            job = _Job(made, [self.submit(task) for task in tasks])
            with self.lock:
                self.waiting[weight, j] = job
                while len(self.waiting) > self.MAX:
                    self.waiting.popitem(last=False)[1].cancel()


_ahead = _Ahead()


class _Buffers:
    """Chunk buffers used again once nothing refers to them: a buffer the reader still holds (or
    any view of it) is never handed out again, and one it has dropped is reused rather than freed
    (a new 16 MB buffer is fresh memory the kernel must map and zero). At most `MAX` are kept;
    beyond them, buffers are made and freed as any. "Nothing refers to it" is its reference count
    being that of an array only the list holds, as measured on a probe the same way (so whatever
    the interpreter counts for a loop's variable); where references are not counted (not
    CPython), buffers are never reused."""

    MAX = 8

    def __init__(self):
        import sys

        self.lock = threading.Lock()
        self.kept: list = []  # numpy uint8 arrays
        self.refcount = getattr(sys, "getrefcount", None) if sys.implementation.name == "cpython" else None
        self.unheld: int | None = None  # the count of a kept array nobody else holds

    def _counts(self, arrays: list) -> list[int]:
        return [self.refcount(a) for a in arrays]

    def get(self, n: int):
        """n bytes of a buffer nothing else refers to (a numpy uint8 array)."""
        import numpy as np

        if self.refcount is None:
            return np.empty(n, dtype=np.uint8)
        with self.lock:
            if self.unheld is None:
                self.unheld = self._counts([np.empty(1, dtype=np.uint8)])[0]
            for a, count in zip(self.kept, self._counts(self.kept)):
                if count == self.unheld and a.nbytes >= n:
                    return a[:n]  # a view of it, made while the lock is held: no one else takes it
            a = np.empty(max(n, CHUNK_BYTES), dtype=np.uint8)
            if len(self.kept) < self.MAX:
                self.kept.append(a)
            return a[:n]


_buffers = _Buffers()
_BITS = {1: "uint8", 2: "uint16", 4: "uint32", 8: "uint64"}  # an output element's bits, by its size
PIECE = 1 << 16  # elements looked up at once: a piece's indices and outputs stay in the CPU's cache
TABLE_MIN_COLUMNS = 512  # a per-channel weight's rows narrower than this are multiplied, not looked up


def _fill(o, w8, plan: _Plan, block: tuple[int, int], out: DType, lo: int) -> None:
    """Rows lo, lo + 1, ... of the dequantized weight (`o`, [rows, columns] of the output's bits)
    from their float8 bytes (`w8`, the same shape). Each element is float32(W) · s cast to `out`;
    the elements that share a scale share its 256 possible results, so those are computed once
    (the same float32 product, the same cast), a table per block or row, and each byte looked up
    in its table: one gather per element instead of a widening, a multiply and a cast."""
    import numpy as np

    values = _values(plan.weight.dtype.name)
    rows, columns = w8.shape
    if not rows or not columns:
        return
    s = plan.scale
    piece = max(1, PIECE // columns)  # rows looked up at once
    if plan.scheme == BLOCK:
        br, bc = block
        offsets = (np.arange(columns) // bc * 256).astype(_index_dtype(s.shape[1] * 256))
        index = np.empty((min(piece, rows), columns), offsets.dtype)
        for b in range(lo // br, -(-(lo + rows) // br)):  # the chunk's block rows
            table = _cast(values[None, :] * s[b][:, None], out).reshape(-1)
            start, stop = max(b * br, lo) - lo, min((b + 1) * br, lo + rows) - lo
            for a in range(start, stop, piece):
                z = min(a + piece, stop)
                np.add(w8[a:z], offsets, out=index[: z - a], casting="unsafe")
                table.take(index[: z - a], out=o[a:z], mode="clip")
    elif plan.scheme == PER_TENSOR:
        table = _cast(values * s.reshape(1), out)
        for a in range(0, rows, piece):
            table.take(w8[a: a + piece], out=o[a: a + piece], mode="clip")
    elif columns < TABLE_MIN_COLUMNS:  # per channel, narrow rows: the products themselves
        x = values.take(w8)
        x *= s[lo: lo + rows, None]
        o[...] = _cast(x, out)
    else:  # per channel: a table per row
        piece = min(piece, 256)
        offsets = (np.arange(piece) * 256).astype(_index_dtype(piece * 256))[:, None]
        index = np.empty((min(piece, rows), columns), offsets.dtype)
        for a in range(0, rows, piece):
            z = min(a + piece, rows)
            table = _cast(values[None, :] * s[lo + a: lo + z, None], out).reshape(-1)
            np.add(w8[a:z], offsets[: z - a], out=index[: z - a], casting="unsafe")
            table.take(index[: z - a], out=o[a:z], mode="clip")


def _index_dtype(n: int) -> str:
    return "uint16" if n <= 1 << 16 else "int64"


def _cast(x, out: DType):
    """float32 values as `out`'s bits, bit for bit torch's `x.to(out)` on a CPU: float16 and
    float64 as numpy casts them (IEEE, to nearest even), bfloat16 rounded to nearest even by
    integer arithmetic as torch does, every NaN becoming 0xFFFF as torch's vectorised cast makes
    it (tests/test_dequantize.py checks every float8 value against torch)."""
    import numpy as np

    if out.name == "float32":
        return x.view(np.uint32)
    if out.name in ("float16", "float64"):
        return x.astype(out.name).view(_BITS[out.itemsize])
    if out.name == "bfloat16":
        u = x.view(np.uint32)
        r = (u >> 16) & 1
        r += 0x7FFF
        r += u
        r >>= 16
        r = r.astype(np.uint16)
        r[np.isnan(x)] = 0xFFFF
        return r
    import torch  # not a dtype --dtype gives: torch's own cast

    cast = torch.from_numpy(x).to(getattr(torch, out.name))
    return cast.view(getattr(torch, f"int{8 * out.itemsize}")).numpy().view(_BITS[out.itemsize])


# the float8 formats: exponent bits, mantissa bits, whether the all-ones exponent is inf/NaN (IEEE)
_FORMATS = {"float8_e4m3fn": (4, 3, False), "float8_e5m2": (5, 2, True)}


@functools.lru_cache(maxsize=None)
def _values(name: str):
    """The float32 value of each of the 256 bytes of a float8 dtype, bit for bit as torch
    converts them: NaNs quiet, their payloads kept (tests check all 256 against torch)."""
    import numpy as np

    e_bits, m_bits, ieee = _FORMATS[name]
    bias, top, m_top = (1 << (e_bits - 1)) - 1, (1 << e_bits) - 1, (1 << m_bits) - 1
    out = np.empty(256, dtype=np.uint32)
    for byte in range(256):
        sign, e, m = byte >> 7, (byte >> m_bits) & top, byte & m_top
        if e == top and (ieee or m == m_top):
            # infinity, or a quiet NaN with the payload at the top of float32's mantissa
            bits = 0x7F800000 if ieee and m == 0 else 0x7FC00000 | (m << (23 - m_bits))
            out[byte] = bits | (sign << 31)
        else:
            value = math.ldexp(m if e == 0 else (1 << m_bits) + m, max(e, 1) - bias - m_bits)
            out[byte] = np.array(-value if sign else value, dtype=np.float32).view(np.uint32)
    return out.view(np.float32)


def dequantize_checkpoint(ckpt: Checkpoint, input: str, dtype: DType | None) -> tuple[Checkpoint, Dequantized]:
    """`ckpt` with its scaled FP8 weights dequantized (to `dtype`, else bfloat16) and their scales
    and activation scales gone; what was done. Everything is checked before anything is computed."""
    out = dtype or BY_NAME[DEFAULT_DTYPE]
    tensors = ckpt.tensors
    path = ckpt.path
    block, config = block_size_of(input, ckpt)
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
    weights: list[_Weight] = []
    for name, t in tensors.items():
        if name in gone:
            continue
        if name in plans:
            weights.append(_Weight(plans[name], block, out))
            t = weights[-1].tensor()
        rebuilt[name] = t
    for weight, following in zip(weights, weights[1:]):  # a writer's order: chunks made ahead across weights
        weight.following = following
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
