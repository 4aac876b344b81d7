"""What every command shares: option aliases, output helpers, the progress bar."""

from __future__ import annotations

import json
import math
import os
import sys
from contextlib import contextmanager
from enum import Enum
from typing import Annotated, Iterator, Optional

import typer

InputArg = Annotated[str, typer.Argument(
    metavar="INPUT", help="Checkpoint: .pth/.pt/.bin/.ckpt, .safetensors, a shard index or its folder.", show_default=False)]
OutputOpt = Annotated[str, typer.Option("-o", "--output", metavar="OUT", help="Output file; its extension picks the format.")]
RootOpt = Annotated[Optional[str], typer.Option(
    "--root", metavar="KEY", help="Key of the state dict inside a nested .pth ('' = top level). Detected by default.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout, nothing else.")]
QuietOpt = Annotated[bool, typer.Option("-q", "--quiet", help="Nothing on stderr but errors.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Overwrite an existing output.")]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Report what would be written; write nothing.")]
JobsOpt = Annotated[Optional[int], typer.Option(
    "--jobs", "-j", metavar="N", min=1, show_default=False,
    help="With --max-shard-size: write N shards at once (default: the measured best, see docs/performance.md).")]
MetadataOpt = Annotated[Optional[list[str]], typer.Option(
    "--metadata", metavar="KEY=VALUE", show_default=False,
    help="Set (or replace) one entry of a .safetensors output's metadata; repeatable. The input's is kept otherwise.")]
MetadataFileOpt = Annotated[Optional[str], typer.Option(
    "--metadata-file", metavar="FILE.json", show_default=False,
    help="Set the entries of this JSON object of strings (applied before --metadata).")]
NoMetadataOpt = Annotated[bool, typer.Option(
    "--no-metadata", help="Keep none of the input's metadata (\"format\": \"pt\" and the tool's tie record are still written).")]


def metadata_args(pairs: list[str] | None, file: str | None) -> dict[str, str] | None:
    """--metadata and --metadata-file as one checked map (None when neither is given)."""
    from ..ops.write import metadata_options

    return metadata_options(pairs, file)


def examples(*commands: str) -> str:
    """The end of a command's --help: two or three real command lines."""
    return "Examples:\n\n" + "\n\n".join(commands)


def choice(name: str, values) -> type[Enum]:
    """A real choice for Typer: a wrong value exits 2, and --help lists the values."""
    return Enum(name, {value: value for value in values}, type=str)


OutputFormat = choice("OutputFormat", ("dcp",))
FormatOpt = Annotated[Optional[OutputFormat], typer.Option(
    "--format", help="dcp: write a torch.distributed.checkpoint folder at OUT (otherwise OUT's extension decides).",
    show_default=False)]


