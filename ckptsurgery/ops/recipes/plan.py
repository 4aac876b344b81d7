"""A recipe made into the list of tensors to write, from the models' key names and shapes alone
(no tensor data read): per output key, the method, its sources (model + that model's key), the
parameters resolved for that key and `t`. What mergekit's MergePlanner does, without an
architecture file:

- `models:` — every key of the *reference* model (the base model, else the first listed) is
  written, in its order, merged from the same key of every model (the base is added when not
  listed, as mergekit adds it). A key the reference has and another model lacks is refused, named; keys
  only other models have are listed in `RecipePlan.ignored` (mergekit drops whatever its
  architecture file does not name, silently; we keep every key of the reference).
- `slices:` — the output's layers are the slices' layers one after another, renumbered from 0;
  a layer used twice is written twice (each copy its own keys). Each output layer holds the
  layer keys of the slice's first source at that layer, renamed to the output's number; the
  other sources give the same key (the same name but for the layer number) at their own layer.
  Keys outside the layers come from the first slice's models for the input side (embeddings)
  and from the last slice's for the output side (final norm, head), merged with the method as
  mergekit merges its architecture's pre- and post-weights (the latter from as many of the last
  slice's sources as the first slice has: mergekit zips the two). Which side: `side()`.
- `t`: layer i of a slice of n layers has t = i/(n − 1) (1 when n = 1 — mergekit's planner);
  a `models:` recipe is one slice of all the layers; keys outside the layers have t = 0.
- Parameters (values.resolve): the ones shared by the sources (`Planned.parameters`) from the
  slice, then the recipe, matched against the output key; each source's own
  (`Source.parameters`) from its entry, the slice, then the recipe, matched against the
  source's key — mergekit's ConfigReader.parameter_sources and resolve_parameters. Which
  parameters a method shares and which it takes per model is the method's declaration: both
  forms are resolved here for every name the recipe sets, the integration picks."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ...errors import CkptError, UsageError
from ...kinds import Kind
from .layers import LayerScheme, Template, layer_scheme, layer_t
from .schema import Filtered, Gradient, ModelRef, Recipe, Settings, Slice, SliceSource, setting_names, walk_settings
from .values import Coerce, resolve

Shape = tuple[int, ...]
KeySets = Mapping[ModelRef, Mapping[str, Shape]]


class Role(Kind):
    PRE = "pre"  # outside the layers, input side: from the first slice's models
    LAYER = "layer"
    POST = "post"  # outside the layers, output side: from the last slice's models


@dataclass(frozen=True)
class Source:
    model: ModelRef
    key: str
    shape: Shape
    parameters: tuple[tuple[str, Any], ...] = ()  # resolved for this source (per-model form)

    def parameter(self, name: str) -> Any:
        return next((v for k, v in self.parameters if k == name), None)


@dataclass(frozen=True)
class Planned:
    """One output tensor."""

    key: str
    role: Role  # LAYER, or the side of the layers a key outside them is on (all keys of a `models:`
    #             plan whose layers were not needed and could not be told apart)
    layer: int | None  # the output layer it is in
    t: float
    sources: tuple[Source, ...]
    base: ModelRef | None  # the slice's base model (None: none named)
    parameters: tuple[tuple[str, Any], ...] = ()  # resolved, shared by the sources

    def parameter(self, name: str) -> Any:
        return next((v for k, v in self.parameters if k == name), None)

    @property
    def scale(self) -> Any:
        """passthrough's `scale` (a per-model parameter in mergekit): its one source's."""
        return self.sources[0].parameter("scale") if self.sources else None


@dataclass(frozen=True)
class RecipePlan:
    method: str
    reference: ModelRef  # the model whose config.json the output takes
    tensors: tuple[Planned, ...]
    layers: int  # the output's layer count (num_hidden_layers)
    container: str | None  # where the reference's layers are (`model.layers`), None: none found
    ignored: tuple[tuple[ModelRef, str], ...] = ()  # keys of other models the output has no place for


# Which side of the layers a key outside them is on. The input side: a segment naming an
# embedding (a word part starting `emb`: embed_tokens, embeddings, wte-likes, pos_embed,
# rotary_pos_emb) or the input (`ln_pre`, `mm_input_projection`), or GPT-2's `wte`/`wpe`, T5's
# `shared`; the output side wins on any part naming it (`embed_out`, `lm_head`, `pre_classifier`,
# `final_layernorm`, `post_layernorm`, `pooler`). Everything else (`model.norm`, `ln_f`) is on
# the output side. Agrees with mergekit's architecture files' pre/post weights for every text
# model family it knows (tests/test_recipes_plan.py).
_PRE_SEGMENTS = frozenset({"wte", "wpe", "shared"})
_PRE_WORDS = frozenset({"pre", "input"})
_POST_WORDS = frozenset({"out", "output", "head", "classifier", "pooler", "score", "final", "post", "cls", "vocab",
                         "f"})
_WORD = re.compile(r"[a-z]+")


def side(key: str) -> Role:
    """PRE or POST for a key outside the layers (see the rule above)."""
    pre = False
    for segment in key.lower().split(".")[:-1] or key.lower().split("."):
        words = _WORD.findall(segment)
        if any(w in _POST_WORDS for w in words):
            return Role.POST
        pre = pre or segment in _PRE_SEGMENTS or any(w.startswith("emb") or w in _PRE_WORDS for w in words)
    return Role.PRE if pre else Role.POST


def plan_recipe(recipe: Recipe, key_sets: KeySets, layer_pattern: str | None = None,
                coerce: Mapping[str, Coerce] | None = None) -> RecipePlan:
    """The plan of `recipe` on models whose keys and shapes are `key_sets` (every model the
    recipe names, by its ModelRef; a `model+lora` one as it is after folding). `layer_pattern`:
    --layer-pattern; `coerce`: a parameter's conversion by name (values.py)."""
    missing = [m for m in _models(recipe) if m not in key_sets]
    if missing:
        raise ValueError(f"no key set given for {', '.join(map(str, missing))}")
    context = _Context(recipe, key_sets, layer_pattern, coerce or {})
    if recipe.models is not None:
        return _plan_models(context)
    return _plan_slices(context)


