"""ckptsurgery diff: compare two checkpoints; exit 0 same, 1 different, 2 trouble."""

from __future__ import annotations

import math
import sys
from typing import Annotated, Optional

from .. import ops
from ..errors import UsageError
from .common import (
    InputOptions, JsonOpt, command_app, console, failures_exit, input_options, print_json, printable,
    with_fetched,
)
from .declare import Argument, Option


app = command_app()


@app.command()
@input_options()
def diff(
    a: Annotated[str, Argument(metavar="A", help="First checkpoint.", show_default=False)],
    b: Annotated[str, Argument(metavar="B", help="Second checkpoint.", show_default=False)],
    atol: Annotated[float, Option("--atol", metavar="X", help="Values within this absolute difference count as equal.")] = 0.0,
    rtol: Annotated[float, Option(
        "--rtol", metavar="R", help="Values within R times B's magnitude count as equal: within atol + R·|B|, as "
                                    "torch.isclose (NaN equal to NaN).")] = 0.0,
    ignore: Annotated[Optional[list[str]], Option(
        "--ignore", metavar="PATTERN", help="Compare neither side's keys matching PATTERN (glob, module name, or "
                                            "re:REGEX); repeatable.")] = None,
    inp: InputOptions = None,
    json: JsonOpt = False,
    brief: Annotated[bool, Option(
        "-q", "--brief", "--quiet",
        help="One line, 'Files A and B differ', or nothing when they are equal (diff -q).")] = False,
    by_layer: Annotated[bool, Option(
        "--by-layer", help="Also chart, per layer, the relative change ‖B−A‖/‖A‖ of the floating tensors (the "
                           "numbers in --json); the exit code is the plain diff's.")] = False,
    base: Annotated[Optional[str], Option(
        "--base", metavar="BASE", help="With --by-layer: chart A's and B's task vectors from BASE per layer "
                                       "(‖A−BASE‖, ‖B−BASE‖ over ‖BASE‖) and the cosine between them.",
        show_default=False)] = None,
    layer_pattern: Annotated[Optional[str], Option(
        "--layer-pattern", metavar="REGEX", help="With --by-layer: the layer number is REGEX's one group "
                                                 "(e.g. 'model\\.layers\\.(\\d+)\\.'), for a model whose layers "
                                                 "the key names leave ambiguous.", show_default=False)] = None,
) -> None:
    """Compare two checkpoints (any formats): exit 0 when equal, 1 when they differ, 2 on trouble.

    Trouble is an unreadable file or wrong usage; the codes are those of diff(1) and cmp(1). A tied
    name one side stores once (lm_head.weight saved by save_pretrained) is the same tensor, not a
    difference.

    Examples:
        ckptsurgery diff model.pth model-bf16.safetensors --rtol 1e-2 --atol 1e-6
        ckptsurgery diff -q before.pth after.pth || echo changed
        ckptsurgery diff ft-a/ ft-b/ --by-layer --base base/
    """
    with failures_exit(2):
        if brief and json:
            raise UsageError("--brief prints one line and --json the whole report: give one")
        if brief and by_layer:
            raise UsageError("--brief prints one line and --by-layer a chart: give one")
        read = inp.reading(a, b, base)
        report = with_fetched(ops.diff_checkpoints(a, b, atol=atol, rtol=rtol, ignore=ignore, root=inp.root,
                                                   by_layer=by_layer, base=base, layer_pattern=layer_pattern,
                                                   read=read))
        if json:
            print_json(report.to_json())
        elif brief:
            if not report.identical:
                sys.stdout.write(f"Files {printable(a)} and {printable(b)} differ\n")
        else:
            _print_diff(report)
    if not report.identical:
        raise SystemExit(1)


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
    for c in report.value_changed if report.layers is None else ():  # --by-layer: the chart shows them
        table.add_row(printable(c["name"]), f"values (max |A-B| {_gap(c['max_abs_diff'])})", "", "")
    for c in report.tied:  # the same tensor under a name one side stores once: shown, not counted
        other = "B" if c["side"] == "a" else "A"
        table.add_row(printable(c["name"]), f"tied: {other} holds it as {printable(c['tied_to'])}", "", "")
    if table.row_count:
        out.print(table)
    if report.layers is not None:
        _print_layers(out, report)
    # under a tolerance a dtype change alone is shown, not counted: the values decide
    tolerance = [f"{name} {value:g}" for name, value in (("atol", report.atol), ("rtol", report.rtol)) if value]
    differences = (table.row_count + (len(report.value_changed) if report.layers is not None else 0)
                   - len(report.tied) - (len(report.dtype_changed) if tolerance else 0))
    verdict = "identical" if report.identical else "different"
    tol = f" within {', '.join(tolerance)}" if tolerance else " (bit-exact)"
    tied = f", {len(report.tied)} tied name(s) stored on one side only" if report.tied else ""
    ignored = f", {len(report.ignored)} key(s) ignored" if report.ignored else ""
    out.print(f"{verdict}: {report.equal} equal tensor(s){tol}, {differences} difference(s){tied}{ignored}")


