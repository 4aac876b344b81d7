"""The operations behind the commands, as plain functions returning reports (dicts that are
also the commands' --json output). No printing here: the CLI decides what to show."""

from __future__ import annotations

import json
import math
import os
from collections import OrderedDict
from typing import Callable

from . import core
from .dtypes import CAST_TARGETS, DType
from .errors import CkptError
from .io import Checkpoint, TensorRef, open_checkpoint
from .io.pickler import PickleRefused
from .io.tree import describe, extras
from .io.write import (
    StagedOutputs, castable_storages, check_safetensors, check_writable, output_format, plan_safetensors,
    torch_payload, write_safetensors, write_torch,
)

ProgressFactory = Callable[[int, str], Callable[[int], None]]


# ---- inspect -------------------------------------------------------------------------------

def _unique_views(tensors: dict[str, TensorRef]) -> list[TensorRef]:
    """Tied names counted once, as `sum(p.numel() for p in model.parameters())` does."""
    return list({t.view_key(): t for t in tensors.values()}.values())


def inspect_report(ckpt: Checkpoint, patterns: list[str] | None = None) -> dict:
    names = core.select(ckpt.tensors, patterns) if patterns else list(ckpt.tensors)
    shares = ckpt.shares_with()
    chosen = OrderedDict((n, ckpt.tensors[n]) for n in names)
    unique = _unique_views(chosen)
    return {
        "path": ckpt.path,
        "format": ckpt.format,
        "root": ckpt.root,
        "extras": extras(ckpt.obj, ckpt.root) if ckpt.root is not None else {},
        # non-tensor values inside the state dict itself (`fc._extra_state`)
        "non_tensors": {name: describe(value) for name, value in ckpt.others.items()},
        "metadata": ckpt.metadata,
        "inert": ckpt.inert,
        "total_params": sum(t.numel for t in unique),
        "total_bytes": sum(t.nbytes for t in unique),
        "tensors": [
            {
                "name": name,
                "dtype": t.dtype.name,
                "shape": list(t.shape),
                "nbytes": t.nbytes,
                "requires_grad": t.requires_grad,
                "shares_with": shares[name],
                "contiguous": t.is_contiguous,
                **({"quantization": _quantization(t)} if t.quant else {}),
            }
            for name, t in chosen.items()
        ],
    }


def _quantization(t: TensorRef) -> dict:
    """A quantized tensor's scheme and, per tensor, its scale and zero point (per channel: the axis)."""
    q = t.quant
    if q.axis is None:
        return {"scheme": q.scheme.name, "scale": q.scale, "zero_point": q.zero_point}
    return {"scheme": q.scheme.name, "axis": q.axis, "channels": q.scale.numel}


_STATS_CHUNK = 1 << 22  # elements per step: bounded memory whatever the tensor's size


def tensor_stats(t: TensorRef) -> dict:
    """min/max/mean/std over finite values, and NaN/Inf counts; streamed in chunks (imports torch)."""
    import torch

    from .tensors import values

    flat = values(t)
    if flat is None:  # complex, packed or opaque elements: no single number to summarise
        return {"min": None, "max": None, "mean": None, "std": None, "nan": None, "inf": None}
    count, mean, m2, nan, inf = 0, 0.0, 0.0, 0, 0
    low, high = math.inf, -math.inf
    for start in range(0, flat.numel(), _STATS_CHUNK):
        chunk = flat[start : start + _STATS_CHUNK].to(torch.float64)
        nan += int(torch.isnan(chunk).sum())
        inf += int(torch.isinf(chunk).sum())
        chunk = chunk[torch.isfinite(chunk)]
        n = chunk.numel()
        if not n:
            continue
        low, high = min(low, float(chunk.min())), max(high, float(chunk.max()))
        c_mean = float(chunk.mean())
        c_m2 = float(((chunk - c_mean) ** 2).sum())
        delta, total = c_mean - mean, count + n
        mean += delta * n / total  # Chan et al.: merge the chunk's moments into the running ones
        m2 += c_m2 + delta * delta * count * n / total
        count = total
    if not count:
        return {"min": None, "max": None, "mean": None, "std": None, "nan": nan, "inf": inf}
    std = math.sqrt(m2 / (count - 1)) if count > 1 else 0.0
    finite = lambda x: x if math.isfinite(x) else None  # noqa: E731  (sums of values near 1e308 overflow)
    return {"min": low, "max": high, "mean": finite(mean), "std": finite(std), "nan": nan, "inf": inf}


