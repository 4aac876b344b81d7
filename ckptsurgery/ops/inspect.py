"""inspect: what a checkpoint holds, from its headers alone, and on request per-tensor statistics
(streamed) and a per-module tree with numbered repeats folded."""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from operator import attrgetter
from typing import Callable, Iterator

from .. import core
from ..errors import CkptError, UsageError
from ..io import Checkpoint, TensorRef
from ..io.model import numel_of
from ..io.tree import describe, extras, module_state
from .inputs import open_input, with_read
from .options import READ_AS_IS, ProgressFactory, ReadOptions
from .reports import InspectReport


def inspect_checkpoint(input: str, *, keys: list[str] | None = None, stats: bool = False, tree: bool = False,
            depth: int | None = None, hash: bool = False, root: str | None = None,
            progress: ProgressFactory | None = None, read: ReadOptions = READ_AS_IS) -> InspectReport:
    """The report of `inspect_report` for the keys that `keys` select; with `stats`, each tensor's
    `tensor_stats` (reads data); with `hash`, each tensor's "sha256" and the listed tensors'
    "fingerprint" (ops/digest.py); with `tree`, the `module_tree` rows under "tree", `depth`
    levels deep. `read`: how the input is read (ops/inputs.py: scaled FP8 weights as they read
    dequantized, bfloat16, their scales gone; a GGUF file's names)."""
    if depth is not None and not tree:
        raise UsageError("--depth applies to --tree only")
    if depth is not None and (type(depth) is not int or depth < 1):
        raise UsageError(f"--depth {depth!r}: give a number of levels, 1 or more")
    with open_input(input, root, read) as (ckpt, done):
        report = with_read(inspect_report(ckpt, keys), done)
        if stats:
            total = sum(entry["nbytes"] for entry in report.tensors)
            tick = progress(total, "reading tensors") if progress else None
            chosen = [ckpt.tensors[entry["name"]] for entry in report.tensors]
            for entry, t, found in zip(report.tensors, chosen, _each_stats(chosen)):
                entry.update(found)
                if tick:
                    tick(entry["nbytes"])
        if hash:
            from .digest import fingerprint, hashes_of

            chosen = {e["name"]: ckpt.tensors[e["name"]] for e in report.tensors}
            tick = progress(sum(t.nbytes for t in _unique_views(chosen, ckpt.shares_with())), "hashing") \
                if progress else None
            hashes = hashes_of(chosen, tick)
            for entry in report.tensors:
                entry["sha256"] = hashes[entry["name"]]
            report.fingerprint = fingerprint(hashes)
        if tree:
            chosen = {e["name"]: ckpt.tensors[e["name"]] for e in report.tensors}
            report.tree = module_tree(chosen, depth)
    return report


def _each_stats(tensors: list[TensorRef]) -> Iterator[dict]:
    """tensor_stats of each, in order, one tensor per core at a time (at most 4): numpy and torch
    release the GIL while they go over the values, and reading a mapped file's pages is half the
    work."""
    from .write import default_jobs

    jobs = default_jobs()
    if jobs < 2 or len(tensors) < 2:
        yield from map(tensor_stats, tensors)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(jobs, thread_name_prefix="ckptsurgery-stats") as pool:
        yield from pool.map(tensor_stats, tensors)


def _unique_views(tensors: dict[str, TensorRef], shares: dict[str, str | None]) -> list[TensorRef]:
    """Tied names counted once, as `sum(p.numel() for p in model.parameters())` does. Only the
    tensors of a storage that several names share need comparing."""
    shared = {id(tensors[name].storage) for name, owner in shares.items() if owner is not None and name in tensors}
    if not shared:
        return list(tensors.values())
    alone = [t for t in tensors.values() if id(t.storage) not in shared]
    return alone + list({t.view_key(): t for t in tensors.values() if id(t.storage) in shared}.values())


