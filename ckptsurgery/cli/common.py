"""What every command shares: option aliases, output helpers, the progress bar."""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from typing import Annotated, Iterator, Optional

import typer

OutputOpt = Annotated[str, typer.Option("-o", "--output", help="Output file; its extension picks the format.")]
RootOpt = Annotated[Optional[str], typer.Option(
    "--root", help="Key of the state dict inside a nested .pth ('' = top level). Detected by default.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout, nothing else.")]
QuietOpt = Annotated[bool, typer.Option("-q", "--quiet", help="Nothing on stderr but errors.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Overwrite an existing output.")]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Report what would be written; write nothing.")]


def print_json(doc: dict) -> None:
    """One JSON document; a list of records (tensors, tree rows) prints one record per line."""
    def dump(value) -> str:
        return json.dumps(value, ensure_ascii=False)

    entries = []
    for key, value in doc.items():
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            body = ",\n".join("    " + dump(v) for v in value)
            entries.append(f"  {dump(key)}: [\n{body}\n  ]")
        else:
            entries.append(f"  {dump(key)}: {dump(value)}")
    sys.stdout.write("{\n" + ",\n".join(entries) + "\n}\n")


def note(message: str, quiet: bool) -> None:
    """A message for the person at the terminal: stderr, unless --quiet."""
    if not quiet:
        sys.stderr.write(message + "\n")


def stdout_console():
    from rich.console import Console

    # In a pipe Rich would assume 80 columns and fold the table; results should not be cut.
    width = None if sys.stdout.isatty() else int(os.environ.get("COLUMNS", "160"))
    return Console(width=width, highlight=False)


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

    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        def start(total: int, label: str):
            task = bar.add_task(label, total=total)
            return lambda n: bar.advance(task, n)

        yield start