class _Node:
    __slots__ = ("children", "tensor", "params", "nbytes", "sig")

    def __init__(self):
        self.children: dict[str, _Node] = {}
        self.tensor: TensorRef | None = None
        self.params = self.nbytes = 0
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
        own = (n.tensor.dtype.name, n.tensor.shape) if n.tensor is not None else None
        n.sig = ids.setdefault((own, tuple((k, c.sig) for k, c in n.children.items())), len(ids))
    return node.sig


def _child_rows(node: _Node, prefix: str, level: int, ids: dict):
    """(row, first member) for each child of `node`, numbered repeats folded."""
    kids = node.children
    for label, members in core.fold_runs(list(kids), lambda n: _signature(kids[n], ids)):
        child = kids[members[0]]
        row = {"name": prefix + label, "label": label, "depth": level,
               "params": sum(kids[m].params for m in members),
               "bytes": sum(kids[m].nbytes for m in members), "repeat": len(members)}
        if child.tensor is not None and not child.children:
            row.update(dtype=child.tensor.dtype.name, shape=list(child.tensor.shape))
        yield row, child


MAX_TREE_LEVELS = 5000  # rows repeat their path: memory grows as levels² (5000: ~60 MB)


def module_tree(tensors: dict[str, TensorRef], depth: int | None = None) -> list[dict]:
    """Per-module rows (name, depth, params, bytes, repeat), numbered siblings with the same
    structure folded into one row (`blocks.{0..23}`), down to `depth` levels."""
    top = _Node()
    for name, t in tensors.items():
        numel, nbytes = t.numel, t.nbytes
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


# ---- convert -------------------------------------------------------------------------------

def shard_names(output: str, count: int) -> tuple[list[str], str]:
    """Hugging Face's names: model.safetensors -> model-00001-of-00003.safetensors and
    model.safetensors.index.json."""
    folder, name = os.path.split(output)
    stem, ext = os.path.splitext(name)
    shards = [os.path.join(folder, f"{stem}-{i:05d}-of-{count:05d}{ext}") for i in range(1, count + 1)]
    return shards, output + ".index.json"


def _write(f, fmt: str, ckpt: Checkpoint, tensors: dict[str, TensorRef], cast: DType | None,
           progress, whole: bool, keep_metadata: bool, others: dict, inputs: list[Checkpoint]) -> None:
    """One output file: the whole checkpoint, or (`whole=False`) one shard's plain state dict."""
    if fmt == "safetensors":
        write_safetensors(f, tensors, ckpt.metadata if whole else {}, cast, progress)
    else:
        payload = torch_payload(ckpt, tensors, keep_metadata, others) if whole else OrderedDict(tensors)
        try:
            write_torch(f, payload, cast, progress, cast_only=tensors, inputs=[c.events for c in inputs])
        except PickleRefused as e:
            raise CkptError(f"{ckpt.path}: cannot be written as a .pth: {e}") from None


