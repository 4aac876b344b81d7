from __future__ import annotations

from typing import Annotated, Optional

import typer

from .. import ops
from ..io import open_checkpoint
from . import app
from .common import (
    InputArg, JsonOpt, QuietOpt, RootOpt, console, human_bytes, note, print_json, printable, progress_bar,
)


@app.command()
def inspect(
    input: InputArg,
    keys: Annotated[Optional[list[str]], typer.Option(
        "--keys", metavar="PATTERN", help="Only keys matching PATTERN (glob, module name, or re:REGEX); repeatable.")] = None,
    tree: Annotated[bool, typer.Option("--tree", help="Per-module summary; numbered repeats folded.")] = False,
    depth: Annotated[Optional[int], typer.Option("--depth", min=1, metavar="N", help="Levels shown by --tree.")] = None,
    stats: Annotated[bool, typer.Option("--stats", help="min/max/mean/std and NaN/Inf counts (reads data).")] = False,
    root: RootOpt = None,
    json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """List a checkpoint's tensors (reads headers only, unless --stats)."""
    with open_checkpoint(input, root) as ckpt:
        report = ops.inspect_report(ckpt, keys)
        if stats:
            with progress_bar(quiet or json) as progress:
                total = sum(entry["nbytes"] for entry in report["tensors"])
                tick = progress(total, "reading tensors") if progress else None
                for entry in report["tensors"]:
                    t = ckpt.tensors[entry["name"]]
                    entry.update(ops.tensor_stats(t))
                    if tick:
                        tick(t.nbytes)
        if tree:
            chosen = {e["name"]: ckpt.tensors[e["name"]] for e in report["tensors"]}
            report["tree"] = ops.module_tree(chosen, depth)
    if json:
        print_json(report)
        return
    if report["inert"]:
        note(f"left inert (not run): {', '.join(report['inert'])}", quiet)
    _print_human(report, tree, stats)


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _print_human(report: dict, tree: bool, stats: bool) -> None:
    from rich.table import Table

    out = console()
    out.print(f"{printable(report['path'])}  format={report['format']}"
                  + (f"  root={report['root']!r}" if report["root"] is not None else ""))
    if report["extras"]:
        out.print(printable("extras: " + ", ".join(f"{k} ({v})" for k, v in report["extras"].items())))
    if report["metadata"]:
        out.print(printable("metadata: " + ", ".join(f"{k}={v}" for k, v in report["metadata"].items())))
    if tree:
        _print_tree(out, report["tree"])
    else:
        table = Table(show_edge=False, pad_edge=False, box=None)
        for column in ("name", "dtype", "shape", "params", "size"):
            table.add_column(column, justify="right" if column in ("params", "size") else "left")
        stat_keys = ("min", "max", "mean", "std", "nan", "inf") if stats else ()
        for column in stat_keys:
            table.add_column(column, justify="right")
        table.add_column("note")
        for t in report["tensors"]:
            notes = []
            if t["shares_with"]:
                notes.append(f"shares {t['shares_with']}")
            if not t["contiguous"]:
                notes.append("non-contiguous view")
            if t["requires_grad"] is False:
                notes.append("frozen")
            params = 1
            for s in t["shape"]:
                params *= s
            table.add_row(printable(t["name"]), t["dtype"], str(tuple(t["shape"])), f"{params:,}", human_bytes(t["nbytes"]),
                          *(_fmt(t[k]) for k in stat_keys), printable(", ".join(notes)))
        out.print(table)
    out.print(f"{len(report['tensors'])} tensors, {report['total_params']:,} parameters, "
                  f"{human_bytes(report['total_bytes'])}")


def _print_tree(out, rows: list[dict]) -> None:
    from rich.text import Text
    from rich.tree import Tree

    top = Tree(Text("(checkpoint)", style="dim"))
    stack = [top]
    for row in rows:
        del stack[row["depth"] + 1 :]
        n = row["repeat"]
        each = f"{n} × " if n > 1 else ""  # a folded row's children describe one member
        label = Text(printable(row["label"]), style="bold")
        label.append(f"  {each}{row['params'] // n:,} params  {each}{human_bytes(row['bytes'] // n)}")
        if "shape" in row:
            label.append(f"  {row['dtype']} {tuple(row['shape'])}", style="dim")
        stack.append(stack[-1].add(label))
    out.print(top)
