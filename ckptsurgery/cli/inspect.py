"""ckptsurgery inspect: list a checkpoint's tensors, per-tensor statistics or a module tree."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Annotated, Iterator, Optional

from .. import ops
from ..errors import CkptError, UsageError
from .common import (
    InputOptions, JsonOpt, MAX_ROWS, QuietOpt, command_app, count, dequantized_line, fetched_line,
    hf_names_line, human_bytes, input_options, note, print_json, printable, progress_bar, with_fetched,
)
from .declare import Argument, Option


app = command_app()


@app.command()
@input_options()
def inspect(
    inputs: Annotated[list[str], Argument(
        metavar="INPUT...", help="Checkpoints: .pth/.pt/.bin/.ckpt, .safetensors, a shard index or a Hugging Face "
                                 "folder, a DCP, DeepSpeed (ZeRO) or accelerate folder, a .gguf file, or remote (its "
                                 "headers alone are fetched): an https:// URL of a .safetensors file or index, "
                                 "hf://ORG/REPO[@REV][/FILE]; several give one report each.", show_default=False)],
    keys: Annotated[Optional[list[str]], Option(
        "--keys", metavar="PATTERN", help="Only keys matching PATTERN (glob, module name, or re:REGEX); repeatable.")] = None,
    tree: Annotated[bool, Option("--tree", help="Per-module summary; numbered repeats folded.")] = False,
    depth: Annotated[Optional[int], Option("--depth", min=1, metavar="N", help="Levels shown by --tree.")] = None,
    stats: Annotated[bool, Option("--stats", help="min/max/mean/std and NaN/Inf counts (reads data).")] = False,
    hash: Annotated[bool, Option(
        "--hash", help="SHA-256 of each tensor (its dtype, shape and values: the same in any format) and one fingerprint of them all (reads data).")] = False,
    all_rows: Annotated[bool, Option(
        "--all", help=f"List every tensor in the table (a longer table shows its first {MAX_ROWS:,} rows).")] = False,
    inp: InputOptions = None,
    json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """List a checkpoint's tensors (reads headers only, unless --stats or --hash).

    Several checkpoints are listed one after another, a blank line between (--json takes one).

    Examples:
        ckptsurgery inspect model.pth finetuned.pth --tree --depth 2
        ckptsurgery inspect model.safetensors --keys 'layers.0' --stats
        ckptsurgery inspect hf://org/model --tree --depth 2
    """
    if (stats or hash) and tree and not json:
        raise UsageError(f"--{'stats' if stats else 'hash'} lists tensors and --tree lists modules: give one, "
                         f"or add --json for both")
    if all_rows and (json or tree):
        raise UsageError("--all applies to the table of tensors; --json and --tree always list everything")
    if json and len(inputs) > 1:
        raise UsageError(f"--json prints one document for one input, and {len(inputs)} were given: run inspect "
                         f"--json once per input (for f in ...; do ckptsurgery inspect \"$f\" --json; done)")
    several = len(inputs) > 1
    for i, input in enumerate(inputs):
        read = inp.reading(*inputs, check=not i)  # a fresh record of what this input fetches
        with progress_bar(quiet or json or not (stats or hash)) as progress, _naming(input, several):
            report = ops.inspect_checkpoint(input, keys=keys, stats=stats, tree=tree, depth=depth, hash=hash,
                                            root=inp.root, progress=progress, read=read)
        report = with_fetched(report)
        if json:
            print_json(report.to_json(lazy=True))  # the tensors' records made as they are written
            return
        if report.dequantized is not None:
            note(("" if not several else f"{report.path}: ") + dequantized_line(report.dequantized), quiet)
        if report.hf_names is not None:
            note(("" if not several else f"{report.path}: ") + hf_names_line(report.hf_names), quiet)
        if report.fetched is not None:
            note(("" if not several else f"{report.path}: ") + fetched_line(report.fetched), quiet)
        if report.inert:
            where = f"{report.path}: " if several else ""
            note(f"{where}left inert (not run): {', '.join(map(printable, report.inert))}", quiet)
        if i:
            sys.stdout.write("\n")
        _print_human(report, tree, stats, None if all_rows else MAX_ROWS, hash)
        sys.stdout.flush()  # each report as soon as it is read: a later input may take long, or fail


@contextmanager
def _naming(path: str, several: bool) -> Iterator[None]:
    """With several inputs, a failure names the input it is about (a pattern that selects no key
    in the second file) unless it does already."""
    try:
        yield
    except CkptError as e:
        if not several or isinstance(e, UsageError) or path in str(e):
            raise
        raise type(e)(f"{path}: {e}") from None


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


_STAT_KEYS = ("min", "max", "mean", "std", "nan", "inf")
_SHOWN_ITEMS, _SHOWN_CHARS = 5, 200  # a metadata value's items and characters shown (GGUF's vocabulary: all in --json)


def _shown(value) -> str:
    """A metadata value as the table's header line shows it: a long array (GGUF's vocabulary) as its
    length and first items, a long text cut."""
    if isinstance(value, list):
        if len(value) > _SHOWN_ITEMS:
            head = ", ".join(_shown(v) if isinstance(v, list) else repr(v)[:40] for v in value[:_SHOWN_ITEMS])
            return f"[{len(value):,} values: {head}, …]"
        return "[" + ", ".join(_shown(v) if isinstance(v, list) else repr(v)[:40] for v in value) + "]"
    text = str(value)
    return text if len(text) <= _SHOWN_CHARS else f"{text[:_SHOWN_CHARS]}… ({len(text):,} characters)"


def _print_human(report: ops.InspectReport, tree: bool, stats: bool, max_rows: int | None, hashes: bool = False) -> None:
    # Plain lines, not Rich: a Rich table costs ~1 ms a row (100,000 tensors would take
    # minutes), folds long names to the width of a pipe and would turn ":name:" into emoji.
    lines = [f"{printable(report.path)}  format={report.format}"
             + (f"  root={printable(repr(report.root))}" if report.root is not None else "")]
    if report.extras:
        lines.append(printable("extras: " + ", ".join(f"{k} ({v})" for k, v in report.extras.items())))
    if report.non_tensors:
        entries = ", ".join(f"{k} ({v})" for k, v in report.non_tensors.items())
        lines.append(printable(f"non-tensor entries: {entries}"))
    if report.metadata:
        lines.append(printable("metadata: " + ", ".join(f"{k}={_shown(v)}" for k, v in report.metadata.items())))
    tensors = report.tensors
    if tree:
        lines += _tree_lines(report.tree)
    elif max_rows is not None and len(tensors) > max_rows:
        lines += _table_lines(tensors[:max_rows], stats, hashes)
        lines.append(f"... {len(tensors) - max_rows:,} more tensors not listed: narrow with --keys, "
                     f"list them all with --all, or read them with --json")
    else:
        lines += _table_lines(tensors, stats, hashes)
    lines.append(f"{count(len(report.tensors), 'tensor')}, {report.total_params:,} "
                 f"parameter{'' if report.total_params == 1 else 's'}, "
                 f"{human_bytes(report.total_bytes)}")
    if report.trainable_params is not None:  # a whole pickled model: its parameters record requires_grad
        lines.append(f"{report.trainable_params:,} trainable, {report.frozen_params:,} frozen parameters")
    if report.fingerprint is not None:
        lines.append(f"fingerprint {report.fingerprint}")
    sys.stdout.write("\n".join(lines) + "\n")


def _width(text: str) -> int:
    """Terminal cells: a CJK character takes two, a combining accent none."""
    if text.isascii():
        return len(text)
    from rich.cells import cell_len

    return cell_len(text)


def _table_lines(tensors: list[dict], stats: bool, hashes: bool = False) -> list[str]:
    """Aligned columns two spaces apart, numbers right-justified, no trailing blanks."""
    stat_keys = _STAT_KEYS if stats else ()
    hash_column = ("sha256",) if hashes else ()
    header = ("name", "dtype", "shape", "params", "size", *stat_keys, *hash_column, "note")
    right = [h in ("params", "size", *stat_keys) for h in header]
    rows = [header]
    for t in tensors:
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
        rows.append((printable(t["name"]), t["dtype"], str(tuple(t["shape"])), f"{params:,}",
                     human_bytes(t["nbytes"]), *(_fmt(t[k]) for k in stat_keys),
                     *((t["sha256"],) if hashes else ()), printable(", ".join(notes))))
    widths = [max(map(_width, column)) for column in zip(*rows)]
    lines = []
    for row in rows:
        cells = []
        for cell, width, is_right in zip(row, widths, right):
            pad = " " * (width - _width(cell))
            cells.append(pad + cell if is_right else cell + pad)
        lines.append("  ".join(cells).rstrip())
    return lines


_DRAWN_LEVELS = 32  # tree guides drawn this deep; deeper rows name their level (lines stay short)


def _tree_lines(rows: list[dict]) -> list[str]:
    """The tree with guides as Rich draws them, built without recursion (names may nest
    thousands of levels)."""
    last = [False] * len(rows)  # no later sibling: the row gets "└── " and its children no "│"
    sibling_below: list[bool] = []  # per depth, scanning upwards: a sibling was seen further down
    for i in range(len(rows) - 1, -1, -1):
        d = rows[i]["depth"]
        del sibling_below[d + 1 :]
        sibling_below.extend([False] * (d + 1 - len(sibling_below)))
        last[i] = not sibling_below[d]
        sibling_below[d] = True
    lines = ["(checkpoint)"]
    guides = [""]  # guides[d]: what is drawn left of a row at depth d
    for row, is_last in zip(rows, last):
        d = row["depth"]
        level = ""
        if d < _DRAWN_LEVELS:
            del guides[d + 1 :]
            guides.append(guides[d] + ("    " if is_last else "│   "))
        else:
            level = f"(level {d + 1}) "
        n = row["repeat"]
        each = f"{n} × " if n > 1 else ""  # a folded row's children describe one member
        line = (f"{guides[min(d, _DRAWN_LEVELS)]}{'└── ' if is_last else '├── '}{level}{printable(row['label'])}"
                f"  {each}{row['params'] // n:,} params  {each}{human_bytes(row['bytes'] // n)}")
        if "shape" in row:
            line += f"  {row['dtype']} {tuple(row['shape'])}"
        if row.get("frozen"):
            line += "  frozen"
        lines.append(line)
    return lines
