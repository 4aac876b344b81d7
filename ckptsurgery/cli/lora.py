"""ckptsurgery lora: LoRA adapters without the model's code — fold one into its base, extract one,
merge several into one, resize one, convert one between the PEFT and kohya formats."""

from __future__ import annotations

import math
import sys
from typing import Annotated, Optional

import typer

from .. import ops
from ..errors import UsageError
from ..ops.reports import LoraModule
from .common import (
    CastTo, DequantizeOpt, OutputOptions, RootOpt, choice, command_group, count, examples, listing, note, output_options,
    print_json, print_table, printable,
)

app = command_group("lora", "LoRA adapters: fold into a base, extract, merge several into one, resize, convert "
                            "between PEFT and kohya.")

# what does not apply to an adapter output (a folder, or one .safetensors file)
ADAPTER_OMIT = ("format", "max_shard_size", "jobs", "no_metadata", "rank_timeout")
ADAPTER_METADATA = Annotated[Optional[list[str]], typer.Option(
    "--metadata", metavar="KEY=VALUE", show_default=False,
    help="Set one entry of the adapter file's metadata; repeatable. It inherits none of its inputs'.")]


def _adapter_output(metavar: str, what: str):
    return output_options(omit=ADAPTER_OMIT, metadata=ADAPTER_METADATA, output=Annotated[str, typer.Option(
        "-o", "--output", metavar=metavar, help=what)])


Combine = choice("Combine", ("cat", "svd"))
To = choice("To", ("peft", "kohya"))
EnergyOpt = Annotated[Optional[float], typer.Option(
    "--energy", metavar="E", show_default=False,
    help="Instead of --rank: per module the smallest rank whose squared singular values reach E (0 < E ≤ 1) of ΔW's.")]


@app.command("fold", epilog=examples(
    "ckptsurgery lora fold base.safetensors adapter -o merged.safetensors",
    "ckptsurgery lora fold sd.safetensors style.safetensors detail --scale 0.8 --scale 0.5 -o out.safetensors",
))
@output_options()
def fold(
    base: Annotated[str, typer.Argument(metavar="BASE", help="The checkpoint the adapters were trained on.", show_default=False)],
    adapters: Annotated[list[str], typer.Argument(metavar="ADAPTER...", help="PEFT adapter folders, kohya/LyCORIS or diffusers .safetensors files, folded in order.", show_default=False)],
    scale: Annotated[Optional[list[float]], typer.Option(
        "--scale", metavar="S", show_default=False, help="Multiplies alpha/r (default 1); once for all, or once per ADAPTER in order.")] = None,
    allow_unmatched: Annotated[bool, typer.Option("--allow-unmatched", help="Fold what matches, list LoRA weights matching no base weight.")] = False,
    dtype: Annotated[Optional[CastTo], typer.Option("--dtype", help="Cast the floating tensors written (default: as the base).", show_default=False)] = None,
    root: RootOpt = None,
    dequantize: DequantizeOpt = False,
    *,
    out: OutputOptions,
) -> None:
    """Fold adapters into their base: W + S·(α/r)·B·A per LoRA weight, each other kind by its rule (merge BASE --lora ADAPTER)."""
    if not all(math.isfinite(s) for s in scale or []):
        raise UsageError("--scale must be a finite number")
    if scale and len(scale) not in (1, len(adapters)):  # checked here: fold_adapters would name --lora-scale
        raise UsageError(f"--scale given {len(scale)} times for {count(len(adapters), 'ADAPTER')}: give it once (for "
                         f"all) or once per ADAPTER, in the same order")
    with out.writing() as write:
        report = ops.fold_adapters(base, adapters, write, scales=scale, allow_unmatched=allow_unmatched,
                                   dtype=dtype and dtype.value, root=root, dequantize=dequantize)
    details = [f"folded {count(len(report.adapters), 'adapter')} into {count(report.folded, 'tensor')}: "
               + "; ".join(f"{printable(a.path)} ({a.format}, scale {a.scale:g}, {a.folded} weights)"
                           for a in report.adapters)]
    if report.unmatched:
        details.append(listing("LoRA weights matching no base weight (left out)", report.unmatched))
    out.finish(report, details)


