"""ckptsurgery merge: a union, an update of a template (--into), or a merge method (--method, --average)."""

from __future__ import annotations

from typing import Annotated, Optional

from .. import core, ops
from ..ops.methods import METHODS, PARAMETERS, merge_options
from .common import (
    CastTo, InputOptions, OutputOptions, choice, command_app, count, expanded_options, input_options,
    listing, output_options, print_table, printable, summarised,
)
from .declare import Argument, Option


Method = choice("Method", METHODS)

# --help groups the options by the mode that takes them
INTO, UNION, METHOD, LORA, RECIPE = ("Into a template (--into)", "Plain merge", "Merge methods (--method, --average)",
                                     "Adapters (--lora)", "Recipes (--config)")

app = command_app()


HELP = (f"Combine checkpoints: a plain union, an update of a template (--into), a merge of fine-tuned models "
        f"(--method: {', '.join(METHODS)}), LoRA adapters folded into a base (--lora), or a mergekit recipe "
        f"(--config).\n\n"
        f"A .safetensors output keeps the metadata of the first source (--method --base, --lora: the base's).")


@app.command(help=HELP)
@output_options()
@expanded_options("parameters", {
    option.parameter: (Annotated[Optional[option.type], Option(
        # a bool is a flag pair, --normalize/--no-normalize: not given is None, the method's default
        f"{option.option}/--no-{option.option[2:]}" if option.type is bool else option.option,
        metavar=option.metavar or None, help=option.help, show_default=False, rich_help_panel=METHOD)], None)
    for option in merge_options()}, dict)
@input_options()
def merge(
    sources: Annotated[Optional[list[str]], Argument(metavar="SOURCE...", help="Checkpoints to merge, in priority order (none with --config).", show_default=False)] = None,
    into: Annotated[Optional[str], Option(
        "--into", metavar="TEMPLATE", help="Template (e.g. saved from the new model): output has exactly its keys, shapes, dtypes.", rich_help_panel=INTO)] = None,
    on_mismatch: Annotated[Optional[core.MismatchPolicy], Option(
        "--on-mismatch", help="With --into, a shape that differs: error (default), skip (keep the template's), overlap (copy the shared block), adapt (fit it by its kind: position embeddings resampled, vocabulary rows grown with their mean, input channels repeated and scaled by I/N; classifier heads keep the template's).", show_default=False, rich_help_panel=INTO)] = None,
    otherwise: Annotated[Optional[core.OtherwisePolicy], Option(
        "--otherwise", help="With --on-mismatch adapt: what a mismatch no adapter fits gets (default: an error).", show_default=False, rich_help_panel=INTO)] = None,
    prefix_tokens: Annotated[Optional[int], Option(
        "--prefix-tokens", metavar="P", help="With adapt: class/register tokens before a position embedding's grid (default: inferred).", show_default=False, rich_help_panel=INTO)] = None,
    grid: Annotated[Optional[str], Option(
        "--grid", metavar="H,W", help="With adapt: the template's grid of patches, when it is not square.", show_default=False, rich_help_panel=INTO)] = None,
    on_conflict: Annotated[Optional[core.ConflictPolicy], Option(
        "--on-conflict", help="Plain merge, a key in several sources: error (default), first, last.", show_default=False, rich_help_panel=UNION)] = None,
    average: Annotated[bool, Option("--average", help="Element-wise (weighted) mean of floating tensors: --method linear.", rich_help_panel=METHOD)] = False,
    method: Annotated[Optional[Method], Option(
        "--method", help="Merge the models' floating tensors key by key (formulas: docs/merging.md).", show_default=False, rich_help_panel=METHOD)] = None,
    base: Annotated[Optional[str], Option(
        "--base", metavar="BASE", help=f"The model the others were fine-tuned from: needed by {', '.join(m for m, c in METHODS.items() if c.needs_base)}.", rich_help_panel=METHOD)] = None,
    parameters: dict = None,  # the merge methods' parameters: options made from their declarations
    dtype: Annotated[Optional[CastTo], Option("--dtype", help="Cast the floating tensors written (default: as the base/first model).", show_default=False)] = None,
    lora: Annotated[Optional[list[str]], Option(
        "--lora", metavar="ADAPTER", help="Fold this adapter into the one SOURCE: a PEFT folder (LoRA, DoRA, IA3, LoHa, LoKr), a kohya/LyCORIS .safetensors (LoRA, LoCon, LoHa, LoKr, full, dora_scale) or a diffusers LoRA file; repeatable.", show_default=False, rich_help_panel=LORA)] = None,
    lora_scale: Annotated[Optional[list[float]], Option(
        "--lora-scale", metavar="S", help="With --lora: multiplies alpha/r (default 1; PEFT DoRA: inside the norm; LyCORIS dora_scale: its multiplier; IA3 takes none); once for all, or once per --lora in order.", show_default=False, rich_help_panel=LORA)] = None,
    allow_unmatched: Annotated[bool, Option(
        "--allow-unmatched", help="With --lora: fold what matches, list LoRA weights matching no base weight.", rich_help_panel=LORA)] = False,
    config: Annotated[Optional[str], Option(
        "--config", metavar="RECIPE", help="Run a mergekit 0.1.5 recipe (YAML): its models, method, parameters (gradients, filters), slices and dtypes; -o DIR writes a folder from_pretrained loads, -o FILE.safetensors the weights alone.", show_default=False, rich_help_panel=RECIPE)] = None,
    layer_pattern: Annotated[Optional[str], Option(
        "--layer-pattern", metavar="REGEX", help="With --config, or a gradient (--t 0,0.5,1): the regex whose one group is a key's layer number, for a model whose key names do not tell its layers apart (two stacks).", show_default=False, rich_help_panel=RECIPE)] = None,
    inp: InputOptions = None,
    *,
    out: OutputOptions,
) -> None:
    """Combine checkpoints (the help text is HELP: it lists the registered methods).

    Examples:
        ckptsurgery merge old.pth --into new.pth --on-mismatch overlap -o init.pth
        ckptsurgery merge a/ b/ --method slerp --t 0,0.5,1 -o slerp.safetensors
        ckptsurgery merge --config slerp.yml -o merged/
    """
    options = {"into": into, "on_mismatch": on_mismatch, "otherwise": otherwise, "prefix_tokens": prefix_tokens,
               "grid": grid, "on_conflict": on_conflict, "average": average, "method": method, "base": base,
               **parameters, "dtype": dtype, "lora": lora, "lora_scale": lora_scale, "allow_unmatched": allow_unmatched,
               "config": config, "layer_pattern": layer_pattern, "dequantize": inp.read.dequantize,
               "names": inp.read.names}
    options = {name: getattr(value, "value", value) for name, value in options.items()}  # choices as strings
    inp.reading(*(sources or []), into, base, named_inside=config is not None)
    with out.writing() as write:
        report = ops.merge_checkpoints(sources or [], write, root=inp.root, **options)
    if out.json:
        out.finish(report)
        return
    if isinstance(report, ops.RecipeReport) and out.dry_run:
        for line in report.plan:  # the plan, one output tensor a line: what --dry-run is for
            print(printable(line))
    if isinstance(report, ops.IntoReport) and (out.dry_run or not out.quiet):
        _print_into_table(report, stderr=not out.dry_run)
    out.finish(report, _details(report))


