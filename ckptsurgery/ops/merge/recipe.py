"""merge --config RECIPE: a mergekit 0.1.5 recipe (ops/recipes) run streaming into a loadable folder.

`merge_recipe` opens every model the recipe names (headers only; a `model+lora` one is its base
with the adapter folded in as it is written, ops/adapters; an `hf://ORG/REPO` one read by range
requests, its config.json and tokenizer files fetched into a temporary folder), plans the output (`plan_recipe`: per
output key, its sources and their resolved parameters), and makes each output key a tensor
computed as the writer reads it:

- a key a method merges: the method's chunks (ops/methods), with that key's parameter values —
  a parameter mergekit takes per model from each model's own values, the others from the
  slice and the recipe; the inputs rounded to the recipe's `dtype` first when it is narrower
  (mergekit casts every input to it), the math in float32 (float64 for float64 inputs);
- `passthrough` (and any key that is not floating): the source's tensor, times `scale` when it is
  not 1, else its bytes as they lie in the input (a slice recipe costs about a copy of what it
  writes); a layer used twice is written twice, each copy under its own name (not tied:
  transformers must find every key).

With `tokenizer_source:` and a tokenizer.json in every model's folder, the vocabulary tensors
(the embeddings, the head) are aligned by token string to the source's vocabulary, as mergekit
(ops/recipes/vocabulary.py; noted per tensor), and config.json's vocab_size is its size. Else a
tensor outside the layers takes the shape of the reference's (the model whose config.json the
output takes: the base, else the first model): with `tokenizer_source: base` sources of another
vocabulary have their rows cut or filled with the reference's by token id (noted per tensor);
without it, or with a source model other than the reference, they are refused.

The written dtype is `out_dtype`, else `dtype`, else each tensor's own. `-o FILE.safetensors` writes
the weights alone; any other output is a folder (ops/model_folder.py): the weights —
`model.safetensors`, or shards of `--max-shard-size` (default 5GB, as transformers) and an
index — beside config.json, the tokenizer's files, the recipe and a model card, staged and
renamed into place together; under torchrun each rank writes its share of the shards, rank 0
the other files (ops/write.py's FolderOutput)."""

from __future__ import annotations

import os
import re
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from typing import Any

from ...dtypes import CAST_TARGETS, DType
from ...errors import CkptError, UsageError
from ...io import Checkpoint, TensorRef, open_checkpoint
from ...io.formats import is_remote
from ...io.model import Storage, computed_tensor, joined_tensor, mapped_range
from ...io.write import check_parent
from .. import methods
from ..methods import MergeMethod, Parameter
from ..model_folder import FolderFiles, FolderPlan, folder_files, folder_of, is_repository, read_config, \
    write_folder_files
from ..options import WriteOptions, check_write_options
from ..recipes import ModelRef, Planned, Recipe, RecipePlan, Role, Source, plan_lines, plan_recipe
from ..recipes import TokenizerKind, refuse_unknown_parameters
from ..recipes.chat_templates import template_models
from ..recipes.layers import layer_scheme
from ..recipes.schema import read_recipe
from ..recipes.vocabulary import TOKENIZER_JSON, Alignment, aligned_tensors, alignment, alignment_note, \
    read_vocabulary, row_sources, vocabulary_size
from ..reports import RecipeReport
from ..write import FolderOutput, write_checkpoint
from ..spools import Spools, output_folder
from .by_method import read_values, streamed_tensor

FOLDER_SHARD_SIZE = "5GB"  # transformers' save_pretrained default
WEIGHTS_FILE = "model.safetensors"
# a parameter that keeps its own name in one of mergekit's methods where the others call it otherwise
_OWN_NAMES = {("passthrough", "scale")}


