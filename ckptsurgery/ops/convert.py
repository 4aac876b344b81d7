"""convert: between .pth, .safetensors and DCP folders, and into Hugging Face-style shards; with
`--dequantize` a Hugging Face model folder (or an `hf://` repository) in and `-o DIR/` out writes
a model folder."""

from __future__ import annotations

import os
from dataclasses import replace

from ..io.formats import is_remote
from .inputs import open_input, with_read
from .options import READ_AS_IS, ReadOptions, WriteOptions, check_write_options, dtype_to_cast
from .reports import WriteReport
from .write import FolderOutput, write_checkpoint

FOLDER_SHARD_SIZE = "5GB"  # transformers' save_pretrained default
WEIGHTS_FILE = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"  # a repository's index, fetched for its grouping into shards


def convert_checkpoint(input: str, write: WriteOptions, *, root: str | None = None,
                       dtype: str | None = None, read: ReadOptions = READ_AS_IS) -> WriteReport:
    """Convert between .pth, .safetensors and DCP folders, and shard, bit-exact unless `dtype`
    casts the float16/bfloat16/float32/float64 tensors. `read`: how the input is read (ops/inputs.py);
    with `read.dequantize`, scaled FP8 weights are written dequantized (in `dtype`, else bfloat16), their scales left out (ops/dequantize.py);
    from a model folder (a config.json in it) to `-o DIR/`, DIR is a model folder: the weights
    (shards of --max-shard-size, else as the input's index groups them, else 5GB as save_pretrained),
    config.json updated, the tokenizer's, generation and remote code files copied.

    Example:
        >>> convert_checkpoint("model.pth", WriteOptions("model.safetensors", max_shard_size="2GB"))
    """
    write = check_write_options(write)
    cast = dtype_to_cast(dtype)
    with open_input(input, root, read, cast) as (ckpt, done):
        folder = _model_folder_output(input, write) if read.dequantize else None
        if folder is None:
            return with_read(write_checkpoint(ckpt.tensors, write, source=ckpt, cast=cast), done)
        from .model_folder import CONFIG, converted_folder_files, write_folder_files

        dequantized = done.dequantized
        written = dequantized.dtype if dequantized.tensors else (cast.name if cast else None)
        commit = _commit_read(ckpt, input)
        files = converted_folder_files(input, written, bool(dequantized.tensors), commit)
        shards = _input_shards(input, commit) if write.max_shard_size is None else None
        shard = write.max_shard_size if write.max_shard_size is not None or shards else FOLDER_SHARD_SIZE
        weights = replace(write, output=os.path.join(folder, WEIGHTS_FILE), max_shard_size=shard)
        report = write_checkpoint(ckpt.tensors, weights, source=ckpt, cast=cast, shards=shards, folder=FolderOutput(
            folder, files.names, lambda staged: write_folder_files(staged, files)))
        return replace(with_read(report, done), model_folder={
            "config_changes": files.config_changes,
            "copied": [name for name in files.names if name != CONFIG],  # a remote input's: fetched, then written
            "notes": files.notes})


MAX_INDEX = 256 << 20  # a shard index lists names: DeepSeek-V3's is 9 MB


def _input_shards(folder: str, commit: str | None) -> list[list[str]] | None:
    """The names in each shard of the folder's safetensors index (an `hf://` repository's
    model.safetensors.index.json, fetched at `commit`), shard by shard in the order of their file
    names; None when the folder holds no index (or not one index)."""
    import json

    if is_remote(folder):
        from ..io.remote import repository_files

        raw = repository_files(folder, [HF_INDEX], MAX_INDEX, commit).get(HF_INDEX)
    else:
        indexes = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors.index.json"))
        if len(indexes) != 1 or os.path.getsize(os.path.join(folder, indexes[0])) > MAX_INDEX:
            return None
        try:
            with open(os.path.join(folder, indexes[0]), "rb") as f:
                raw = f.read()
        except OSError:
            return None
    try:
        weight_map = json.loads(raw).get("weight_map") if raw is not None else None
    except (ValueError, AttributeError, RecursionError):
        return None  # the reader judged the index already; here it only suggests a grouping
    if not isinstance(weight_map, dict):
        return None
    by_file: dict[str, list[str]] = {}
    for name, file in weight_map.items():
        by_file.setdefault(str(file), []).append(name)
    return [by_file[file] for file in sorted(by_file)]


def _commit_read(ckpt, input: str) -> str | None:
    """The commit an `hf://` input's weights were read at: its other files are fetched there too."""
    if not is_remote(input):
        return None
    from ..io.remote import commit_of

    return commit_of(ckpt)


def _model_folder_output(input: str, write: WriteOptions) -> str | None:
    """The output folder when a model folder is written to `-o DIR/` (not --format dcp)."""
    if not write.output.endswith(("/", os.sep)) or write.format is not None:
        return None
    if is_remote(input):
        from .model_folder import is_repository

        if not is_repository(input):  # a file of a repository, or a URL: its weights alone
            return None
    elif not (os.path.isdir(input) and os.path.isfile(os.path.join(input, "config.json"))):
        return None
    return write.output.rstrip("/" + os.sep) or write.output
