"""ckptsurgery lora: LoRA adapters without the model's code — fold one into its base, extract one,
merge several into one, resize one, convert one between the PEFT and kohya formats."""

from __future__ import annotations

import math
import sys
from typing import Annotated, Optional

from .. import ops
from ..errors import UsageError
from ..ops.reports import LoraMergeReport, LoraModule, LoraReport, LoraResizeReport
from .common import (
    CastTo, InputOptions, OutputOptions, RootOpt, choice, command_group, count, listing, note, output_options,
    input_options, print_json, print_table, printable,
)
from .declare import Argument, Option

app = command_group("lora", "LoRA adapters: fold into a base, extract, merge several into one, resize, convert "
                            "between PEFT and kohya.")

# what does not apply to an adapter output (a folder, or one .safetensors file)
ADAPTER_OMIT = ("format", "max_shard_size", "jobs", "no_metadata", "rank_timeout")
ADAPTER_METADATA = Annotated[Optional[list[str]], Option(
    "--metadata", metavar="KEY=VALUE", show_default=False,
    help="Set one entry of the adapter file's metadata; repeatable. It inherits none of its inputs'.")]


AdapterArg = Annotated[str, Argument(
    metavar="ADAPTER", help="A PEFT adapter folder or a kohya .safetensors file.", show_default=False)]


def _adapter_command(name: str, metavar: str, what: str):
    """A subcommand that writes an adapter, named by -o (`metavar`, `what`), with the output options
    that apply to one."""
    output = output_options(omit=ADAPTER_OMIT, metadata=ADAPTER_METADATA, output=Annotated[str, Option(
        "-o", "--output", metavar=metavar, help=what)])
    return lambda command: app.command(name)(output(command))


Combine = choice("Combine", ("cat", "svd"))
To = choice("To", ("peft", "kohya"))
EnergyOpt = Annotated[Optional[float], Option(
    "--energy", metavar="E", show_default=False,
    help="Instead of --rank: per module the smallest rank whose squared singular values reach E (0 < E ≤ 1) of ΔW's.")]


@app.command("fold")
@output_options()
@input_options()
def fold(
    base: Annotated[str, Argument(metavar="BASE", help="The checkpoint the adapters were trained on.", show_default=False)],
    adapters: Annotated[list[str], Argument(metavar="ADAPTER...", help="PEFT adapter folders, kohya/LyCORIS or diffusers .safetensors files, folded in order.", show_default=False)],
    scale: Annotated[Optional[list[float]], Option(
        "--scale", metavar="S", show_default=False, help="Multiplies alpha/r (default 1); once for all, or once per ADAPTER in order.")] = None,
    allow_unmatched: Annotated[bool, Option("--allow-unmatched", help="Fold what matches, list LoRA weights matching no base weight.")] = False,
    dtype: Annotated[Optional[CastTo], Option("--dtype", help="Cast the floating tensors written (default: as the base).", show_default=False)] = None,
    inp: InputOptions = None,
    *,
    out: OutputOptions,
) -> None:
    """Fold adapters into their base: W + S·(α/r)·B·A per LoRA weight, each other kind by its rule (merge BASE --lora ADAPTER).

    Examples:
        ckptsurgery lora fold base.safetensors adapter -o merged.safetensors
        ckptsurgery lora fold sd.safetensors style.safetensors detail --scale 0.8 --scale 0.5 -o out.safetensors
    """
    if not all(math.isfinite(s) for s in scale or []):
        raise UsageError("--scale must be a finite number")
    if scale and len(scale) not in (1, len(adapters)):  # checked here: fold_adapters would name --lora-scale
        raise UsageError(f"--scale given {len(scale)} times for {count(len(adapters), 'ADAPTER')}: give it once (for "
                         f"all) or once per ADAPTER, in the same order")
    read = inp.reading(base)
    with out.writing() as write:
        report = ops.fold_adapters(base, adapters, write, scales=scale, allow_unmatched=allow_unmatched,
                                   dtype=dtype and dtype.value, root=inp.root, read=read)
    details = [f"folded {count(len(report.adapters), 'adapter')} into {count(report.folded, 'tensor')}: "
               + "; ".join(f"{printable(a.path)} ({a.format}, scale {a.scale:g}, {a.folded} weights)"
                           for a in report.adapters)]
    if report.unmatched:
        details.append(listing("LoRA weights matching no base weight (left out)", report.unmatched))
    out.finish(report, details)