def merge_recipe(recipe: str | os.PathLike | Recipe, write: WriteOptions, *,
                 layer_pattern: str | None = None) -> RecipeReport:
    """Run a mergekit recipe (a file's path, or a Recipe from `load_recipe`) into `write.output`:
    a folder `from_pretrained` loads, or weights alone for a `.safetensors` name. `layer_pattern`:
    --layer-pattern, for models whose layers the key names do not tell apart.

    Example:
        >>> merge_recipe("slerp.yml", WriteOptions("merged/"))
    """
    write = check_write_options(write)
    recipe, text, where = _loaded(recipe)
    method = method_of_recipe(recipe)
    names = mergekit_parameters(method)
    refuse_unknown_parameters(recipe, names)
    folder = _folder_output(write)
    _not_an_input(recipe, folder or write.output)
    with ExitStack() as stack:
        spools = stack.enter_context(Spools(output_folder(write.output)))
        opened = _open_models(recipe, stack, spools)
        fetched = _fetched_folders(recipe, opened, stack)
        keys = {m: {k: t.shape for k, t in tensors.items()} for m, (_, tensors) in opened.items()}
        plan = plan_recipe(recipe, keys, layer_pattern, {k: _coercion(p) for k, p in names.items()})
        cast = _written_dtype(recipe)
        aligned = _alignment(recipe, opened, fetched)
        built = build_tensors(plan, {m: tensors for m, (_, tensors) in opened.items()}, method, names,
                              _working(recipe), cast, aligned or _fits_vocabulary(recipe), spools)
        inputs = [c for c, _ in opened.values()]
        if folder is None:
            written, extra = write_checkpoint(built.tensors, write, cast=cast, inputs=inputs), None
        else:
            files = folder_files(_folder_plan(recipe, plan, keys, layer_pattern, text, built, fetched))
            written, extra = _write_folder(folder, built.tensors, write, cast, inputs, files), files
    return RecipeReport.extend(
        written, input=None, mode="recipe", sources=[str(m) for m in recipe.referenced_models()], recipe=where,
        merge_method=recipe.merge_method, method=method.name, base=_shown(recipe.base_model), layers=plan.layers,
        merged=built.merged, copied=built.copied, ignored=[f"{m}:{k}" for m, k in plan.ignored],
        plan=plan_lines(plan), config_changes=extra.config_changes if extra else {},
        notes=[*recipe.notes, *_stripped_note(aligned), *(extra.notes if extra else [])], tensor_notes=built.notes())


def _loaded(recipe) -> tuple[Recipe, str | None, str | None]:
    """(the recipe, its file's exact text, its path); a Recipe given as one has neither."""
    if isinstance(recipe, Recipe):
        return recipe, None, None
    path = os.fspath(recipe)
    loaded, text = read_recipe(path)  # the file read once (bounded, UTF-8): the recipe and its text
    return loaded, text, path


def _shown(model: ModelRef | None) -> str | None:
    return None if model is None else str(model)


# ---- the method and its parameters, by mergekit's names -----------------------------------------

def method_of_recipe(recipe: Recipe) -> type[MergeMethod]:
    """Our method for the recipe's `merge_method` (mergekit's name)."""
    name = methods.method_of_mergekit(recipe.merge_method)
    if name not in methods.METHODS:
        known = ", ".join(sorted(m.replace("-", "_") for m in methods.METHODS))
        raise UsageError(f"merge_method: {recipe.merge_method!r} is not a merge method (known: {known})")
    return methods.METHODS[name]


def mergekit_parameters(method: type[MergeMethod]) -> dict[str, Parameter]:
    """The method's parameters by the names mergekit's recipes give them (`weight`, `lambda`)."""
    ours_to_kit = {ours: kit for kit, ours in methods.MERGEKIT_PARAMETERS.items()}
    return {p.name if (method.name, p.name) in _OWN_NAMES else ours_to_kit.get(p.name, p.name): p
            for p in method.parameters}


