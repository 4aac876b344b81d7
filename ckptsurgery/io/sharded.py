"""Reader for Hugging Face-style sharded checkpoints: a `*.index.json` whose `weight_map`
names the shard holding each tensor."""

from __future__ import annotations

import json
import os
from collections import OrderedDict

from ..errors import CkptError
from .model import Checkpoint


def find_index(folder: str) -> str:
    indexes = sorted(n for n in os.listdir(folder) if n.endswith(".index.json"))
    if len(indexes) != 1:
        problem = "no *.index.json" if not indexes else f"several indexes ({', '.join(indexes)})"
        raise CkptError(f"{folder}: a folder with {problem}; pass the checkpoint file or its index")
    return os.path.join(folder, indexes[0])


def read_index(path: str, open_shard) -> Checkpoint:
    try:
        with open(path, "rb") as f:
            index = json.loads(f.read(16 * 1024 * 1024 + 1).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise CkptError(f"{path}: not a valid index JSON ({e})") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CkptError(f"{path}: an index JSON needs a \"weight_map\" of tensor name -> shard file")
    folder = os.path.dirname(path)
    shards: dict[str, Checkpoint] = {}
    tensors = OrderedDict()
    try:
        for name, shard_name in weight_map.items():
            if os.path.basename(shard_name) != shard_name:
                raise CkptError(f"{path}: shard {shard_name!r} is not a file beside the index")
            if shard_name not in shards:
                shards[shard_name] = open_shard(os.path.join(folder, shard_name))
            shard = shards[shard_name]
            if name not in shard.tensors:
                raise CkptError(f"{path}: tensor {name!r} is not in its shard {shard_name}")
            tensors[name] = shard.tensors[name]
    except BaseException:
        for shard in shards.values():
            shard.close()
        raise
    kinds = {s.format for s in shards.values()}
    fmt = "sharded-safetensors" if kinds <= {"safetensors"} else "sharded-torch"
    meta = index.get("metadata") if isinstance(index.get("metadata"), dict) else {}
    sources = [src for shard in shards.values() for src in shard.sources]
    return Checkpoint(path, fmt, tensors, None, None, {k: str(v) for k, v in meta.items()}, sources=sources)