def inspect_report(ckpt: Checkpoint, patterns: list[str] | None = None) -> InspectReport:
    """What `ckpt` holds (the tensors `patterns` select), from its headers alone."""
    names = core.select(ckpt.tensors, patterns) if patterns else list(ckpt.tensors)
    shares = ckpt.shares_with()
    chosen = OrderedDict((n, ckpt.tensors[n]) for n in names)
    unique = _unique_views(chosen, shares)
    trainable, frozen = _trainable_and_frozen(unique) if _is_whole_model(ckpt) else (None, None)
    return InspectReport(
        path=ckpt.path,
        format=ckpt.format,
        root=ckpt.root,
        extras=extras(ckpt.obj, ckpt.root) if ckpt.root is not None else {},
        # non-tensor values inside the state dict itself (`fc._extra_state`)
        non_tensors={name: describe(value) for name, value in ckpt.others.items()},
        metadata=ckpt.metadata,
        inert=ckpt.inert,
        total_params=sum(map(numel_of, map(attrgetter("shape"), unique))),
        total_bytes=sum(map(_stored_nbytes, unique)),
        trainable_params=trainable,
        frozen_params=frozen,
        tensors=[
            {
                "name": name,
                "dtype": _dtype_shown(t),
                "shape": list(t.shape),
                "nbytes": _stored_nbytes(t),
                "requires_grad": t.requires_grad,
                "shares_with": shares[name],
                "contiguous": t.is_contiguous,
                **({"quantization": _quantization(t)} if t.quant else {}),
            }
            for name, t in chosen.items()
        ],
    )


def _dtype_shown(t: TensorRef) -> str:
    """Its dtype, or the file's own type when it is decoded as it is read (GGUF's Q4_K)."""
    return t.encoded.type if t.encoded else t.dtype.name


def _stored_nbytes(t: TensorRef) -> int:
    """The bytes the file holds for it: a tensor decoded as it is read (GGUF's Q4_K) counts its blocks."""
    return t.encoded.nbytes if t.encoded else t.nbytes


def _is_whole_model(ckpt: Checkpoint) -> bool:
    """Whether the state dict is a pickled nn.Module's (`torch.save(model)`, at the top level or
    under a key), whose parameters record requires_grad; a dict of tensors is not, even if it
    holds an nn.Parameter (its record says `requires_grad` all the same)."""
    if ckpt.obj is None or ckpt.root is None:
        return False
    if ckpt.root == "":
        return module_state(ckpt.obj) is not None
    return isinstance(ckpt.obj, dict) and module_state(ckpt.obj.get(ckpt.root)) is not None


def _trainable_and_frozen(unique: list[TensorRef]) -> tuple[int | None, int | None]:
    """Elements of the parameters with requires_grad true, and false (a whole pickled model's
    nn.Parameters record it; its buffers do not): (None, None) when no tensor records it."""
    flagged = [t for t in unique if t.requires_grad is not None]
    if not flagged:
        return None, None
    trainable = sum(numel_of(t.shape) for t in flagged if t.requires_grad)
    return trainable, sum(numel_of(t.shape) for t in flagged) - trainable


def _quantization(t: TensorRef) -> dict:
    """A quantized tensor's scheme and, per tensor, its scale and zero point (per channel: the axis)."""
    q = t.quant
    if q.axis is None:
        return {"scheme": q.scheme.name, "scale": q.scale, "zero_point": q.zero_point}
    return {"scheme": q.scheme.name, "axis": q.axis, "channels": q.scale.numel}


_STATS_CHUNK = 1 << 22  # elements per step: bounded memory whatever the tensor's size


# dtypes whose bytes numpy reads as they lie in the file (bfloat16 through methods' decode)
_NUMPY_STATS = {"float16": "<f2", "float32": "<f4", "float64": "<f8", "int8": "i1", "uint8": "u1",
                "int16": "<i2", "uint16": "<u2", "int32": "<i4", "uint32": "<u4", "int64": "<i8",
                "uint64": "<u8", "bool": "?", "bfloat16": None}
_MAPPED_STATS_CHUNK = 1 << 16  # elements a step from a mapped file: a step's arrays stay in the CPU's cache


class _Moments:
    """min, max, mean and the sum of squared deviations of the finite values seen so far, and the
    NaN and infinity counts; chunks merged as Chan et al. merge moments."""

    def __init__(self):
        self.count, self.mean, self.m2, self.nan, self.inf = 0, 0.0, 0.0, 0, 0
        self.low, self.high = math.inf, -math.inf

    def add(self, n: int, low: float, high: float, mean: float, m2: float) -> None:
        if not n:
            return
        self.low, self.high = min(self.low, low), max(self.high, high)
        delta, total = mean - self.mean, self.count + n
        self.mean += delta * n / total
        self.m2 += m2 + delta * delta * self.count * n / total
        self.count = total

    def report(self) -> dict:
        if not self.count:
            return {"min": None, "max": None, "mean": None, "std": None, "nan": self.nan, "inf": self.inf}
        std = math.sqrt(self.m2 / (self.count - 1)) if self.count > 1 else 0.0
        finite = lambda x: x if math.isfinite(x) else None  # noqa: E731  (sums of values near 1e308 overflow)
        return {"min": self.low, "max": self.high, "mean": finite(self.mean), "std": finite(std),
                "nan": self.nan, "inf": self.inf}