def write_checkpoint(ckpt: Checkpoint, tensors: dict[str, TensorRef], output: str, *,
                     cast: DType | None = None, max_shard_size: int | None = None, force: bool = False,
                     dry_run: bool = False, progress: ProgressFactory | None = None,
                     keep_metadata: bool = True, others: dict | None = None,
                     inputs: list[Checkpoint] | None = None) -> dict:
    """Write `tensors` (the state dict, possibly edited) of `ckpt` to `output`; return a report.
    Entries outside the root, and `others` (the root's non-tensor entries, by default the
    checkpoint's own), travel with .pth outputs; safetensors holds tensors only. `inputs`: every
    checkpoint whose contents the output holds (by default `ckpt`), for the rule that an output
    never runs more than its inputs."""
    inputs = [ckpt] if inputs is None else inputs
    fmt = output_format(output)
    others = ckpt.others if others is None else others
    stored, aliases = plan_safetensors(tensors, cast)
    if cast and fmt == "torch":  # a .pth casts whole storages: see castable_storages
        castable = castable_storages(tensors)
        stored = [(n, t, d if id(t.storage) in castable else t.dtype) for n, t, d in stored]
    if fmt == "safetensors":
        try:
            check_safetensors(stored)  # before anything is written, and under --dry-run too
        except CkptError as e:
            raise CkptError(f"{ckpt.path}: {e}") from None
    sizes = [(name, t.numel * dtype.itemsize) for name, t, dtype in stored]
    total = sum(size for _, size in sizes)
    # no tensors: no shards to plan, one (empty) file
    shards = core.plan_shards(sizes, max_shard_size) if max_shard_size and sizes else [[n for n, _ in sizes]]
    outside = list(extras(ckpt.obj, ckpt.root)) + list(others)
    report = {
        "input": ckpt.path, "output": output, "format": fmt, "root": ckpt.root,
        "tensors": len(tensors), "total_bytes": total,
        "dtype": cast.name if cast else None,
        # --dtype leaves float8, quantized, integer and bool tensors as they are (and, in a .pth,
        # floating ones whose storage also backs those): say which
        "kept_dtype": [n for n, t, d in stored if cast and d is not cast],
        "tied": {alias: target for alias, target, _ in aliases},
        "extras_left_out": outside if fmt == "safetensors" or len(shards) > 1 else [],
        "files": [output], "dry_run": dry_run,
    }
    files, index = shard_names(output, len(shards))
    if len(shards) > 1:
        report["files"] = files + [index]
        report["shards"] = len(shards)
    # an earlier sharded output named after OUT: its shards that this write does not replace go
    report["removed"] = check_writable(report["files"], force, index)
    if dry_run:
        return report
    tick = progress(total, f"writing {os.path.basename(output)}") if progress else None
    with StagedOutputs(remove=report["removed"]) as outputs:
        if len(shards) == 1:
            with outputs.stage(output) as f:
                _write(f, fmt, ckpt, tensors, cast, tick, whole=True, keep_metadata=keep_metadata,
                       others=others, inputs=inputs)
            return report
        # each shard holds its tensors plus the tied names that point at them
        owner = report["tied"]
        weight_map = {}
        for path, names in zip(files, shards):
            members = set(names)
            part = OrderedDict((n, t) for n, t in tensors.items() if owner.get(n, n) in members)
            with outputs.stage(path) as f:
                _write(f, fmt, ckpt, part, cast, tick, whole=False, keep_metadata=keep_metadata,
                       others=others, inputs=inputs)
            weight_map.update((n, os.path.basename(path)) for n in part)
        # key order, not sorted as Hugging Face writes it: reading back keeps the model's order
        body = {"metadata": {"total_size": total}, "weight_map": {n: weight_map[n] for n in tensors}}
        with outputs.stage(index) as f:
            f.write((json.dumps(body, indent=2) + "\n").encode())
    return report


def convert(input: str, output: str, *, root: str | None = None, dtype: str | None = None,
            max_shard_size: str | None = None, force: bool = False, dry_run: bool = False,
            progress: ProgressFactory | None = None) -> dict:
    """Convert between .pth and .safetensors (and shard), bit-exact unless `dtype` casts."""
    cast = None
    if dtype is not None:
        if dtype not in CAST_TARGETS:
            raise CkptError(f"--dtype {dtype!r}: choose one of {', '.join(CAST_TARGETS)}")
        cast = CAST_TARGETS[dtype]
    limit = core.parse_size(max_shard_size) if max_shard_size else None
    with open_checkpoint(input, root) as ckpt:
        return write_checkpoint(ckpt, ckpt.tensors, output, cast=cast, max_shard_size=limit,
                                force=force, dry_run=dry_run, progress=progress)
