"""Reader for Hugging Face-style sharded checkpoints: a `*.index.json` whose `weight_map`
names the shard holding each tensor."""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Callable

from ..errors import CkptError
from .formats import Format, ShardedFormat, detect_format
from .model import Checkpoint
from .small_files import parse_json, read_small

INDEX_LIMIT = 16 * 1024 * 1024  # far above any real index (a few hundred KB for 1000s of tensors)


# The weights of an unsharded Hugging Face model folder, in the order transformers and diffusers
# prefer them when a folder holds both
SINGLE_WEIGHT_FILES = ("model.safetensors", "diffusion_pytorch_model.safetensors",
                       "pytorch_model.bin", "diffusion_pytorch_model.bin")


def find_index(folder: str) -> str:
    """The folder's one `*.index.json`, or, with none, the one weights file of an unsharded
    Hugging Face model folder (`model.safetensors`, `pytorch_model.bin`, ...)."""
    names = os.listdir(folder)
    indexes = sorted(n for n in names if n.endswith(".index.json"))
    if len(indexes) == 1:
        return os.path.join(folder, indexes[0])
    if not indexes:
        for name in SINGLE_WEIGHT_FILES:
            if name in names:
                return os.path.join(folder, name)
    problem = (f"several indexes ({', '.join(indexes)})" if indexes
               else f"no *.index.json and none of {', '.join(SINGLE_WEIGHT_FILES)}")
    raise CkptError(f"{folder}: a folder with {problem}; pass the checkpoint file or its index")


def load_index(path: str) -> dict:
    """The index's JSON, with a "weight_map" of tensor name -> shard file name."""
    raw = read_small(path, INDEX_LIMIT, f"an index JSON larger than {INDEX_LIMIT >> 20} MiB; not a shard index")
    return parse_index(path, raw)


def parse_index(path: str, raw: bytes) -> dict:
    """An index's bytes as its JSON, checked to hold a "weight_map" of tensor name -> shard file name."""
    index = parse_json(path, raw, "not a valid index JSON")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CkptError(f"{path}: an index JSON needs a \"weight_map\" of tensor name -> shard file")
    return index


def plain_name(name: str) -> bool:
    """A file name inside the index's own folder: no path, no way out of the folder."""
    return name not in ("", ".", "..") and not any(c in name for c in "/\\\0")


def shard_path(index_path: str, name: str) -> str:
    if not plain_name(name):
        raise CkptError(f"{index_path}: shard {name!r} is not a plain file name beside the index; "
                        f"fix its weight_map")
    return os.path.join(os.path.dirname(index_path), name)


def read_folder(folder: str) -> Checkpoint:
    """A Hugging Face model folder: its index, or its one weights file."""
    return open_model_file(find_index(folder))


def open_model_file(path: str) -> Checkpoint:
    """A model's weights in a folder of several things: a checkpoint file or a shard index."""
    if detect_format(path) is Format.INDEX:
        return read_index(path)
    return open_shard(path)


def open_shard(path: str) -> Checkpoint:
    """One shard of an index: a checkpoint file, never another index or a folder (no recursion)."""
    spec = detect_format(path).spec
    if not spec.shard:
        what = "a folder" if spec.folder else "a shard index"  # the one file format that is no shard
        raise CkptError(f"{path}: is {what}; a shard must be a safetensors or torch checkpoint file")
    return spec.read(path, "")


def read_index(path: str) -> Checkpoint:
    """The tensors an index's weight_map names, from its shards (each opened once, by open_shard)."""

    def open_named(shard_name: str) -> Checkpoint:
        shard = shard_path(path, shard_name)
        if os.path.exists(shard) and os.path.samefile(shard, path):
            raise CkptError(f"{path}: shard {shard_name!r} is the index itself")
        return open_shard(shard)

    return from_index(path, load_index(path), open_named)


def from_index(path: str, index: dict, open_named: Callable[[str], Checkpoint]) -> Checkpoint:
    """The checkpoint an index describes, its shards opened by name with `open_named` (once each)."""
    shards: dict[str, Checkpoint] = {}
    tensors, others = OrderedDict(), OrderedDict()  # others: a .bin shard's `_extra_state` entries
    try:
        for name, shard_name in index["weight_map"].items():
            if shard_name not in shards:
                shards[shard_name] = open_named(shard_name)
            shard = shards[shard_name]
            if name in shard.tensors:
                tensors[name] = shard.tensors[name]
            elif name in shard.others:
                others[name] = shard.others[name]
            else:
                raise CkptError(f"{path}: tensor {name!r} is not in its shard {shard_name}")
        for shard in shards.values():  # entries the weight_map does not name still travel
            others.update((k, v) for k, v in shard.others.items() if k not in others)
    except BaseException:
        for shard in shards.values():
            shard.close()
        raise
    kinds = {s.format for s in shards.values()}
    fmt = ShardedFormat.SAFETENSORS if kinds <= {Format.SAFETENSORS} else ShardedFormat.TORCH
    # total_size describes these shards, not the tensors: a rewrite would carry a stale figure
    meta = index.get("metadata") if isinstance(index.get("metadata"), dict) else {}
    meta = {k: v for k, v in meta.items() if k != "total_size"}  # numbers too: a rewrite reports them dropped
    try:
        "".join(k + (v if isinstance(v, str) else "") for k, v in meta.items()).encode("utf-8")
    except UnicodeEncodeError:
        raise CkptError(f"{path}: the index's metadata holds text that is not valid Unicode (a lone surrogate)") from None
    if not meta and shards:  # an index of total_size alone (as Hugging Face and we write it): the shards' own
        first = shards[sorted(shards)[0]]
        meta = {k: v for k, v in (first.metadata or {}).items() if k != "format" and not k.startswith("ckptsurgery.")}
    sources = [src for shard in shards.values() for src in shard.sources]
    # transformers loads shards in sorted name order: an unsafe load meets their events so
    events = [e for name in sorted(shards) for e in shards[name].events]
    return Checkpoint(path, fmt, tensors, None, None, meta, sources=sources, others=others, events=events)
