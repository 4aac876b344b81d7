"""The operations behind the commands, as plain functions that read lazily, write through
`write_checkpoint` as one `WriteOptions` says, and return a typed report (ops/reports.py) whose
`to_json()` is the command's `--json` output. No printing here: the command line decides what to
show. The layers and how to add to them: docs/architecture.md.

    from ckptsurgery.ops import WriteOptions, convert_checkpoint, merge_checkpoints
    report = convert_checkpoint("model.pth", WriteOptions("model.safetensors"))
    report = merge_checkpoints(["a.pth", "b.pth"], WriteOptions("avg.pth"), average=True)
    print(report.total_bytes, report.to_json())

The functions' names differ from their modules' (`ops.convert` is the module,
`ops.convert_checkpoint` the function)."""

from .adapters import extract_lora
from .convert import convert_checkpoint
from .diff import diff_checkpoints
from .edit import drop_keys, filter_keys, rename_keys
from .inspect import inspect_checkpoint, inspect_report, module_tree, tensor_stats
from .merge import fold_adapters, merge_checkpoints, merge_into, merge_union, merge_with_method
from .options import ProgressFactory, WriteOptions
from .reports import (
    DiffReport, DropReport, ExtractReport, FilterReport, FoldReport, InspectReport, IntoReport, MergeReport,
    MethodReport, RenameReport, Report, UnionReport, WriteReport,
)
from .write import write_checkpoint

__all__ = [
    "DiffReport", "DropReport", "ExtractReport", "FilterReport", "FoldReport", "InspectReport", "IntoReport",
    "MergeReport", "MethodReport", "ProgressFactory", "RenameReport", "Report", "UnionReport", "WriteOptions",
    "WriteReport", "convert_checkpoint", "diff_checkpoints", "drop_keys", "extract_lora", "filter_keys", "fold_adapters",
    "inspect_checkpoint", "inspect_report", "merge_checkpoints", "merge_into", "merge_union", "merge_with_method",
    "module_tree", "rename_keys", "tensor_stats", "write_checkpoint",
]
