"""merge: one command, four modes, each a library function of its own module —

- `merge_union` (union.py): the union of the sources' keys (`--on-conflict`);
- `merge_into` (into.py): `model_dict.update(pretrained_dict)` into a template (`--into`);
- `merge_with_method` (by_method.py): a merge method (`--method`, `--average`; ops/methods);
- `fold_adapters` (fold.py): adapters folded into one base (`--lora`; ops/adapters);
- `merge_recipe` (recipe.py): a mergekit recipe (`--config RECIPE`; ops/recipes), the models
  its own.

`merge_checkpoints` picks the mode from the options given and refuses, in one place
(`refuse_other_modes`), an option the mode does not take: MODE_OPTIONS is the table."""

from __future__ import annotations

from ...errors import UsageError
from ...kinds import Kind
from .. import methods
from ..methods import option_of
from ..options import ReadOptions, WriteOptions, check_write_options
from ..reports import MergeReport
from .into import ADAPT_OPTIONS, merge_into, refuse_adapt_options


class Mode(Kind):
    """A merge's mode: the report's `mode`."""

    UNION = "union"
    INTO = "into"
    METHOD = "method"
    LORA = "lora"
    RECIPE = "recipe"


# how a refusal names each mode
MODE_NAMES = {Mode.UNION: "a plain merge", Mode.INTO: "merge --into", Mode.METHOD: "--method (or --average)",
              Mode.LORA: "--lora", Mode.RECIPE: "--config"}

# the options each mode takes (the library's keywords; the command line spells them --with-dashes).
# --dtype applies to every mode: it casts what is written.
MODE_OPTIONS: dict[Mode, frozenset[str]] = {
    Mode.UNION: frozenset({"on_conflict", "dtype", "dequantize", "names"}),
    Mode.INTO: frozenset({"into", "on_mismatch", "otherwise", "prefix_tokens", "grid", "dtype", "dequantize", "names"}),
    # --layer-pattern: where a gradient (--t 0,0.5,1) finds the layers; by_method refuses it without one
    Mode.METHOD: frozenset({"method", "average", "base", "dtype", "dequantize", "names", "layer_pattern",
                            *methods.PARAMETERS}),
    Mode.LORA: frozenset({"lora", "lora_scale", "allow_unmatched", "dtype", "dequantize", "names"}),
    # a recipe names its models, method, parameters and dtypes itself
    Mode.RECIPE: frozenset({"config", "layer_pattern"}),
}
# the order refusals consider options in, and list them in
OPTION_ORDER = ("lora_scale", "allow_unmatched", "into", "average", "method", "base", "on_conflict", "on_mismatch",
                *methods.PARAMETERS, *ADAPT_OPTIONS, "dtype", "dequantize", "names", "lora", "config", "layer_pattern")
# a method parameter may not take a name merge already gives an option
_CLASH = set(methods.PARAMETERS) & (set(OPTION_ORDER) - set(methods.PARAMETERS) | {"root", "sources", "write"})
if _CLASH:
    raise TypeError(f"merge method parameter(s) {', '.join(sorted(_CLASH))}: the name of one of merge's own "
                    f"options; declare them under other names (ops/methods/)")


def _given(name: str, value) -> bool:
    """Whether an option was given: anything but None and False — an empty list is a value the
    mode checks, but for --lora and --lora-scale, where it means none; False is a value of a merge
    method's flag (--no-normalize), None is not given."""
    if name in ("lora", "lora_scale") and isinstance(value, (list, tuple)) and not value:
        return False
    if name == "names" and value == "gguf":  # the default: names as the file has them
        return False
    return value is not None and (value is not False or name in methods.PARAMETERS)


def mode_of(options: dict) -> Mode:
    """The mode the given options select: --config, else --lora, else --into, else --method/--average,
    else a union."""
    if options.get("config") is not None:
        return Mode.RECIPE
    if options.get("lora"):  # an empty list of adapters selects nothing
        return Mode.LORA
    if options.get("into") is not None:
        return Mode.INTO
    if options.get("method") is not None or options.get("average"):
        return Mode.METHOD
    return Mode.UNION