def _models(recipe: Recipe) -> list[ModelRef]:
    found = [e.model for e in recipe.models or ()] + [s.model for p in recipe.slices or () for s in p.sources]
    return found + ([recipe.base_model] if recipe.models is not None and recipe.base_model else [])


class _Context:
    """What planning one recipe shares: the key sets, each model's layers (found once), the
    parameter names."""

    def __init__(self, recipe: Recipe, key_sets: KeySets, pattern: str | None, coerce: Mapping[str, Coerce]):
        self.recipe, self.key_sets, self.pattern, self.coerce = recipe, key_sets, pattern, coerce
        self.names = tuple(setting_names(recipe))
        self.schemes: dict[ModelRef, LayerScheme] = {}
        self.by_layer: dict[ModelRef, dict[int, dict[Template, str]]] = {}  # layer -> template -> key, file order

    def scheme(self, model: ModelRef) -> LayerScheme:
        if model not in self.schemes:
            self.schemes[model] = layer_scheme(self.key_sets[model], str(model), self.pattern)
        return self.schemes[model]

    def layer_keys(self, model: ModelRef, layer: int) -> dict[Template, str]:
        """The keys of `model`'s layer `layer`, by their name without the number (two stacks
        one --layer-pattern numbers, `encoder.block.3.x` and `decoder.block.3.x`, stay two)."""
        if model not in self.by_layer:
            table: dict[int, dict[Template, str]] = {}
            scheme = self.scheme(model)
            for key in self.key_sets[model]:
                index, template = scheme.split(key)
                if index is not None:
                    table.setdefault(index, {})[template] = key
            self.by_layer[model] = table
        return self.by_layer[model].get(layer, {})

    def shared(self, piece: Slice, key: str, t: float) -> tuple[tuple[str, Any], ...]:
        return self._resolved((piece.parameters, self.recipe.parameters), key, t)

    def own(self, piece: Slice, source: SliceSource, key: str, t: float) -> tuple[tuple[str, Any], ...]:
        # `source` is one of the slice's, which names each model once (_no_repeats): its own
        # parameters are its entry's (not looked for among the slice's sources: a slice of n
        # sources would cost n² per key)
        return self._resolved((source.parameters, piece.parameters, self.recipe.parameters), key, t)

    def _resolved(self, scopes: Sequence[Settings], key: str, t: float) -> tuple[tuple[str, Any], ...]:
        named = [n for n in self.names if any(n in scope for scope in scopes)]
        found = ((n, resolve(scopes, n, key, t, self.coerce.get(n))) for n in named)
        return tuple((n, v) for n, v in found if v is not None)

    def source(self, piece: Slice, source: SliceSource, key: str, t: float) -> Source:
        return Source(source.model, key, tuple(self.key_sets[source.model][key]), self.own(piece, source, key, t))

    def base(self, piece: Slice) -> ModelRef | None:
        return piece.base_model or self.recipe.base_model