def printable(text: str) -> str:
    """Names come from the file: escape control characters (a key holding an ANSI escape must
    not drive the terminal, nor a newline split a line)."""
    if text.isprintable():  # the common case, checked in C: 100,000 names stay fast
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _finite(value):
    """`value` with every NaN or infinity replaced by the string "nan", "inf" or "-inf"."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _strict_encoder():
    """JSON text of one value, no NaN/Infinity tokens (ValueError instead), non-ASCII as is: the C
    encoder made once, where the stdlib has it — JSONEncoder.encode makes one per call, which
    costs more than the encoding itself for 200 000 small records."""
    try:
        from json.encoder import c_make_encoder, encode_basestring

        iterencode = c_make_encoder(None, None, encode_basestring, None, ": ", ", ", False, False, False)
        return lambda value: "".join(iterencode(value, 0))
    except (ImportError, TypeError):  # no C encoder (another Python): the public route
        return json.JSONEncoder(ensure_ascii=False, allow_nan=False).encode


def print_json(doc: dict) -> None:
    """One strict JSON document (no NaN/Infinity tokens, which jq and most parsers refuse: such
    numbers are written as the strings "nan", "inf", "-inf"); a list of records (tensors, tree
    rows) prints one record per line."""
    strict = _strict_encoder()

    def dump(value) -> str:
        try:
            return strict(value)
        except ValueError:  # a non-finite float somewhere: the rare path
            return strict(_finite(value))

    def document(dump) -> str:
        entries = []
        for key, value in doc.items():
            if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
                body = ",\n".join("    " + dump(v) for v in value)
                entries.append(f"  {dump(key)}: [\n{body}\n  ]")
            else:
                entries.append(f"  {dump(key)}: {dump(value)}")
        return "{\n" + ",\n".join(entries) + "\n}\n"

    text = document(dump)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from a file: escaped, still valid JSON
        text = document(lambda value: json.dumps(_finite(value), allow_nan=False))
    sys.stdout.write(text)


def note(message: str, quiet: bool) -> None:
    """One line for the person at the terminal: stderr, unless --quiet. A newline inside the
    message (from a name in the file) is escaped, never a second line."""
    if not quiet:
        sys.stderr.write(printable(message) + "\n")


def console(stderr: bool = False):
    """A Rich console on stdout (results) or stderr (messages)."""
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    # In a pipe Rich would assume 80 columns and fold the table; results should not be cut.
    width = None if stream.isatty() else int(os.environ.get("COLUMNS", "160"))
    # markup and emoji off: "[bold]x" and "fc:thumbs_up:" are names to show, not styles or emoji
    return Console(file=stream, width=width, highlight=False, markup=False, emoji=False)


def human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


@contextmanager
def progress_bar(quiet: bool) -> Iterator:
    """A factory of progress callbacks, or None where no bar belongs (a pipe, --quiet)."""
    if quiet or not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    columns = (TextColumn("{task.description}", markup=False), BarColumn(), DownloadColumn(), TransferSpeedColumn())
    with Progress(*columns, console=Console(stderr=True, emoji=False), transient=True) as bar:
        def start(total: int, label: str):
            task = bar.add_task(label, total=total)
            return lambda n: bar.advance(task, n)

        yield start


@contextmanager
def failures_exit(code: int) -> Iterator[None]:
    """Any failure inside exits with `code` (diff: 2, so that "different" is never a typo)."""
    try:
        yield
    except Exception as e:
        e.exit_code = code  # read where the app turns failures into exit codes (cli/__init__.py)
        raise


def finish_write(report: dict, as_json: bool, quiet: bool, details: list[str] = ()) -> None:
    """How every writing command ends: the JSON report; or a summary — on stdout for --dry-run
    (it is the result), on stderr otherwise (the file is the result)."""
    if as_json:
        print_json(report)
        return
    verb = "would write" if report["dry_run"] else "wrote"
    # names are escaped before they are joined: each entry of `lines` is exactly one line
    lines = [f"{verb} {', '.join(map(printable, report['files']))}: {report['tensors']} tensors, "
             f"{human_bytes(report['total_bytes'])}", *details]
    if report["tied"]:
        lines.append(f"{len(report['tied'])} tied name(s) stored once: "
                     + ", ".join(f"{printable(a)} = {printable(b)}" for a, b in report["tied"].items()))
    if report.get("kept_dtype"):
        lines.append(listing("kept their dtype (--dtype casts float16/bfloat16/float32/float64 only)",
                             report["kept_dtype"]))
    if report["extras_left_out"]:
        lines.append("left out (safetensors holds tensors only): "
                     + ", ".join(map(printable, report["extras_left_out"])))
    dropped = report.get("metadata_dropped")
    if dropped and report["metadata"] is None:
        lines.append(listing("metadata left out (a .pth or DCP output holds none)", dropped))
    elif dropped:
        from ..core import METADATA_CONTENT_HASHES

        hashes = [k for k in dropped if k in METADATA_CONTENT_HASHES]
        if hashes:
            lines.append(listing("metadata dropped (content hashes, not recomputed for the bytes written)", hashes))
        if len(hashes) < len(dropped):
            lines.append(listing("metadata dropped (--no-metadata)", [k for k in dropped if k not in hashes]))
    if report.get("removed"):
        lines.append(f"{'would remove' if report['dry_run'] else 'removed'} the earlier sharded output: "
                     + ", ".join(map(printable, report["removed"])))
    if report["dry_run"]:
        sys.stdout.write("".join(printable(line) + "\n" for line in lines))
    else:
        for line in lines:
            note(line, quiet)


def listing(label: str, names: list[str], limit: int = 12) -> str:
    """One line naming (escaped) the first `limit` names."""
    shown = ", ".join(map(printable, names[:limit])) + (f" … (+{len(names) - limit})" if len(names) > limit else "")
    return f"{label} ({len(names)}): {shown}" if names else f"{label}: none"