@_adapter_command("extract", "ADAPTER_DIR",
                  "Adapter folder to write (adapter_config.json, adapter_model.safetensors).")
def extract(
    base: Annotated[str, Argument(metavar="BASE", help="The checkpoint before fine-tuning.", show_default=False)],
    tuned: Annotated[str, Argument(metavar="TUNED", help="The fine-tuned checkpoint (same keys and shapes).", show_default=False)],
    rank: Annotated[Optional[list[str]], Option(
        "--rank", metavar="R|PATTERN=R", show_default=False,
        help="The LoRA rank; PATTERN=R sets it for the weights a pattern selects (the last that selects a key wins). Repeatable.")] = None,
    energy: EnergyOpt = None,
    embeddings: Annotated[bool, Option("--embeddings", help="Also extract embedding tables (peft's lora_embedding_A/B).")] = False,
    fan_in_fan_out: Annotated[Optional[list[str]], Option(
        "--fan-in-fan-out", metavar="PATTERN", show_default=False,
        help="2-D weights stored (in, out), as transformers' Conv1D stores them. Repeatable.")] = None,
    root: RootOpt = None,
    *,
    out: OutputOptions,
) -> None:
    """Extract a PEFT LoRA adapter that turns BASE into (approximately) TUNED: a truncated SVD of each weight's difference (extract-lora, and --energy).

    Examples:
        ckptsurgery lora extract base.safetensors tuned.safetensors --rank 16 -o adapter
        ckptsurgery lora extract base tuned --energy 0.9 -o adapter
    """
    from .extract_lora import show

    if rank is None and energy is None:
        raise UsageError("give --rank R (or PATTERN=R) or --energy E")
    with out.writing(ranks=False) as write:
        report = ops.extract_lora(base, tuned, write, rank=rank, energy=energy, embeddings=embeddings,
                                  fan_in_fan_out=fan_in_fan_out, root=root)
    show(report, out)


@_adapter_command("merge", "OUT", "Adapter to write: a folder (PEFT inputs) or a .safetensors file (kohya inputs).")
def merge(
    adapters: Annotated[list[str], Argument(metavar="ADAPTER...", help="Two or more adapters of one model, all PEFT folders or all kohya files.", show_default=False)],
    combine: Annotated[Combine, Option(
        "--combine", help="cat: exact, the factors side by side (rank Σ r); svd: the best rank-R approximation of Σ w·ΔW per module.",
        show_default=False)],
    weights: Annotated[Optional[str], Option(
        "--weights", metavar="W,W,..", show_default=False, help="One weight per ADAPTER (default 1 each): the fold is Σ w·ΔW.")] = None,
    rank: Annotated[Optional[int], Option(
        "--rank", metavar="R", show_default=False, help="With svd: the rank (default: the largest of the adapters').")] = None,
    *,
    out: OutputOptions,
) -> None:
    """Merge LoRA adapters into one whose fold is Σ wᵢ·ΔWᵢ: exactly (cat) or at rank R (svd), as peft's add_weighted_adapter.

    Examples:
        ckptsurgery lora merge style detail --combine cat -o both
        ckptsurgery lora merge a b c --weights 1,0.5,0.5 --combine svd --rank 16 -o abc
    """
    with out.writing(ranks=False) as write:
        report = ops.merge_adapters(adapters, write, weights=_numbers(weights), combine=combine.value, rank=rank)
    how = f"combine {report.combine}" + (f", rank {report.rank}" if report.rank is not None else "")
    _show_modules(report, out, f"{count(len(report.adapters), 'adapter')} merged ({how})", "ranks in")


