"""Reader for the folders `accelerate`'s `Accelerator.save_state` writes: one weights file per
prepared model — `model.safetensors` (or `pytorch_model.bin` without safe serialization), then
`model_1.safetensors`, `model_2...` for the others, each possibly sharded behind its own
`*.index.json` — beside `optimizer.bin`, `scheduler.bin`, `random_states_<rank>.pkl` and others.

Only the chosen model's weights are read (`--root model_1` chooses; `model` by default). The
optimizer, scheduler and random-state files are never opened, let alone unpickled."""

from __future__ import annotations

import os
import re

from ..errors import CkptError
from .formats import Format
from .model import Checkpoint
from .sharded import open_model_file

# save_state's own files besides the models: their presence tells an accelerate folder apart
_STATE_FILE = re.compile(r"(random_states_\d+\.pkl|optimizer(_\d+)?\.bin|scheduler(_\d+)?\.bin|sampler(_\d+)?\.bin"
                         r"|scaler\.pt)")
_MODEL_FILE = re.compile(r"(?:pytorch_)?(model(?:_\d+)?)(?:\.safetensors|\.bin)(?:\.index\.json)?")


def is_accelerate(folder: str) -> bool:
    names = os.listdir(folder)
    return any(_STATE_FILE.fullmatch(n) for n in names) and any(_MODEL_FILE.fullmatch(n) for n in names)


def models(folder: str) -> dict[str, list[str]]:
    """Model name (`model`, `model_1`, ...) -> the files that could hold it, in the order tried:
    a single file before an index, safetensors before torch."""
    found: dict[str, list[str]] = {}
    for name in sorted(os.listdir(folder), key=lambda n: (n.endswith(".json"), not n.endswith(".safetensors"), n)):
        match = _MODEL_FILE.fullmatch(name)
        if match:
            found.setdefault(match.group(1), []).append(name)
    return dict(sorted(found.items(), key=lambda item: (item[0] != "model", len(item[0]), item[0])))


def read_accelerate(folder: str, root: str | None) -> Checkpoint:
    """The weights of model `root` (default: `model`), read from its file or shard index.
    Outputs hold that state dict alone, reported under its model name."""
    available = models(folder)
    name = "model" if root is None else root
    files = available.get(name)
    if not files:
        raise CkptError(f"{folder}: an accelerate folder without {name!r}; its models: "
                        f"{', '.join(available) or 'none'} (choose with --root)")
    if len(files) > 1:
        raise CkptError(f"{folder}: {name!r} is in several files ({', '.join(files)}); pass the one to read")
    inner = open_model_file(os.path.join(folder, files[0]))
    return Checkpoint(folder, Format.ACCELERATE, inner.tensors, name, None, inner.metadata, inner.sources,
                      inner.others, inner.events)
