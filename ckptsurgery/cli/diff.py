"""ckptsurgery diff: compare two checkpoints; exit 0 same, 1 different, 2 trouble."""

from __future__ import annotations

import sys
from typing import Annotated, Optional

import typer

from .. import ops
from ..errors import UsageError
from .common import JsonOpt, RootOpt, command_app, console, examples, failures_exit, print_json, printable


app = command_app()


@app.command(epilog=examples(
    "ckptsurgery diff model.pth model-bf16.safetensors --rtol 1e-2 --atol 1e-6",
    "ckptsurgery diff base.pth tuned.pth --ignore lm_head --ignore '*.bias'",
    "ckptsurgery diff -q before.pth after.pth || echo changed",
))
def diff(
    a: Annotated[str, typer.Argument(metavar="A", help="First checkpoint.", show_default=False)],
    b: Annotated[str, typer.Argument(metavar="B", help="Second checkpoint.", show_default=False)],
    atol: Annotated[float, typer.Option("--atol", metavar="X", help="Values within this absolute difference count as equal.")] = 0.0,
    rtol: Annotated[float, typer.Option(
        "--rtol", metavar="R", help="Values within R times B's magnitude count as equal: within atol + R·|B|, as "
                                    "torch.isclose (NaN equal to NaN).")] = 0.0,
    ignore: Annotated[Optional[list[str]], typer.Option(
        "--ignore", metavar="PATTERN", help="Compare neither side's keys matching PATTERN (glob, module name, or "
                                            "re:REGEX); repeatable.")] = None,
    root: RootOpt = None,
    json: JsonOpt = False,
    brief: Annotated[bool, typer.Option(
        "-q", "--brief", "--quiet",
        help="One line, 'Files A and B differ', or nothing when they are equal (diff -q).")] = False,
) -> None:
    """Compare two checkpoints (any formats): exit 0 when equal, 1 when they differ, 2 on trouble.

    Trouble is an unreadable file or wrong usage; the codes are those of diff(1) and cmp(1). A tied
    name one side stores once (lm_head.weight saved by save_pretrained) is the same tensor, not a
    difference."""
    with failures_exit(2):
        if brief and json:
            raise UsageError("--brief prints one line and --json the whole report: give one")
        report = ops.diff_checkpoints(a, b, atol=atol, rtol=rtol, ignore=ignore, root=root)
        if json:
            print_json(report.to_json())
        elif brief:
            if not report.identical:
                sys.stdout.write(f"Files {printable(a)} and {printable(b)} differ\n")
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
    # under a tolerance a dtype change alone is shown, not counted: the values decide
    tolerance = [f"{name} {value:g}" for name, value in (("atol", report.atol), ("rtol", report.rtol)) if value]
    differences = table.row_count - len(report.tied) - (len(report.dtype_changed) if tolerance else 0)
    verdict = "identical" if report.identical else "different"
    tol = f" within {', '.join(tolerance)}" if tolerance else " (bit-exact)"
    tied = f", {len(report.tied)} tied name(s) stored on one side only" if report.tied else ""
    ignored = f", {len(report.ignored)} key(s) ignored" if report.ignored else ""
    out.print(f"{verdict}: {report.equal} equal tensor(s){tol}, {differences} difference(s){tied}{ignored}")


def _gap(value: int | float) -> str:
    """Integers exactly (2**53 + 1 is not 9.007e+15); floats to four digits."""
    return str(value) if isinstance(value, int) else f"{value:.4g}"