def _coercion(parameter: Parameter):
    """A recipe value as the parameter's type (mergekit's validate), where it is one: 1 -> 1.0 for a
    number; anything else is left for the parameter's own check to refuse, naming it."""
    def coerce(value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return value
        if parameter.type is int:
            return int(value) if float(value).is_integer() else value
        return float(value) if parameter.type is float else value

    return coerce


def _written_dtype(recipe: Recipe) -> DType | None:
    name = recipe.out_dtype or recipe.dtype
    if name is None:
        return None
    if name not in CAST_TARGETS:
        raise UsageError(f"{'out_dtype' if recipe.out_dtype else 'dtype'}: {name} is not a floating dtype; use "
                         f"bfloat16, float16 or float32")
    return CAST_TARGETS[name]


def _fits_vocabulary(recipe: Recipe) -> bool:
    """`tokenizer_source: base` (or naming the reference model itself): vocabularies fitted to the base's."""
    source = recipe.tokenizer_source
    reference = recipe.base_model or _first_model(recipe)
    return source is not None and (source.kind == TokenizerKind.BASE or source.model == reference)


def _alignment(recipe: Recipe, opened: dict, fetched: dict[str, str]) -> Alignment | None:
    """The recipe's models aligned by token string to its tokenizer source's vocabulary, when
    every one of them and the source have a tokenizer.json (mergekit aligns whenever a
    tokenizer_source is set). Without them: None (`base`: rows fitted by token id), refused when
    the source is another model whose config's vocab_size is not every model's."""
    if recipe.tokenizer_source is None:
        return None
    reference = recipe.base_model or _first_model(recipe)
    source = recipe.tokenizer_source.model or reference
    folders = {m: folder_of(m.path, fetched) for m in dict.fromkeys([*opened, source])}
    configs = {m: read_config(f) if f else None for m, f in folders.items()}
    lacking = [m for m, f in folders.items() if f is None or not os.path.isfile(os.path.join(f, TOKENIZER_JSON))]
    if lacking:
        # compared, not hashed: a config's vocab_size may be any JSON value (a list)
        sizes = [c["vocab_size"] for c in configs.values() if c and "vocab_size" in c]
        if source != reference and any(size != sizes[0] for size in sizes):
            raise CkptError(f"{lacking[0]}: no {TOKENIZER_JSON}, needed to align the models' vocabularies to "
                            f"{source}'s by token string (tokenizer_source: {source}); save its tokenizer there "
                            f"with transformers' save_pretrained, or use tokenizer_source: base")
        return None
    vocabularies = {m: read_vocabulary(f) for m, f in folders.items()}
    sized = {m: (v, vocabulary_size(configs[m], v)) for m, v in vocabularies.items()}
    return alignment(str(source), {m: sized[m] for m in opened}, sized[source])


def _stripped_note(aligned: Alignment | None) -> list[str]:
    if aligned is None or not aligned.beyond:
        return []
    return [f"{aligned.source}'s {TOKENIZER_JSON} holds {aligned.beyond} tokens at or past its vocab_size "
            f"({aligned.tokens} kept): the output's copy still has them (mergekit strips them from `base`'s)"]


def _working(recipe: Recipe) -> str | None:
    """The dtype mergekit merges in, when it rounds the inputs (bfloat16, float16): None otherwise."""
    return recipe.dtype if recipe.dtype in ("bfloat16", "float16") else None


# ---- the models ------------------------------------------------------------------------------

def _open_models(recipe: Recipe, stack: ExitStack,
                 spools: Spools | None = None) -> dict[ModelRef, tuple[Checkpoint, dict[str, TensorRef]]]:
    """Every model the recipe names, opened (headers only): its checkpoint and its tensors (a
    `model+lora` one's with the adapter folded in, computed when written; a remote base's weight
    the fold reads twice kept in `spools` between the reads)."""
    opened: dict[ModelRef, tuple[Checkpoint, dict[str, TensorRef]]] = {}
    tokenizer = recipe.tokenizer_source.model if recipe.tokenizer_source else None
    merged = {e.model for e in recipe.models or ()} | {s.model for p in recipe.slices or () for s in p.sources}
    for model in recipe.referenced_models():
        if model == tokenizer and model not in merged and model != recipe.base_model:
            if not (os.path.isdir(model.path) or is_repository(model.path)):  # only its files are copied
                raise CkptError(f"{model.path}: no such folder (the recipe's tokenizer_source)")
            continue
        if not (os.path.exists(model.path) or is_remote(model.path)):
            raise CkptError(f"{model.path}: no such file or folder (a model of the recipe; paths are relative to "
                            f"the current folder; a model on the Hub is hf://ORG/REPO)")
        ckpt = stack.enter_context(open_checkpoint(model.path))
        tensors = dict(ckpt.tensors)
        if model.lora is not None:
            tensors = _folded(ckpt, model.lora, stack, spools)
        opened[model] = (ckpt, tensors)
    return opened


def _fetched_folders(recipe: Recipe, opened: dict, stack: ExitStack) -> dict[str, str]:
    """Where the files of each `hf://` repository the recipe names lie here: its config.json and
    tokenizer files, fetched into a temporary folder of its own at the commit its weights were
    read at, so that the output's files, the chat template and the vocabularies are read from it
    as from a local model's folder. path -> folder."""
    from ...io.remote import commit_of, parse_hf, repository_files
    from ..model_folder import CONFIG, MAX_FETCHED, TOKENIZER_FILES

    folders: dict[str, str] = {}
    for model in recipe.referenced_models():
        if model.path in folders or not is_repository(model.path):
            continue
        ckpt = opened[model][0] if model in opened else None
        found = repository_files(model.path, [CONFIG, *TOKENIZER_FILES], MAX_FETCHED, ckpt and commit_of(ckpt))
        if not found and ckpt is None:  # only its files are read: none at all is a name or revision that is wrong
            raise CkptError(f"{model.path}: none of {CONFIG} and the tokenizer's files found there (the recipe's "
                            f"tokenizer_source); check the repository's name and revision")
        # named after the repository (as the hub cache's models--ORG--REPO): a refusal of one of its
        # files (a config.json that is not JSON) names the folder, which must say whose file it is
        named = f"ckptsurgery-hub-{parse_hf(model.path)[0].repo.replace('/', '--')}-"
        folder = folders[model.path] = stack.enter_context(tempfile.TemporaryDirectory(prefix=named))
        for name, raw in found.items():
            with open(os.path.join(folder, name), "xb") as f:
                f.write(raw)
    return folders


def _folded(ckpt: Checkpoint, adapter: str, stack: ExitStack, spools: Spools | None = None) -> dict[str, TensorRef]:
    """The base's tensors with a LoRA adapter folded in (scale 1, as peft's merge_and_unload)."""
    from ..adapters import fold_into, read_adapter

    if not os.path.exists(adapter):
        raise CkptError(f"{adapter}: no such adapter (the `+{adapter}` of a model of the recipe)")
    tensors, _ = fold_into(ckpt, [(stack.enter_context(read_adapter(adapter)), 1.0)], spools=spools)
    return dict(tensors)


# ---- the output tensors ----------------------------------------------------------------------

@dataclass
class Built:
    """The output's tensors in the plan's order; how many a method merges and how many are
    copies; the merges, by key, for their notes once written."""

    tensors: dict[str, TensorRef] = field(default_factory=dict)
    merged: int = 0
    copied: int = 0
    merges: dict[str, MergeMethod] = field(default_factory=dict, repr=False)
    fitted: dict[str, str] = field(default_factory=dict)  # key -> how its sources' rows were fitted
    vocab_size: int | None = None  # the aligned vocabulary's, for config.json

    def notes(self) -> dict[str, str]:
        notes = {key: merge.note for key, merge in self.merges.items() if merge.note is not None}
        return dict(sorted({**notes, **self.fitted}.items()))


def build_tensors(plan: RecipePlan, models: dict[ModelRef, dict[str, TensorRef]], method: type[MergeMethod],
                  names: dict[str, Parameter], working: str | None, cast: DType | None,
                  vocabulary: bool | Alignment = False, spools: Spools | None = None) -> Built:
    """Each planned key as a tensor computed when written (see the module's docstring).
    `vocabulary`: an Alignment (tokenizer_source, every model with a tokenizer.json): the rows of
    a vocabulary tensor aligned by token; True (tokenizer_source: base without): the rows of a
    tensor outside the layers cut or filled to the reference's (see `_fit_rows`). `spools`: where a
    remote tensor the method reads twice is kept between its passes (by_method.InputReads)."""
    built = Built(vocab_size=vocabulary.tokens if isinstance(vocabulary, Alignment) else None)
    resolved: dict[tuple, dict] = {}  # the same values (most keys of a recipe share them): checked once
    for tensor in plan.tensors:
        inputs = [models[s.model][s.key] for s in tensor.sources]
        if tensor.role is not Role.LAYER:
            inputs = _outside_layers(tensor, inputs, models[plan.reference].get(tensor.key), plan.reference,
                                     vocabulary, built)
        _same_shapes(tensor, inputs)
        if not all(t.dtype.floating for t in inputs):
            built.tensors[tensor.key] = _copy(inputs[_base_index(tensor)])
            built.copied += 1
        elif method.name == "passthrough":
            built.tensors[tensor.key] = _passthrough(tensor, inputs[0], working, cast, built, spools)
        else:
            order, has_base = _read_order(tensor, method)
            given = _given(tensor, [tensor.sources[i] for i in order[int(has_base):]], names)
            values = _resolved(method, tensor, len(order) - int(has_base), given, resolved)
            merge = _merge(method, values, tensor.key, [inputs[i] for i in order], has_base, working, spools)
            built.merges[tensor.key] = merge
            built.tensors[tensor.key] = streamed_tensor(merge, inputs[order[0]].shape, cast or inputs[order[0]].dtype)
            built.merged += 1
    return built


def _same_shapes(tensor: Planned, inputs: list[TensorRef]) -> None:
    first = inputs[0]
    for source, t in zip(tensor.sources[1:], inputs[1:]):
        if t.shape != first.shape:
            raise CkptError(f"{tensor.key}: {source.model}'s {source.key} has shape {list(t.shape)}, "
                            f"{tensor.sources[0].model}'s {tensor.sources[0].key} {list(first.shape)}: the sources "
                            f"of a merged tensor must have one shape" + _vocabulary_hint(tensor, inputs))


def _vocabulary_hint(tensor: Planned, inputs: list[TensorRef]) -> str:
    if tensor.role is Role.LAYER or len({t.shape[1:] for t in inputs if t.shape}) != 1 or not all(
            t.shape for t in inputs):
        return ""
    return (" (models with different vocabularies: set `tokenizer_source: base` to cut or fill each one's rows to "
            "the base's)")


def _outside_layers(tensor: Planned, inputs: list[TensorRef], target: TensorRef | None, reference: ModelRef,
                    fit: bool | Alignment, built: Built) -> list[TensorRef]:
    """A tensor outside the layers must have the shape the reference's config.json describes: its
    sources aligned by token to the output vocabulary when they are vocabulary tensors, or fitted
    to the reference's (`fit`), else refused when they differ (a frankenmerge of two
    vocabularies would write an embedding and a head of different sizes)."""
    if isinstance(fit, Alignment):
        if all(fit.is_vocabulary(s.model, t) for s, t in zip(tensor.sources, inputs)):
            return _aligned_rows(tensor, inputs, fit, built)
    elif fit:
        return _fit_rows(tensor, inputs, target, reference, built)
    for source, t in zip(tensor.sources, inputs):
        if target is not None and t.shape != target.shape:
            raise CkptError(f"{tensor.key}: {source.model}'s has shape {list(t.shape)}, {reference}'s (whose "
                            f"config.json the output takes) {list(target.shape)}"
                            + _vocabulary_hint(tensor, [t, target]))
    return inputs


def _aligned_rows(tensor: Planned, inputs: list[TensorRef], aligned: Alignment, built: Built) -> list[TensorRef]:
    """A vocabulary tensor's sources, each permuted to the output vocabulary by token (mergekit's
    PermutedVocabulary), noted when any changed."""
    permutations = [aligned.permutations[s.model] for s in tensor.sources]
    sources = row_sources(permutations, _base_position(tensor))
    result = aligned_tensors(tensor.key, inputs, permutations, sources)
    if any(r is not t for r, t in zip(result, inputs)):
        built.fitted[tensor.key] = alignment_note(aligned, [str(s.model) for s in tensor.sources], inputs,
                                                  permutations, sources)
    return result


def _fit_rows(tensor: Planned, inputs: list[TensorRef], target: TensorRef | None, reference: ModelRef,
              built: Built) -> list[TensorRef]:
    """`tokenizer_source: base` for a tensor outside the layers whose sources have other row counts
    (vocabularies): each source's rows cut to the reference's (tokens it added dropped), or filled
    with the reference's own rows (tokens it lacks take the base's) — by token id, which assumes the
    vocabularies agree where they overlap (tokens added at the end), as mergekit's token-by-token
    alignment then gives."""
    if target is None or not target.shape or all(t.shape == target.shape for t in inputs) or any(
            t.shape[1:] != target.shape[1:] for t in inputs):
        return inputs  # nothing to fit, or nothing the rows alone could fit (refused next)
    rows, fitted, changes = target.shape[0], [], []
    for source, t in zip(tensor.sources, inputs):
        if t.shape[0] == rows:
            fitted.append(t)
            continue
        if t.dtype is not target.dtype:
            raise CkptError(f"{tensor.key}: {source.model}'s {t.dtype.name} rows cannot be filled with "
                            f"{reference}'s {target.dtype.name} ones")
        fitted.append(_first_rows(t, rows) if t.shape[0] > rows else _filled(t, target))
        changes.append(f"{source.model} {'cut' if t.shape[0] > rows else 'filled'} from {t.shape[0]}")
    built.fitted[tensor.key] = f"rows fitted to {reference}'s {rows}: {', '.join(changes)}"
    return fitted


def _first_rows(t: TensorRef, rows: int) -> TensorRef:
    """The first `rows` rows of `t`: a view of the same bytes."""
    return TensorRef(t.storage, t.offset, (rows, *t.shape[1:]), t.stride, t.dtype)


def _filled(t: TensorRef, target: TensorRef) -> TensorRef:
    """`t`'s rows, then `target`'s rows past them: read where they lie when both are laid out in
    order in their files, else made when written."""
    row = t.nbytes // t.shape[0] if t.shape[0] else 0
    if mapped_range(t) is not None and mapped_range(target) is not None:
        (mine, start), (theirs, first) = mapped_range(t), mapped_range(target)
        return joined_tensor(target.shape, t.dtype, [(mine, start, t.nbytes),
                                                     (theirs, first + t.nbytes, target.nbytes - t.nbytes)])
    return computed_tensor(target.shape, t.dtype,
                           lambda: bytes(t.data()) + bytes(memoryview(target.data())[row * t.shape[0]:]))


def _base_position(tensor: Planned) -> int | None:
    return next((i for i, s in enumerate(tensor.sources) if s.model == tensor.base), None)


def _base_index(tensor: Planned) -> int:
    base = _base_position(tensor)
    return 0 if base is None else base


def _read_order(tensor: Planned, method: type[MergeMethod]) -> tuple[list[int], bool]:
    """Which sources the method reads, in its order ([base, model...] or [model...]), and whether
    the first is the base. slerp goes from the base (t = 0) to the other model, as mergekit's."""
    base = _base_position(tensor)
    others = [i for i in range(len(tensor.sources)) if i != base]
    if method.needs_base or method.base_optional:
        if base is None and method.needs_base:
            where = f"{tensor.base} is not among the sources of" if tensor.base else "no base_model is named for"
            raise UsageError(f"merge_method {method.name.replace('-', '_')} needs a base model: {where} "
                             f"{tensor.key}")
        return ([base] if base is not None else []) + others, base is not None
    if method.name == "slerp" and base is not None:
        return [base, *others], False
    return list(range(len(tensor.sources))), False


def _given(tensor: Planned, models: list[Source], names: dict[str, Parameter]) -> dict[str, Any]:
    """The raw values of one key's parameters, by our names: a per-model one as a list in the
    models' order (a model without a value gets the default), the others as the key's."""
    given: dict[str, Any] = {}
    for kit, p in names.items():
        if p.per_model:
            values = [s.parameter(kit) for s in models]
            if all(v is None for v in values):
                continue
            missing = [str(s.model) for s, v in zip(models, values) if v is None]
            if missing and p.required:
                raise UsageError(f"{tensor.key}: {kit} is set for some models but not for {', '.join(missing)}")
            given[p.name] = [p.default if v is None else v for v in values]
        elif tensor.parameter(kit) is not None:
            given[p.name] = tensor.parameter(kit)
    return given


def _resolved(method: type[MergeMethod], tensor: Planned, models: int, given: dict, cache: dict) -> dict:
    key = (models, tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in sorted(given.items())))
    if key not in cache:
        try:
            cache[key] = dict(methods.resolve_parameters(method.name, models, given).values)
        except UsageError as refused:
            raise UsageError(f"{tensor.key}: {in_recipe_words(str(refused), method)}") from None
    return cache[key]


