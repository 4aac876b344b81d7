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
from .io.tree import extras
from .io.write import (
    StagedOutputs, check_writable, output_format, plan_safetensors,
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
            }
            for name, t in chosen.items()
        ],
    }


_STATS_CHUNK = 1 << 22  # elements per step: bounded memory whatever the tensor's size


def tensor_stats(t: TensorRef) -> dict:
    """min/max/mean/std over finite values, and NaN/Inf counts; streamed in chunks (imports torch)."""
    import torch

    from .tensors import as_torch

    if t.dtype.name.startswith("complex"):
        return {"min": None, "max": None, "mean": None, "std": None, "nan": None, "inf": None}
    flat = as_torch(t).reshape(-1)
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
    __slots__ = ("children", "tensor", "params", "nbytes", "_sig")

    def __init__(self):
        self.children: OrderedDict[str, _Node] = OrderedDict()
        self.tensor: TensorRef | None = None
        self.params = self.nbytes = 0
        self._sig = None

    def signature(self):
        """Structure and shapes, for telling whether numbered siblings repeat each other."""
        if self._sig is None:
            own = (self.tensor.dtype.name, self.tensor.shape) if self.tensor else None
            self._sig = (own, tuple((k, c.signature()) for k, c in self.children.items()))
        return self._sig


def module_tree(tensors: dict[str, TensorRef], depth: int | None = None) -> list[dict]:
    """Per-module rows (name, depth, params, bytes, repeat), numbered siblings with the same
    structure folded into one row (`blocks.{0..23}`), down to `depth` levels."""
    top = _Node()
    for name, t in tensors.items():
        node = top
        for part in name.split("."):
            node = node.children.setdefault(part, _Node())
            node.params += t.numel
            node.nbytes += t.nbytes
        node.tensor = t
    rows: list[dict] = []

    def walk(node: _Node, prefix: str, level: int) -> None:
        for label, members in core.fold_runs(list(node.children), lambda n: node.children[n].signature()):
            child = node.children[members[0]]
            row = {"name": prefix + label, "label": label, "depth": level,
                   "params": sum(node.children[m].params for m in members),
                   "bytes": sum(node.children[m].nbytes for m in members), "repeat": len(members)}
            if child.tensor is not None and not child.children:
                row.update(dtype=child.tensor.dtype.name, shape=list(child.tensor.shape))
            rows.append(row)
            if depth is None or level + 1 < depth:
                walk(child, prefix + label + ".", level + 1)

    walk(top, "", 0)
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
           progress, whole: bool, keep_metadata: bool) -> None:
    """One output file: the whole checkpoint, or (`whole=False`) one shard's plain state dict."""
    if fmt == "safetensors":
        write_safetensors(f, tensors, ckpt.metadata if whole else {}, cast, progress)
    else:
        payload = torch_payload(ckpt, tensors, keep_metadata) if whole else OrderedDict(tensors)
        write_torch(f, payload, cast, progress)


def write_checkpoint(ckpt: Checkpoint, tensors: dict[str, TensorRef], output: str, *,
                     cast: DType | None = None, max_shard_size: int | None = None, force: bool = False,
                     dry_run: bool = False, progress: ProgressFactory | None = None,
                     keep_metadata: bool = True) -> dict:
    """Write `tensors` (the state dict, possibly edited) of `ckpt` to `output`; return a report.
    Entries outside the root travel with .pth outputs; safetensors holds tensors only."""
    fmt = output_format(output)
    stored, aliases = plan_safetensors(tensors, cast)
    sizes = [(name, t.numel * dtype.itemsize) for name, t, dtype in stored]
    total = sum(size for _, size in sizes)
    shards = core.plan_shards(sizes, max_shard_size) if max_shard_size else [[n for n, _ in sizes]]
    outside = list(extras(ckpt.obj, ckpt.root))
    report = {
        "input": ckpt.path, "output": output, "format": fmt, "root": ckpt.root,
        "tensors": len(tensors), "total_bytes": total,
        "dtype": cast.name if cast else None,
        "tied": {alias: target for alias, target, _ in aliases},
        "extras_left_out": outside if fmt == "safetensors" or len(shards) > 1 else [],
        "files": [output], "dry_run": dry_run,
    }
    if len(shards) > 1:
        files, index = shard_names(output, len(shards))
        report["files"] = files + [index]
        report["shards"] = len(shards)
    check_writable(report["files"], force)
    if dry_run:
        return report
    tick = progress(total, f"writing {os.path.basename(output)}") if progress else None
    with StagedOutputs() as outputs:
        if len(shards) == 1:
            with outputs.stage(output) as f:
                _write(f, fmt, ckpt, tensors, cast, tick, whole=True, keep_metadata=keep_metadata)
            return report
        # each shard holds its tensors plus the tied names that point at them
        owner = report["tied"]
        weight_map = {}
        for path, names in zip(files, shards):
            members = set(names)
            part = OrderedDict((n, t) for n, t in tensors.items() if owner.get(n, n) in members)
            with outputs.stage(path) as f:
                _write(f, fmt, ckpt, part, cast, tick, whole=False, keep_metadata=keep_metadata)
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