def _gap(value: int | float) -> str:
    """Integers exactly (2**53 + 1 is not 9.007e+15); floats to four digits."""
    return str(value) if isinstance(value, int) else f"{value:.4g}"


# ---- --by-layer: a bar per layer ----------------------------------------------------------------

_EIGHTHS = " ▏▎▍▌▋▊▉"  # a bar's last cell, in eighths
_WIDEST = 120  # the chart's columns at most (and at least 60): the bars take what the numbers leave


def _print_layers(out, report: ops.DiffReport) -> None:
    """The rows of `report.layers` as a bar chart, the bars scaled to the largest value: without
    --base one bar per layer, ‖B−A‖/‖A‖; with --base two, A's and B's task vectors over ‖BASE‖,
    beside their cosine. Colours only on a terminal (Rich leaves them out in a pipe and under
    NO_COLOR); the characters are the same everywhere. 60 to 120 columns: the bars take what
    the numbers leave."""
    from rich.text import Text

    rows, with_base = report.layers, report.base is not None
    labels = [str(r["layer"]) if r["layer"] is not None else "outside" for r in rows]
    label = max(5, *map(len, labels))
    lead = label + 2 + max(7, *(len(str(r["tensors"])) for r in rows))  # the layer and tensors columns
    if with_base:
        series, column = [("A", "a_relative", "cyan"), ("B", "b_relative", "magenta")], "‖Δ‖/‖BASE‖"
        heading = f"{'layer':>{label}}  {'tensors':>{lead - label - 2}}  {'cosine':>6}     {column}"
    else:
        series, column = [("", "relative", "green")], "‖B−A‖/‖A‖"
        heading = f"{'layer':>{label}}  {'tensors':>{lead - label - 2}}  {column}"
    values = [r[key] for r in rows for _, key, _ in series]
    largest = max((v for v in values if v is not None and math.isfinite(v)), default=0.0)
    bars = max(min(max(out.width, 60), _WIDEST) - len(heading) - 2, 8)
    layers = sum(1 for r in rows if r["layer"] is not None)
    what = "task vectors" if with_base else "relative change"
    where = f"per layer, {layers} layer(s) of {printable(report.layer_container)}" if layers else "(no layers)"
    out.print(Text(f"{what} {where}:"))
    out.print(Text(heading))
    for name, r in zip(labels, rows):
        for i, (model, key, colour) in enumerate(series):
            start = f"{name:>{label}}  {r['tensors']:>{lead - label - 2}}" if i == 0 else " " * lead
            if with_base:
                start += f"  {_cosine(r['cosine']) if i == 0 else '':>6}  {model}"
            line = Text(f"{start}  {_number(r[key]):>{len(column)}}  ")
            line.append(_bar(r[key], largest, bars), style=colour)
            line.rstrip()
            out.print(line)
    if report.left_out:
        out.print(Text(f"{len(report.left_out)} tensor(s) left out of the norms (on one side only, another shape or "
                       f"dtype{', not in BASE' if with_base else ''}): --json lists them under left_out"))


def _bar(value: float | None, largest: float, width: int) -> str:
    if value is None or not math.isfinite(value) or largest <= 0:
        return ""
    eighths = round(value / largest * width * 8)
    return "█" * (eighths // 8) + (_EIGHTHS[eighths % 8] if eighths % 8 else "")


def _number(value: float | None) -> str:
    return "—" if value is None else f"{value:.3g}"


def _cosine(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"