@_adapter_command("resize", "OUT",
                  "Adapter to write, in the input's format: a folder (PEFT) or a .safetensors file (kohya).")
def resize(
    adapter: AdapterArg,
    rank: Annotated[Optional[int], Option(
        "--rank", metavar="R", show_default=False, help="The new rank of every module (one of a smaller rank keeps its own).")] = None,
    energy: EnergyOpt = None,
    *,
    out: OutputOptions,
) -> None:
    """Resize a LoRA adapter: each module's best approximation at the new rank, its scale kept (alpha = scale·rank).

    Examples:
        ckptsurgery lora resize adapter --rank 4 -o adapter-r4
        ckptsurgery lora resize style.safetensors --energy 0.95 -o style-small.safetensors
    """
    with out.writing(ranks=False) as write:
        report = ops.resize_adapter(adapter, write, rank=rank, energy=energy)
    how = f"rank {report.rank}" if report.rank is not None else f"energy {report.energy:g}"
    _show_modules(report, out, f"resized to {how}", "old rank")


@_adapter_command("convert", "OUT", "Adapter to write: a folder (--to peft) or a .safetensors file (--to kohya).")
def convert(
    adapter: AdapterArg,
    to: Annotated[To, Option("--to", help="The format to write.", show_default=False)],
    base: Annotated[Optional[str], Option(
        "--base", metavar="BASE", show_default=False,
        help="The checkpoint the adapter folds into: names kohya's modules in peft's dotted form (needed by --to peft), and checks --to kohya's names.")] = None,
    root: RootOpt = None,
    *,
    out: OutputOptions,
) -> None:
    """Convert a LoRA adapter between a PEFT folder and a kohya .safetensors file (the factors as they are).

    Examples:
        ckptsurgery lora convert adapter --to kohya -o adapter.safetensors
        ckptsurgery lora convert style.safetensors --to peft --base sd.safetensors -o style
    """
    with out.writing(ranks=False) as write:
        report = ops.convert_adapter(adapter, write, to=to.value, base=base, root=root)
    _show(report, out, f"{count(len(report.names), 'module')}, {report.source_format} -> {report.format}",
          ("module", "as"), [(printable(a), printable(b)) for a, b in report.names.items()])


def _numbers(text: str | None) -> list[float] | None:
    """--weights 1,0.5: the numbers of a comma-separated list."""
    if text is None:
        return None
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise UsageError(f"--weights {text!r}: expected numbers separated by commas (1,0.5)") from None


def _show(report: LoraReport, out: OutputOptions, summary: str, columns: tuple[str, ...], rows: list[tuple]) -> None:
    """An adapter's report: --json, or what was written (`summary`) and a table of its modules."""
    if out.json:
        print_json(report.to_json())
        return
    lines = [f"{'would write' if out.dry_run else 'wrote'} {printable(report.output)}: {summary}"]
    if report.needs_force:
        lines.append(listing("would need --force: already there", report.needs_force))
    if out.dry_run:  # the report is the result: stdout, as other commands' --dry-run
        sys.stdout.write("".join(printable(line) + "\n" for line in lines))
    else:
        for line in lines:
            note(line, out.quiet)
    if not out.quiet:
        print_table(columns, rows, not out.dry_run, "modules")


def _show_modules(report: LoraMergeReport | LoraResizeReport, out: OutputOptions, done: str, ranks: str) -> None:
    """A merge's or resize's report: a summary (`done`, the largest error) and one row per module."""
    modules: list[LoraModule] = report.modules
    worst = max((m.error for m in modules), default=0.0)
    rows = [(printable(m.name), m.kind, "x".join(map(str, m.shape)), ",".join(map(str, m.ranks)), str(m.rank),
             f"{m.alpha:g}", f"{m.error:.3g}") for m in modules]
    _show(report, out, f"{count(len(modules), 'module')}, {done}, largest relative error {worst:.3g}",
          ("module", "kind", "shape", ranks, "rank", "alpha", "relative error"), rows)