def in_recipe_words(message: str, method: type[MergeMethod]) -> str:
    """A refusal of the methods' checks said in a recipe's words: `--density` is `density`,
    `--weights` mergekit's `weight`, `--method ties` `merge_method: ties`."""
    for kit, parameter in sorted(mergekit_parameters(method).items(), key=lambda item: -len(item[1].option)):
        message = re.sub(re.escape(parameter.option) + r"\b", kit, message)
    message = message.replace(f"--method {method.name}", f"merge_method {method.name.replace('-', '_')}")
    return message.replace(" (the base is --base)", " (the base is base_model)")


def _merge(method: type[MergeMethod], values: dict, key: str, inputs: list[TensorRef], has_base: bool,
           working: str | None, spools: Spools | None) -> MergeMethod:
    """The merge of one key, its inputs rounded to the working dtype first, as mergekit casts
    its inputs to it."""
    wide = "float64" if any(t.dtype.name == "float64" for t in inputs) else "float32"
    reads = [read_values(t, wide, spools, working) for t in inputs]
    return method(values, key, reads, inputs[0].numel, wide, chunk_size=methods.CHUNK, shape=inputs[0].shape,
                  has_base=has_base)


def _passthrough(tensor: Planned, source: TensorRef, working: str | None, cast: DType | None, built: Built,
                 spools: Spools | None):
    """passthrough's one source: a copy of its bytes, or computed when scaled or rounded first."""
    if len(tensor.sources) != 1:
        raise UsageError(f"{tensor.key}: passthrough takes exactly one model, not {len(tensor.sources)} (a slice of "
                         f"several sources needs another merge_method)")
    scale = tensor.scale if tensor.scale is not None else 1.0
    rounds = working is not None and source.dtype.name != working and (cast is None or cast.name != working)
    if scale == 1 and not rounds:
        built.copied += 1
        return _copy(source)
    values = _resolved(methods.METHODS["passthrough"], tensor, 1, {"scale": scale}, {})
    merge = _merge(methods.METHODS["passthrough"], values, tensor.key, [source], False, working, spools)
    built.merges[tensor.key] = merge
    built.merged += 1
    return streamed_tensor(merge, source.shape, cast or source.dtype)