def _details(report: ops.MergeReport) -> list[str]:
    """The lines of a merge's summary that its mode adds."""
    if isinstance(report, ops.RecipeReport):
        return _recipe_details(report)
    if isinstance(report, ops.IntoReport):
        return [f"copied {len(report.copied)}, renamed {len(report.renamed)}, adapted {len(report.adapted)}, "
                f"kept from template {len(report.kept_from_template)}, mismatched {len(report.mismatched)}, "
                f"left out {len(report.left_out)}"]
    if isinstance(report, ops.MethodReport):
        defaults = {p.name: p.default for p in METHODS[report.method].parameters}
        over = f" over {count(report.layers, 'layer')}"  # a gradient: "t 0 → 0.5 → 1 over 5 layers"
        shown = ", ".join(f"{k} {PARAMETERS[k].shown(v)}"
                          + (over if isinstance(v, list) and PARAMETERS[k].takes_gradient else "")
                          for k, v in report.parameters.items()
                          if not (isinstance(v, bool) and v == defaults.get(k)))  # a flag: shown when not the default
        taken = f"taken from the {'base' if report.base else 'first model'} (not floating)"
        return [f"merged {count(report.merged, 'tensor')} by {report.method} ({shown})",
                *([listing(taken, summarised(report.not_merged))] if report.not_merged else []),
                *(listing(note, [n for n, v in report.notes.items() if v == note])
                  for note in sorted(set(report.notes.values())))]
    if isinstance(report, ops.FoldReport):
        details = [f"folded {count(len(report.adapters), 'adapter')} into {count(report.folded, 'tensor')}: "
                   + "; ".join(f"{printable(a.path)} ({a.format}{_kinds(a.kinds)}, scale {a.scale:g}, "
                               f"{a.folded} weights)" for a in report.adapters)]
        if report.unmatched:
            details.append(listing("LoRA weights matching no base weight (left out)", report.unmatched))
        return details
    if report.conflicts:
        return [listing(f"conflicts (kept the {report.on_conflict})", report.conflicts)]
    return []


def _kinds(kinds: dict[str, int]) -> str:
    """", 4 dora" for an adapter of other kinds than plain LoRA; nothing for a LoRA."""
    return "" if set(kinds) <= {"lora"} else "".join(f", {n} {kind}" for kind, n in kinds.items())


def _recipe_details(report: ops.RecipeReport) -> list[str]:
    layers = f", {count(report.layers, 'layer')}" if report.layers else ""
    method = report.merge_method + (f" (--method {report.method})" if report.method != report.merge_method else "")
    details = [f"recipe {printable(report.recipe or '(given loaded)')}: {method} — "
               f"merged {count(report.merged, 'tensor')}, copied {report.copied}{layers}"]
    if report.config_changes:
        details.append("config.json: " + ", ".join(f"{k} {v}" for k, v in report.config_changes.items()))
    details += [printable(note) for note in report.notes]
    details += [listing(note, [n for n, v in report.tensor_notes.items() if v == note])
                for note in sorted(set(report.tensor_notes.values()))]
    if report.ignored:
        details.append(listing("tensors of other models the output has no place for", report.ignored))
    return details


def _print_into_table(report: ops.IntoReport, stderr: bool) -> None:
    """Every key under exactly one heading, as the JSON report has them: what needs a look
    first (mismatches, adaptations, fresh values, renames, what was left out), copies last."""
    rows = [
        *((printable(m["name"]), f"mismatched ({m['policy']})", f"{m['source_shape']} -> {m['template_shape']}")
          for m in report.mismatched),
        *((printable(a["name"]), f"adapted ({a['rule']})", f"{a['from']} -> {a['to']}") for a in report.adapted),
        *((printable(name), "kept from template", printable(report.kept_reasons.get(name, "")))
          for name in report.kept_from_template),
        *((printable(name), "renamed", f"from {printable(source)}") for source, name in report.renamed.items()),
        *((printable(name), "left out", "not in the template") for name in report.left_out),
        *((printable(name), "copied", "") for name in report.copied),
    ]
    print_table(("key", "outcome", "detail"), rows, stderr, "keys")
