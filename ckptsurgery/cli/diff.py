"""ckptsurgery diff: compare two checkpoints; exit 0 same, 1 different, 2 trouble."""

from __future__ import annotations

from typing import Annotated

import typer

from .. import ops
from . import app
from .common import JsonOpt, QuietOpt, RootOpt, console, examples, failures_exit, print_json, printable


@app.command(epilog=examples(
    "ckptsurgery diff model.pth model.safetensors",
    "ckptsurgery diff model.pth model-bf16.safetensors --atol 0.01",
    "ckptsurgery diff before.pth after.pth --json > changes.json || echo changed",
))
def diff(
    a: Annotated[str, typer.Argument(metavar="A", help="First checkpoint.", show_default=False)],
    b: Annotated[str, typer.Argument(metavar="B", help="Second checkpoint.", show_default=False)],
    atol: Annotated[float, typer.Option("--atol", metavar="X", help="Values within this absolute difference count as equal.")] = 0.0,
    root: RootOpt = None,
    json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Compare two checkpoints (any formats). Exit 0 when equal, 1 when they differ, 2 on
    trouble (an unreadable file, wrong usage), as diff(1) and cmp(1) do. A tied name one side
    stores once (lm_head.weight saved by save_pretrained) is the same tensor, not a difference."""
    with failures_exit(2):
        report = ops.diff_checkpoints(a, b, atol=atol, root=root)
        if json:
            print_json(report.to_json())
        else:
            _print_diff(report)
    if not report.identical:
        raise typer.Exit(1)


def _print_diff(report: ops.DiffReport) -> None:
    from rich.table import Table

    out = console()
    table = Table(box=None, show_edge=False, pad_edge=False)
    for column in ("key", "change", "A", "B"):
        table.add_column(column)
    for name in report.only_in_a:
        table.add_row(printable(name), "only in A", "", "")
    for name in report.only_in_b:
        table.add_row(printable(name), "only in B", "", "")
    for c in report.shape_changed:
        table.add_row(printable(c["name"]), "shape", str(c["a"]), str(c["b"]))
    for c in report.dtype_changed:
        within = f" (max |A-B| {_gap(c['max_abs_diff'])})" if "max_abs_diff" in c else ""
        table.add_row(printable(c["name"]), "dtype" + within, c["a"], c["b"])
    for c in report.value_changed:
        table.add_row(printable(c["name"]), f"values (max |A-B| {_gap(c['max_abs_diff'])})", "", "")
    for c in report.tied:  # the same tensor under a name one side stores once: shown, not counted
        other = "B" if c["side"] == "a" else "A"
        table.add_row(printable(c["name"]), f"tied: {other} holds it as {printable(c['tied_to'])}", "", "")
    if table.row_count:
        out.print(table)
    # under --atol a dtype change alone is shown, not counted: the values decide
    differences = table.row_count - len(report.tied) - (len(report.dtype_changed) if report.atol else 0)
    verdict = "identical" if report.identical else "different"
    tol = f" within atol {report.atol:g}" if report.atol else " (bit-exact)"
    tied = f", {len(report.tied)} tied name(s) stored on one side only" if report.tied else ""
    out.print(f"{verdict}: {report.equal} equal tensor(s){tol}, {differences} difference(s){tied}")


def _gap(value: int | float) -> str:
    """Integers exactly (2**53 + 1 is not 9.007e+15); floats to four digits."""
    return str(value) if isinstance(value, int) else f"{value:.4g}"