@app.command("extract", epilog=examples(
    "ckptsurgery lora extract base.safetensors tuned.safetensors --rank 16 -o adapter",
    "ckptsurgery lora extract base tuned --energy 0.9 -o adapter",
))
@_adapter_output("ADAPTER_DIR", "Adapter folder to write (adapter_config.json, adapter_model.safetensors).")
def extract(
    base: Annotated[str, typer.Argument(metavar="BASE", help="The checkpoint before fine-tuning.", show_default=False)],
    tuned: Annotated[str, typer.Argument(metavar="TUNED", help="The fine-tuned checkpoint (same keys and shapes).", show_default=False)],
    rank: Annotated[Optional[list[str]], typer.Option(
        "--rank", metavar="R|PATTERN=R", show_default=False,
        help="The LoRA rank; PATTERN=R sets it for the weights a pattern selects (the last that selects a key wins). Repeatable.")] = None,
    energy: EnergyOpt = None,
    embeddings: Annotated[bool, typer.Option("--embeddings", help="Also extract embedding tables (peft's lora_embedding_A/B).")] = False,
    fan_in_fan_out: Annotated[Optional[list[str]], typer.Option(
        "--fan-in-fan-out", metavar="PATTERN", show_default=False,
        help="2-D weights stored (in, out), as transformers' Conv1D stores them. Repeatable.")] = None,
    root: RootOpt = None,
    *,
    out: OutputOptions,
) -> None:
    """Extract a PEFT LoRA adapter that turns BASE into (approximately) TUNED: a truncated SVD of each weight's difference (extract-lora, and --energy)."""
    from .extract_lora import show

    if rank is None and energy is None:
        raise UsageError("give --rank R (or PATTERN=R) or --energy E")
    with out.writing(ranks=False) as write:
        report = ops.extract_lora(base, tuned, write, rank=rank, energy=energy, embeddings=embeddings,
                                  fan_in_fan_out=fan_in_fan_out, root=root)
    show(report, out)


@app.command("merge", epilog=examples(
    "ckptsurgery lora merge style detail --combine cat -o both",
    "ckptsurgery lora merge a b c --weights 1,0.5,0.5 --combine svd --rank 16 -o abc",
))
@_adapter_output("OUT", "Adapter to write: a folder (PEFT inputs) or a .safetensors file (kohya inputs).")
def merge(
    adapters: Annotated[list[str], typer.Argument(metavar="ADAPTER...", help="Two or more adapters of one model, all PEFT folders or all kohya files.", show_default=False)],
    combine: Annotated[Combine, typer.Option(
        "--combine", help="cat: exact, the factors side by side (rank Σ r); svd: the best rank-R approximation of Σ w·ΔW per module.",
        show_default=False)],
    weights: Annotated[Optional[str], typer.Option(
        "--weights", metavar="W,W,..", show_default=False, help="One weight per ADAPTER (default 1 each): the fold is Σ w·ΔW.")] = None,
    rank: Annotated[Optional[int], typer.Option(
        "--rank", metavar="R", show_default=False, help="With svd: the rank (default: the largest of the adapters').")] = None,
    *,
    out: OutputOptions,
) -> None:
    """Merge LoRA adapters into one whose fold is Σ wᵢ·ΔWᵢ: exactly (cat) or at rank R (svd), as peft's add_weighted_adapter."""
    with out.writing(ranks=False) as write:
        report = ops.merge_adapters(adapters, write, weights=_numbers(weights), combine=combine.value, rank=rank)
    how = f"combine {report.combine}" + (f", rank {report.rank}" if report.rank is not None else "")
    _show(report, out, f"{count(len(report.adapters), 'adapter')} merged ({how})", "ranks in")