def _copy(t: TensorRef) -> TensorRef:
    """`t` on a storage of its own (the same bytes, read where they lie): two output names made
    from one input tensor are two tensors, not a tie."""
    if t.quant is not None or not t.is_contiguous or t.math_bits:
        return computed_tensor(t.shape, t.dtype, t.data)
    start = t.storage.offset + t.offset * t.dtype.itemsize
    storage = Storage(t.storage.source, start, t.nbytes, t.storage.key, t.storage.location)
    return TensorRef(storage, 0, t.shape, t.stride, t.dtype)


# ---- the output ------------------------------------------------------------------------------

def _folder_output(write: WriteOptions) -> str | None:
    """The output folder, or None for weights alone (`-o FILE.safetensors`)."""
    output = write.output
    if not output.endswith(("/", os.sep)) and output.lower().endswith(".safetensors"):
        return None
    write.refuse("format", why="does not apply to a recipe's output folder (give -o FILE.safetensors for weights "
                               "alone)")
    folder = output.rstrip("/" + os.sep) or output
    if os.path.lexists(folder) and not os.path.isdir(folder):
        raise CkptError(f"{folder}: is a file; a recipe writes a folder (or give -o FILE.safetensors)")
    if os.path.lexists(folder) and not (write.force or write.dry_run):  # before anything is read
        raise CkptError(f"{folder}: already exists; pass --force to replace it")
    check_parent(os.path.join(folder, WEIGHTS_FILE))
    return folder