def tensor_stats(t: TensorRef) -> dict:
    """min/max/mean/std over finite values, and NaN/Inf counts; streamed in chunks — with numpy
    straight from the mapped file for plain dtypes whose bytes lie in order (no torch; memory a
    chunk), else through torch (quantized, strided, computed tensors)."""
    from ..io.model import mapped_range

    placed = mapped_range(t) if t.dtype.name in _NUMPY_STATS else None
    return _mapped_stats(t, *placed) if placed is not None else _torch_stats(t)


def _mapped_stats(t: TensorRef, source, first: int) -> dict:
    import numpy as np

    from .methods import decode

    moments, size, name = _Moments(), t.dtype.itemsize, t.dtype.name
    floating = t.dtype.floating
    with np.errstate(all="ignore"):
        for start in range(0, t.numel, _MAPPED_STATS_CHUNK):
            count = min(_MAPPED_STATS_CHUNK, t.numel - start)
            raw = source.view(first + start * size, count * size)
            # read in its own dtype (min and max exact, half the bytes of float64 to go over);
            # sums in float64
            x = decode(raw, name, "float32") if name == "bfloat16" else np.frombuffer(raw, _NUMPY_STATS[name])
            x = x.view(np.uint8) if x.dtype == np.bool_ else x
            wide = x.astype(np.float64)  # one cast; sums, deviations and squares in float64
            total = float(np.add.reduce(wide))
            # a sum of finite values of 16 or 32 bits cannot overflow a float64: a NaN or an
            # infinity among them is the only way to a sum that is not finite (or float64 values
            # that overflow it, which this path handles too), so the common case tests no value
            if floating and not math.isfinite(total):
                finite = np.isfinite(x)
                nan = int(np.isnan(x).sum())
                moments.nan, moments.inf = moments.nan + nan, moments.inf + count - int(finite.sum()) - nan
                x, wide = x[finite], wide[finite]
                total = float(np.add.reduce(wide))
            if x.size:
                mean = total / x.size
                # squared and summed by einsum's own loop: np.dot goes through BLAS, whose threads
                # cost more than the sum on a busy machine (5 s of 6 on 1.4 GB)
                deviation = np.subtract(wide, mean, out=wide)
                m2 = float(np.einsum("i,i->", deviation, deviation))
                moments.add(x.size, float(x.min()), float(x.max()), mean, m2)
    return moments.report()


def _torch_stats(t: TensorRef) -> dict:
    import torch

    from ..io.tensors import values

    flat = values(t)
    if flat is None:  # complex, packed or opaque elements: no single number to summarise
        return {"min": None, "max": None, "mean": None, "std": None, "nan": None, "inf": None}
    moments = _Moments()
    for start in range(0, flat.numel(), _STATS_CHUNK):
        chunk = flat[start : start + _STATS_CHUNK].to(torch.float64)
        nan, inf = int(torch.isnan(chunk).sum()), int(torch.isinf(chunk).sum())
        moments.nan, moments.inf = moments.nan + nan, moments.inf + inf
        chunk = chunk[torch.isfinite(chunk)]
        if chunk.numel():
            mean = float(chunk.mean())
            moments.add(chunk.numel(), float(chunk.min()), float(chunk.max()), mean,
                        float(((chunk - mean) ** 2).sum()))
    return moments.report()


_FROZEN, _TRAINABLE = 1, 2  # a node's `grads`: the requires_grad flags of the parameters under it


class _Node:
    __slots__ = ("children", "tensor", "params", "nbytes", "sig", "grads")

    def __init__(self):
        self.children: dict[str, _Node] = {}
        self.tensor: TensorRef | None = None
        self.params = self.nbytes = self.grads = 0
        self.sig: int | None = None