@app.command("resize", epilog=examples(
    "ckptsurgery lora resize adapter --rank 4 -o adapter-r4",
    "ckptsurgery lora resize style.safetensors --energy 0.95 -o style-small.safetensors",
))
@_adapter_output("OUT", "Adapter to write, in the input's format: a folder (PEFT) or a .safetensors file (kohya).")
def resize(
    adapter: Annotated[str, typer.Argument(metavar="ADAPTER", help="A PEFT adapter folder or a kohya .safetensors file.", show_default=False)],
    rank: Annotated[Optional[int], typer.Option(
        "--rank", metavar="R", show_default=False, help="The new rank of every module (one of a smaller rank keeps its own).")] = None,
    energy: EnergyOpt = None,
    *,
    out: OutputOptions,
) -> None:
    """Resize a LoRA adapter: each module's best approximation at the new rank, its scale kept (alpha = scale·rank)."""
    with out.writing(ranks=False) as write:
        report = ops.resize_adapter(adapter, write, rank=rank, energy=energy)
    how = f"rank {report.rank}" if report.rank is not None else f"energy {report.energy:g}"
    _show(report, out, f"resized to {how}", "old rank")


@app.command("convert", epilog=examples(
    "ckptsurgery lora convert adapter --to kohya -o adapter.safetensors",
    "ckptsurgery lora convert style.safetensors --to peft --base sd.safetensors -o style",
))
@_adapter_output("OUT", "Adapter to write: a folder (--to peft) or a .safetensors file (--to kohya).")
def convert(
    adapter: Annotated[str, typer.Argument(metavar="ADAPTER", help="A PEFT adapter folder or a kohya .safetensors file.", show_default=False)],
    to: Annotated[To, typer.Option("--to", help="The format to write.", show_default=False)],
    base: Annotated[Optional[str], typer.Option(
        "--base", metavar="BASE", show_default=False,
        help="The checkpoint the adapter folds into: names kohya's modules in peft's dotted form (needed by --to peft), and checks --to kohya's names.")] = None,
    root: RootOpt = None,
    *,
    out: OutputOptions,
) -> None:
    """Convert a LoRA adapter between a PEFT folder and a kohya .safetensors file (the factors as they are)."""
    with out.writing(ranks=False) as write:
        report = ops.convert_adapter(adapter, write, to=to.value, base=base, root=root)
    if out.json:
        print_json(report.to_json())
        return
    verb = "would write" if out.dry_run else "wrote"
    lines = [f"{verb} {printable(report.output)}: {count(len(report.names), 'module')}, "
             f"{report.source_format} -> {report.format}"]
    if report.needs_force:
        lines.append(listing("would need --force: already there", report.needs_force))
    _print_lines(lines, out)
    if not out.quiet:
        print_table(("module", "as"), [(printable(a), printable(b)) for a, b in report.names.items()],
                    not out.dry_run, "modules")


def _numbers(text: str | None) -> list[float] | None:
    """--weights 1,0.5: the numbers of a comma-separated list."""
    if text is None:
        return None
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise UsageError(f"--weights {text!r}: expected numbers separated by commas (1,0.5)") from None


def _print_lines(lines: list[str], out: OutputOptions) -> None:
    if out.dry_run:  # the report is the result: stdout, as other commands' --dry-run
        sys.stdout.write("".join(printable(line) + "\n" for line in lines))
    else:
        for line in lines:
            note(line, out.quiet)


def _show(report, out: OutputOptions, done: str, ranks: str) -> None:
    """A merge's or resize's report: --json, or a summary and one row per module."""
    if out.json:
        print_json(report.to_json())
        return
    modules: list[LoraModule] = report.modules
    worst = max((m.error for m in modules), default=0.0)
    lines = [f"{'would write' if out.dry_run else 'wrote'} {printable(report.output)}: "
             f"{count(len(modules), 'module')}, {done}, largest relative error {worst:.3g}"]
    if report.needs_force:
        lines.append(listing("would need --force: already there", report.needs_force))
    _print_lines(lines, out)
    if not out.quiet:
        rows = [(printable(m.name), m.kind, "x".join(map(str, m.shape)), ",".join(map(str, m.ranks)), str(m.rank),
                 f"{m.alpha:g}", f"{m.error:.3g}") for m in modules]
        print_table(("module", "kind", "shape", ranks, "rank", "alpha", "relative error"), rows, not out.dry_run,
                    "modules")