def _not_an_input(recipe: Recipe, output: str) -> None:
    """Refuse an output that would replace a model the recipe reads, the folder holding one, or
    a file inside one."""
    out = os.path.realpath(output.rstrip("/" + os.sep) or output)
    for model in recipe.referenced_models():
        for path in filter(lambda p: p and not is_remote(p), (model.path, model.lora)):
            real = os.path.realpath(path)
            inside = os.path.isdir(real) and out.startswith(real + os.sep)
            if real == out or real.startswith(out + os.sep) or inside:
                raise UsageError(f"-o {output}: would replace {path}, which the recipe reads; write elsewhere")


def _folder_plan(recipe: Recipe, plan: RecipePlan, keys: dict, pattern: str | None, text: str | None,
                 built: Built, fetched: dict[str, str]) -> FolderPlan:
    reference = plan.reference
    reference_layers = layer_scheme(keys[reference], str(reference), pattern).count if plan.layers else 0
    if recipe.slices is not None:
        layers_from = [s.sources[0].layer_range[0] + i for s in recipe.slices for i in range(s.length)]
    else:
        layers_from = list(range(plan.layers))
    tokenizer = recipe.tokenizer_source.model if recipe.tokenizer_source and recipe.tokenizer_source.model else None
    dtypes = {t.dtype.name for t in built.tensors.values() if t.dtype.floating}
    dtype = _written_dtype(recipe)
    models = [str(m) for m in recipe.referenced_models()]
    return FolderPlan(
        reference=reference.path, reference_layers=reference_layers or len(layers_from),
        layers_from=tuple(layers_from), dtype=dtype.name if dtype else (dtypes.pop() if len(dtypes) == 1 else None),
        tokenizer=(tokenizer or recipe.base_model or _first_model(recipe)).path, chat_template=recipe.chat_template,
        recipe_text=text, method=recipe.merge_method, models=tuple(models), base=_shown(recipe.base_model),
        template_models=tuple(m.path for m in template_models(recipe)), vocab_size=built.vocab_size,
        fetched=fetched)


def _first_model(recipe: Recipe) -> ModelRef:
    return recipe.models[0].model if recipe.models is not None else recipe.slices[0].sources[0].model


def _write_folder(folder: str, tensors: dict[str, TensorRef], write: WriteOptions, cast: DType | None,
                  inputs: list[Checkpoint], files: FolderFiles) -> Any:
    """The weights and the other files in a new folder, staged whole and renamed into place (an
    existing folder needs --force; it is replaced whole). Under torchrun each rank writes its
    share of the shards into rank 0's staged folder, and rank 0 the other files."""
    shard = write.max_shard_size if write.max_shard_size is not None else FOLDER_SHARD_SIZE
    weights = replace(write, output=os.path.join(folder, WEIGHTS_FILE), max_shard_size=shard)
    return write_checkpoint(tensors, weights, cast=cast, inputs=inputs, folder=FolderOutput(
        folder, files.names, lambda staged: write_folder_files(staged, files)))