def _signature(node: _Node, ids: dict) -> int:
    """Structure and shapes as a number, equal for subtrees that repeat each other (numbered
    siblings). Hash-consed bottom-up with an explicit stack: names may nest thousands of levels,
    deeper than Python's recursion (or nested tuples' comparison) allows."""
    if node.sig is not None:
        return node.sig
    stack = [node]
    while stack:
        n = stack[-1]
        pending = [c for c in n.children.values() if c.sig is None]
        if pending:  # children first; each is finished before `n` is seen again
            stack.extend(pending)
            continue
        stack.pop()
        # requires_grad too: frozen layers never fold with trainable ones
        own = (_dtype_shown(n.tensor), n.tensor.shape, n.tensor.requires_grad) if n.tensor is not None else None
        n.sig = ids.setdefault((own, tuple((k, c.sig) for k, c in n.children.items())), len(ids))
    return node.sig


def _child_rows(node: _Node, prefix: str, level: int, ids: dict):
    """(row, first member) for each child of `node`, numbered repeats folded."""
    kids = node.children
    for label, members in fold_runs(list(kids), lambda n: _signature(kids[n], ids)):
        child = kids[members[0]]
        row = {"name": prefix + label, "label": label, "depth": level,
               "params": sum(kids[m].params for m in members),
               "bytes": sum(kids[m].nbytes for m in members), "repeat": len(members)}
        if child.tensor is not None and not child.children:
            row.update(dtype=_dtype_shown(child.tensor), shape=list(child.tensor.shape))
        if child.grads == _FROZEN:  # members fold only when their flags agree (`_signature`)
            row["frozen"] = True
        yield row, child


MAX_TREE_LEVELS = 5000  # rows repeat their path: memory grows as levels² (5000: ~60 MB)


def module_tree(tensors: dict[str, TensorRef], depth: int | None = None) -> list[dict]:
    """Per-module rows (name, depth, params, bytes, repeat; `frozen` when every parameter under
    it has requires_grad false, as a whole pickled model records), numbered siblings with the
    same structure folded into one row (`blocks.{0..23}`) whatever order the file lists them in
    (see `fold_runs`), down to `depth` levels."""
    top = _Node()
    for name, t in tensors.items():
        numel, nbytes = t.numel, _stored_nbytes(t)
        grads = 0 if t.requires_grad is None else _TRAINABLE if t.requires_grad else _FROZEN
        node = top
        parts = name.split(".")
        if len(parts) > MAX_TREE_LEVELS:
            raise CkptError(f"--tree: key {name[:40]!r}... has {len(parts)} levels, more than "
                            f"{MAX_TREE_LEVELS}; list it without --tree")
        for part in parts:
            child = node.children.get(part)
            if child is None:
                child = node.children[part] = _Node()
            node = child
            node.params += numel
            node.nbytes += nbytes
            node.grads |= grads
        node.tensor = t
    rows: list[dict] = []
    ids: dict = {}
    open_levels = [_child_rows(top, "", 0, ids)]  # one generator per level being listed: no recursion
    while open_levels:
        item = next(open_levels[-1], None)
        if item is None:
            open_levels.pop()
            continue
        row, child = item
        rows.append(row)
        if depth is None or row["depth"] + 1 < depth:
            open_levels.append(_child_rows(child, row["name"] + ".", row["depth"] + 1, ids))
    return rows


# A run member: ASCII digits only (str.isdigit accepts "²" and "١", which int() refuses), and
# short enough that int() never meets Python's limit on the digits of a string.
_INDEX = re.compile(r"0|[1-9][0-9]{0,17}")  # as a number writes itself: `01` is a name, not layer 1


def fold_runs(names: list[str], signature: Callable[[str], object]) -> list[tuple[str, list[str]]]:
    """Group numbered siblings whose numbers follow one another (`0`, `1`, ... `23`) and whose
    signatures are equal into one entry labelled `{0..23}`; other names stand alone. Returns
    (label, members). The numbered siblings are taken in numeric order, whatever order the file
    lists them in (safetensors stores names sorted as strings: `0, 1, 10, 11, 2, ...`), at the
    place of the first of them; the other names keep their order."""
    numbered = [name for name in names if _INDEX.fullmatch(name)]
    if not numbered:
        return [(name, [name]) for name in names]
    first = names.index(numbered[0])
    runs: list[list[str]] = []
    for name in sorted(numbered, key=int):  # stable: "1" and "01" keep the file's order
        run = runs[-1] if runs else None
        if run and int(name) == int(run[-1]) + 1 and signature(name) == signature(run[0]):
            run.append(name)
        else:
            runs.append([name])
    return ([(name, [name]) for name in names[:first]]
            + [(f"{{{run[0]}..{run[-1]}}}" if len(run) > 1 else run[0], run) for run in runs]
            + [(name, [name]) for name in names[first:] if not _INDEX.fullmatch(name)])
