"""The operations behind the commands, one module each, as plain functions that read lazily,
write through `write.write_checkpoint` and return a report: a dict that is also the command's
`--json` output. No printing here: the CLI decides what to show.

    from ckptsurgery.ops import convert, diff, extract_lora, inspect, merge
    report = convert("model.pth", "model.safetensors")
    report = merge(["base.safetensors"], "merged.safetensors", lora=["adapter"])

The names below are the functions; each module stays importable by its full name
(`ckptsurgery.ops.merge` the function, `importlib.import_module("ckptsurgery.ops.merge")` the
module)."""

from .convert import convert
from .diff import diff
from .edit import drop_keys, filter_keys, rename_keys
from .inspect import inspect, inspect_report, module_tree, tensor_stats
from .lora import extract_lora
from .merge import merge
from .write import ProgressFactory, write_checkpoint

__all__ = ["ProgressFactory", "convert", "diff", "drop_keys", "extract_lora", "filter_keys", "inspect", "inspect_report", "merge",
           "module_tree", "rename_keys", "tensor_stats", "write_checkpoint"]