def refuse_other_modes(mode: Mode, options: dict) -> None:
    """One line for an option `mode` does not take (options maps keyword -> value), naming the
    mode, or modes, that take it."""
    unknown = sorted(set(options) - set(OPTION_ORDER))
    if unknown:
        raise UsageError(f"merge takes no option {', '.join(map(option_of, unknown))}")
    given = [name for name in OPTION_ORDER if _given(name, options.get(name))]
    refuse_adapt_options(options.get("on_mismatch"), given)  # before the mode's: it names --on-mismatch adapt
    foreign = [name for name in given if name not in MODE_OPTIONS[mode]]
    if not foreign:
        return
    if mode is Mode.RECIPE:
        raise UsageError(f"--config does not combine with {', '.join(map(option_of, foreign))}: the recipe names "
                         f"its models, method, parameters and dtypes")
    if mode is Mode.LORA:
        raise UsageError(f"--lora does not combine with {', '.join(map(option_of, foreign))}: fold first, then merge")
    if mode is Mode.INTO and ("method" in foreign or "average" in foreign):
        chosen = "average" if "average" in foreign else "method"
        raise UsageError(f"--into and --{chosen} do not combine: merge first, then merge --into")
    name = foreign[0]
    takers = [MODE_NAMES[m] for m in Mode if name in MODE_OPTIONS[m]]
    selected_by = {Mode.INTO: ", not to --into", Mode.METHOD: ", not to --method"}.get(mode, "")
    raise UsageError(f"{option_of(name)} applies to {' or '.join(takers)} only{selected_by}")


def merge_checkpoints(sources: list[str], write: WriteOptions, *, root: str | None = None,
                      **options) -> MergeReport:
    """Merge checkpoints by the mode the options select (see this module's docstring and
    MODE_OPTIONS); an option of another mode is refused. `root`: where the sources' state dicts
    sit. Returns the mode's report (UnionReport, IntoReport, MethodReport, FoldReport or RecipeReport).

    Example:
        >>> merge_checkpoints(["a.pth", "b.pth"], WriteOptions("avg.safetensors"), average=True)
        >>> merge_checkpoints(["old.pth"], WriteOptions("init.pth"), into="new.pth", on_mismatch="overlap")
    """
    mode = mode_of(options)
    refuse_other_modes(mode, options)
    if mode is Mode.RECIPE:
        if sources or root is not None:
            raise UsageError(f"--config takes the models from the recipe: give no {'SOURCE' if sources else '--root'}")
        from .recipe import merge_recipe  # recipes' parsing and planning: imported by --config alone

        return merge_recipe(options["config"], write, layer_pattern=options.get("layer_pattern"))
    if not sources:
        raise UsageError("merge needs at least one SOURCE, or a recipe: --config RECIPE")
    given = {name: value for name, value in options.items() if _given(name, value)}
    write = check_write_options(write)
    # the input options, one object every mode opens its inputs with (ops/inputs.py)
    read = ReadOptions(dequantize=bool(given.pop("dequantize", False)), names=given.pop("names", "gguf"))
    if mode is Mode.LORA:
        if len(sources) != 1:
            raise UsageError(f"--lora folds into exactly one base checkpoint, not {len(sources)}: fold first, then merge")
        from .fold import fold_adapters  # each mode's machinery imported when it runs: adapters, methods

        adapters = given.pop("lora")
        return fold_adapters(sources[0], adapters, write, scales=given.pop("lora_scale", None), root=root, read=read,
                             **given)
    if mode is Mode.INTO:
        return merge_into(sources, given.pop("into"), write, root=root, read=read, **given)
    if mode is Mode.METHOD:
        from .by_method import merge_with_method

        return merge_with_method(sources, write, root=root, read=read, **given)
    from .union import merge_union

    return merge_union(sources, write, root=root, read=read, **given)


__all__ = ["MODE_OPTIONS", "Mode", "merge_checkpoints", "refuse_other_modes"]
