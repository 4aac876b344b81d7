"""The operations behind the commands, as plain functions that read lazily, write through
`write_checkpoint` as one `WriteOptions` says, and return a typed report (ops/reports.py) whose
`to_json()` is the command's `--json` output. No printing here: the command line decides what to
show. The layers and how to add to them: docs/architecture.md.

    from ckptsurgery.ops import WriteOptions, convert_checkpoint, merge_checkpoints
    report = convert_checkpoint("model.pth", WriteOptions("model.safetensors"))
    report = merge_checkpoints(["a.pth", "b.pth"], WriteOptions("avg.pth"), average=True)
    print(report.total_bytes, report.to_json())

The functions' names differ from their modules' (`ops.convert` is the module,
`ops.convert_checkpoint` the function). Each is imported when first asked for: a command loads
only the operations it runs (start-up is most of what `inspect` costs)."""

from __future__ import annotations

from importlib import import_module

# exported name -> the module that defines it
_EXPORTS = {
    "extract_lora": ".adapters",
    "convert_adapter": ".adapters.convert",
    "merge_adapters": ".adapters.combine",
    "resize_adapter": ".adapters.resize",
    "convert_checkpoint": ".convert",
    "diff_checkpoints": ".diff",
    **dict.fromkeys(("drop_keys", "filter_keys", "rename_keys"), ".edit"),
    **dict.fromkeys(("inspect_checkpoint", "inspect_report", "module_tree"), ".inspect"),
    "tensor_stats": ".stats",
    "fold_adapters": ".merge.fold",
    "merge_checkpoints": ".merge",
    "merge_into": ".merge.into",
    "merge_recipe": ".merge.recipe",
    "merge_union": ".merge.union",
    "merge_with_method": ".merge.by_method",
    **dict.fromkeys(("ProgressFactory", "ReadOptions", "WriteOptions"), ".options"),
    **dict.fromkeys(("DiffReport", "DropReport", "ExtractReport", "FilterReport", "FoldReport", "InspectReport",
                     "IntoReport", "LoraConvertReport", "LoraMergeReport", "LoraResizeReport", "MergeReport", "MethodReport", "RecipeReport", "RenameReport", "Report",
                     "UnionReport", "WriteReport"), ".reports"),
    "write_checkpoint": ".write",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
