"""The one way every operation writes: `write_checkpoint` plans the output (format, casts, tied
names, shards, what is left out), refuses what cannot be written before anything is, and
streams the tensors through the writers of `io/write.py`."""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from typing import Callable

from ..dtypes import DType
from ..errors import CkptError, UsageError
from ..io import Checkpoint, TensorRef
from ..io.dcp import check_dcp_writable, write_dcp
from ..io.pickler import PickleRefused
from ..io.tree import extras
from ..io.write import (
    StagedOutputs, cast_target, castable_storages, check_safetensors, check_writable, output_format,
    plan_safetensors, plan_shards, shard_names, torch_payload, write_safetensors, write_torch,
)

# progress(total_bytes, label) -> advance(n_bytes): how the CLI shows a bar; None shows none
ProgressFactory = Callable[[int, str], Callable[[int], None]]


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


FORMATS = ("dcp",)  # what --format chooses; the others follow the output's extension


def _write_dcp(ckpt: Checkpoint, tensors: dict[str, TensorRef], output: str, cast: DType | None,
               max_shard_size: int | None, force: bool, dry_run: bool, progress, others: dict) -> dict:
    """A DCP folder: the whole checkpoint (the state dict and what lies outside its root), each
    entry under its flattened key."""
    check_dcp_writable(output, force)
    payload = torch_payload(ckpt, tensors, keep_metadata=False, others=others)
    prefix = f"{ckpt.root}." if ckpt.root else ""
    stored = [(n, t, cast_target(t.dtype, cast)) for n, t in tensors.items()]
    report = {
        "input": ckpt.path, "output": output, "format": "dcp", "root": ckpt.root, "tensors": len(tensors),
        "total_bytes": sum(t.numel * d.itemsize for _, t, d in stored), "dtype": cast.name if cast else None,
        "kept_dtype": [n for n, t, d in stored if cast and d is not cast], "tied": {}, "extras_left_out": [],
        "files": [output], "dry_run": dry_run, "removed": [],
    }
    if dry_run:
        return report
    tick = progress(report["total_bytes"], f"writing {os.path.basename(output)}") if progress else None
    with StagedOutputs() as outputs, outputs.stage_folder(output) as folder:
        written = write_dcp(folder, payload, cast_names={prefix + n for n in tensors}, cast=cast, progress=tick,
                            max_file_size=max_shard_size)
    report["files"] = [os.path.join(output, name) for name in written]
    return report


def write_checkpoint(ckpt: Checkpoint, tensors: dict[str, TensorRef], output: str, *,
                     cast: DType | None = None, max_shard_size: int | None = None, force: bool = False,
                     dry_run: bool = False, progress: ProgressFactory | None = None,
                     keep_metadata: bool = True, others: dict | None = None,
                     inputs: list[Checkpoint] | None = None, format: str | None = None) -> dict:
    """Write `tensors` (the state dict, possibly edited) of `ckpt` to `output`; return a report.
    Entries outside the root, and `others` (the root's non-tensor entries, by default the
    checkpoint's own), travel with .pth and DCP outputs; safetensors holds tensors only.
    `inputs`: every checkpoint whose contents the output holds (by default `ckpt`), for the rule
    that an output never runs more than its inputs. `format`: "dcp" writes a DCP folder at
    `output`; by default the output's extension decides."""
    if format is not None and format not in FORMATS:
        raise UsageError(f"--format {format!r}: choose one of {', '.join(FORMATS)}")
    if format == "dcp":
        return _write_dcp(ckpt, tensors, output, cast, max_shard_size, force, dry_run, progress,
                          ckpt.others if others is None else others)
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
    shards = plan_shards(sizes, max_shard_size) if max_shard_size and sizes else [[n for n, _ in sizes]]
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
