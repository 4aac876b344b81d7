"""ckptsurgery extract-lora: a PEFT adapter from the difference between two checkpoints."""

from __future__ import annotations

import sys
from typing import Annotated, Optional

from .. import ops
from ..ops.reports import Extracted
from .common import (
    OutputOptions, RootOpt, command_app, listing, note, output_options, print_json, printable,
)
from .declare import Argument, Option


app = command_app()


@app.command("extract-lora")
@output_options(omit=("format", "max_shard_size", "jobs", "no_metadata", "rank_timeout"), output=Annotated[str, Option(
    "-o", "--output", metavar="ADAPTER_DIR", help="Adapter folder to write (adapter_config.json, adapter_model.safetensors).")],
    metadata=Annotated[Optional[list[str]], Option(
        "--metadata", metavar="KEY=VALUE", show_default=False,
        help="Set one entry of adapter_model.safetensors' metadata; repeatable. It inherits none of BASE's or TUNED's.")])
def extract_lora(
    base: Annotated[str, Argument(metavar="BASE", help="The checkpoint before fine-tuning.", show_default=False)],
    tuned: Annotated[str, Argument(metavar="TUNED", help="The fine-tuned checkpoint (same keys and shapes).", show_default=False)],
    rank: Annotated[list[str], Option(
        "--rank", metavar="R|PATTERN=R", help="The LoRA rank; PATTERN=R sets it for the weights a pattern selects (the last that selects a key wins). Repeatable.",
        show_default=False)],
    embeddings: Annotated[bool, Option("--embeddings", help="Also extract embedding tables (peft's lora_embedding_A/B).")] = False,
    fan_in_fan_out: Annotated[Optional[list[str]], Option(
        "--fan-in-fan-out", metavar="PATTERN", help="2-D weights stored (in, out), as transformers' Conv1D stores them (GPT-2: 're:\\.c_(attn|proj|fc)\\.'). Repeatable.",
        show_default=False)] = None,
    root: RootOpt = None,
    *,
    out: OutputOptions,
) -> None:
    """Write a PEFT LoRA adapter that turns BASE into (approximately) TUNED: a truncated SVD of the difference of every 2-D and conv weight.

    Examples:
        ckptsurgery extract-lora base.pth tuned.pth --rank 16 -o adapter
        ckptsurgery extract-lora base tuned --rank 8 --rank '*attn*=32' -o lora
        ckptsurgery extract-lora a.pth b.pth --rank 4 --embeddings -o x --dry-run
    """
    with out.writing(ranks=False) as write:
        report = ops.extract_lora(base, tuned, write, rank=rank, embeddings=embeddings,
                                  fan_in_fan_out=fan_in_fan_out, root=root)
    show(report, out)


def show(report: ops.ExtractReport, out: OutputOptions) -> None:
    """The report as --json, or a summary (on stdout for --dry-run) and the modules' table."""
    json, quiet, dry_run = out.json, out.quiet, out.dry_run
    if json:
        print_json(report.to_json())
        return
    verb = "would write" if dry_run else "wrote"
    extracted = report.extracted
    worst = max((p.error for p in extracted if p.error is not None), default=None)
    rank = f"ranks by energy {report.energy:g}" if report.energy is not None else f"rank {report.rank}"
    lines = [f"{verb} {printable(report.output)}: {len(extracted)} LoRA module(s), {rank}"
             + (f", largest relative error {worst:.3g}" if worst is not None else ""),
             *([listing("not extracted", [f"{n['name']} ({n['reason']})" for n in report.not_extracted])]
               if report.not_extracted else [])]
    if report.needs_force:
        lines.append(listing("would need --force: already there", report.needs_force))
    clamped = [f"{p.name} ({p.requested_rank} -> {p.rank})" for p in extracted if p.clamped]
    if clamped:
        lines.append(listing("rank clamped to the weight's size", clamped))
    for side, keys in (("BASE", report.only_in_base), ("TUNED", report.only_in_tuned)):
        if keys:
            lines.append(listing(f"keys only in {side}", keys))
    if dry_run:  # the report is the result: stdout, as other commands' --dry-run
        sys.stdout.write("".join(printable(line) + "\n" for line in lines))
        return
    for line in lines:
        note(line, quiet)
    if not quiet and extracted:
        _print_table(extracted)


def _print_table(extracted: list[Extracted]) -> None:
    from rich.table import Table

    from .common import console

    table = Table(box=None, show_edge=False, pad_edge=False)
    for column in ("module", "kind", "shape", "rank", "relative error"):
        table.add_column(column)
    for p in extracted:
        table.add_row(printable(p.name), p.kind, "x".join(map(str, p.shape)), str(p.rank),
                      "" if p.error is None else f"{p.error:.3g}")
    console(stderr=True).print(table)