# ---- models: ----------------------------------------------------------------------------------

def _plan_models(context: _Context) -> RecipePlan:
    recipe = context.recipe
    reference = recipe.base_model or recipe.models[0].model
    sources = [SliceSource(e.model, (0, 1), e.parameters) for e in recipe.models]
    if recipe.base_model and all(s.model != recipe.base_model for s in sources):
        sources.append(SliceSource(recipe.base_model, (0, 1)))  # mergekit adds the base, with no parameters
    _no_repeats([s.model for s in sources], "models")
    piece = Slice(tuple(sources))
    scheme = _models_scheme(context, reference, [s.model for s in sources])
    reference_keys = context.key_sets[reference]
    tensors = []
    for key in reference_keys:
        layer = scheme.layer_of(key) if scheme else None
        t = 0.0 if layer is None else layer_t(layer, scheme.count)
        for source in sources:
            if key not in context.key_sets[source.model]:
                raise CkptError(f"{source.model} has no tensor {key!r}, which {reference} has: every model of a "
                                f"`models:` recipe must hold every key of {_reference_wording(recipe)}")
        tensors.append(Planned(key, Role.LAYER if layer is not None else side(key), layer, t,
                               tuple(context.source(piece, s, key, t) for s in sources), recipe.base_model,
                               context.shared(piece, key, t)))
    ignored = tuple((s.model, k) for s in sources if s.model != reference
                    for k in context.key_sets[s.model] if k not in reference_keys)
    return RecipePlan(recipe.merge_method, reference, tuple(tensors), scheme.count if scheme else 0,
                      scheme.container if scheme else None, ignored)


def _models_scheme(context: _Context, reference: ModelRef, models: list[ModelRef]) -> LayerScheme | None:
    """The reference's layers — needed for gradients only: a recipe without one whose models'
    layers cannot be told apart is planned without them (every `t` is 0 and unused)."""
    try:
        schemes = [context.scheme(m) for m in dict.fromkeys([reference, *models])]
    except UsageError:
        if _has_gradient(context.recipe) or context.pattern is not None:
            raise
        return None
    counts = {str(m): context.scheme(m).count for m in dict.fromkeys([reference, *models])}
    if len(set(counts.values())) > 1:
        shown = ", ".join(f"{m}: {n}" for m, n in counts.items())
        raise UsageError(f"the models of a `models:` recipe must have as many layers ({shown}); use `slices:` to "
                         f"choose layers")
    return schemes[0]


def _has_gradient(recipe: Recipe) -> bool:
    def gradient(setting) -> bool:
        if isinstance(setting, Filtered):
            return any(isinstance(e.value, Gradient) for e in setting.entries)
        return isinstance(setting, Gradient)

    return any(gradient(v) for _, settings in walk_settings(recipe) for _, v in settings.items)


def _reference_wording(recipe: Recipe) -> str:
    return "the base model" if recipe.base_model else "the first model"


def _no_repeats(models: list[ModelRef], where: str) -> None:
    seen = set()
    for model in models:
        if model in seen:
            raise UsageError(f"{where}: {model} is named twice (a model is merged with itself once)")
        seen.add(model)


# ---- slices: ----------------------------------------------------------------------------------

def _plan_slices(context: _Context) -> RecipePlan:
    recipe = context.recipe
    for i, piece in enumerate(recipe.slices):
        _no_repeats([s.model for s in piece.sources], f"slices[{i}].sources")
        for j, source in enumerate(piece.sources):
            count = context.scheme(source.model).count
            if count == 0:
                raise UsageError(f"slices[{i}].sources[{j}]: no layers found in {source.model} to slice")
            if source.layer_range[1] > count:
                raise UsageError(f"slices[{i}].sources[{j}].layer_range [{source.layer_range[0]}, "
                                 f"{source.layer_range[1]}) goes past {source.model}'s {count} layers")
    first, last = recipe.slices[0], recipe.slices[-1]
    pre = _outside(context, first, Role.PRE)
    layers, ignored, out = [], [], 0
    for piece in recipe.slices:
        for offset in range(piece.length):
            t = layer_t(offset, piece.length)
            layers += _plan_layer(context, piece, offset, out, t, ignored)
            out += 1
    post = _outside(context, last, Role.POST, first)
    reference = recipe.base_model or first.sources[0].model
    return RecipePlan(recipe.merge_method, reference, tuple(pre + layers + post), out,
                      context.scheme(first.sources[0].model).container, tuple(ignored))


def _plan_layer(context: _Context, piece: Slice, offset: int, out: int, t: float, ignored: list) -> list[Planned]:
    """Output layer `out`: layer start + offset of each of the slice's sources."""
    lead = piece.sources[0]
    keys = [context.layer_keys(s.model, s.layer_range[0] + offset) for s in piece.sources]
    planned = []
    for template, lead_key in keys[0].items():
        key = template.key(out)
        sources = []
        for source, theirs in zip(piece.sources, keys):
            if template not in theirs:
                raise CkptError(f"{source.model} has no key for {lead_key!r} in its layer "
                                f"{source.layer_range[0] + offset} (no {str(template)!r}), which "
                                f"{lead.model} has: the sources of a slice must hold the same keys")
            sources.append(context.source(piece, source, theirs[template], t))
        planned.append(Planned(key, Role.LAYER, out, t, tuple(sources), context.base(piece),
                               context.shared(piece, key, t)))
    for source, theirs in zip(piece.sources[1:], keys[1:]):
        ignored += [(source.model, k) for template, k in theirs.items() if template not in keys[0]]
    return planned


def _outside(context: _Context, piece: Slice, role: Role, keys_of: Slice | None = None) -> list[Planned]:
    """The keys outside the layers on `role`'s side, from `piece`'s models (mergekit: the
    first slice's for the pre-weights; the last slice's for the post-weights, as many as the
    first slice has sources)."""
    sources = piece.sources[:len(keys_of.sources)] if keys_of else piece.sources
    lead = sources[0].model
    scheme = context.scheme(lead)
    planned = []
    for key in context.key_sets[lead]:
        if scheme.layer_of(key) is not None or side(key) != role:
            continue
        for source in sources:
            if key not in context.key_sets[source.model]:
                raise CkptError(f"{source.model} has no tensor {key!r}, which {lead} has: the models a slice "
                                f"takes the {'embeddings' if role == Role.PRE else 'final tensors'} from must "
                                f"hold the same keys")
        planned.append(Planned(key, role, None, 0.0, tuple(context.source(piece, s, key, 0.0) for s in sources),
                               context.base(piece), context.shared(piece, key, 0.0)))
    return planned


def plan_lines(plan: RecipePlan, shown: Callable[[Any], str] = str) -> list[str]:
    """The plan as --dry-run prints it: one line per output tensor — its sources, each with its
    own parameters in braces, then `t` and the shared parameters."""
    lines = []
    for tensor in plan.tensors:
        sources = ", ".join(f"{s.model}:{s.key}" + _braced(s.parameters, shown) for s in tensor.sources)
        values = " ".join(f"{k}={shown(v)}" for k, v in tensor.parameters)
        lines.append(f"{tensor.key} <- {plan.method}({sources}) t={tensor.t:g} {values}".rstrip())
    return lines


def _braced(parameters: tuple[tuple[str, Any], ...], shown: Callable[[Any], str]) -> str:
    return "{" + " ".join(f"{k}={shown(v)}" for k, v in parameters) + "}" if parameters else ""
