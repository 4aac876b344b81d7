"""A mergekit 0.1.5 recipe (the YAML `mergekit-yaml` reads) read into frozen, typed objects.

What is read, as mergekit's `MergeConfiguration` reads it: `models:` (each `model`,
`parameters`) or `slices:` (each `sources:`, each `model`, `layer_range: [start, end)`,
`parameters`; a slice's own `parameters` and `base_model`), `merge_method`, `base_model`,
`parameters`, `dtype`, `out_dtype`, `tokenizer_source` (`base` or a model), `chat_template`.
`model+adapter` names a model with a LoRA adapter to fold first.

Where we are stricter than mergekit (pydantic ignores keys it does not know): a key that is not
part of the schema is refused, named with where it is (`slices[0].sources[1]: unknown key
'modle'`), because an ignored misspelling (`filter` written `pattern`, as mergekit's older
examples did) silently merges something else. A model on the Hub is written `hf://ORG/REPO[@REV]`
(mergekit's bare `ORG/REPO@REV` is refused, saying so: a path that does not exist here is never
fetched unasked). What mergekit has but we do not do yet (`modules:`, `tokenizer:`,
`tokenizer_source: union`) is refused with one line saying so. Parameter *names* are not checked here: which ones a method takes is the
method's business (the registry in ops/methods).

A recipe file is bounded (MAX_BYTES) and so is what it expands to (MAX_VALUES values: YAML
aliases can make a small file name a huge tree — a "billion laughs" — which PyYAML builds
cheaply, sharing the repeated parts, but which any walk over it would expand)."""

from __future__ import annotations

import difflib
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...errors import CkptError, UsageError
from ...kinds import Kind

MAX_BYTES = 4 << 20  # a recipe is a few hundred bytes; the biggest real ones a few KB
MAX_VALUES = 100_000  # values (mappings, lists, scalars) the parsed recipe may hold, aliases expanded
DTYPES = ("bfloat16", "float16", "float32", "float64", "int64")  # mergekit's dtype_from_name

Scalar = bool | int | float | str


@dataclass(frozen=True)
class ModelRef:
    """A model, and the LoRA adapter to fold into it first (mergekit's `path+adapter`)."""

    path: str
    lora: str | None = None

    def __str__(self) -> str:
        return self.path if self.lora is None else f"{self.path}+{self.lora}"


@dataclass(frozen=True)
class Gradient:
    """A list of values spread over the layers (see values.evaluate); numbers interpolate,
    other values (booleans, text) are picked."""

    values: tuple[Scalar, ...]
    # values.py's converted values, by conversion: a plan asks once per tensor and source, and a
    # gradient may hold 10^5 values (each converted once, not once per tensor)
    _converted: dict = field(default_factory=dict, init=False, repr=False, compare=False)


@dataclass(frozen=True)
class Conditional:
    """One `{filter: SUBSTRING, value: ...}` entry; no filter (or `*`): every tensor."""

    filter: str | None
    value: Scalar | Gradient


@dataclass(frozen=True)
class Filtered:
    """A list of conditional entries: the first whose filter is in the tensor's name wins."""

    entries: tuple[Conditional, ...]


Setting = Scalar | Gradient | Filtered


@dataclass(frozen=True)
class Settings:
    """The `parameters:` of one place of the recipe, in the file's order."""

    items: tuple[tuple[str, Setting], ...] = ()
    _by_name: dict = field(init=False, repr=False, compare=False)  # a plan asks once per tensor and source

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_name", dict(self.items))

    def get(self, name: str) -> Setting | None:
        return self._by_name.get(name)

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(k for k, _ in self.items)


@dataclass(frozen=True)
class ModelEntry:
    model: ModelRef
    parameters: Settings = Settings()


@dataclass(frozen=True)
class SliceSource:
    model: ModelRef
    layer_range: tuple[int, int]  # [start, end)
    parameters: Settings = Settings()

    @property
    def length(self) -> int:
        return self.layer_range[1] - self.layer_range[0]


@dataclass(frozen=True)
class Slice:
    sources: tuple[SliceSource, ...]
    parameters: Settings = Settings()
    base_model: ModelRef | None = None  # this slice's base, instead of the recipe's

    @property
    def length(self) -> int:
        return self.sources[0].length


class TokenizerKind(Kind):
    BASE = "base"  # the base model's (or the first model's)
    MODEL = "model"  # the named model's


@dataclass(frozen=True)
class TokenizerSource:
    kind: TokenizerKind
    model: ModelRef | None = None


@dataclass(frozen=True)
class Recipe:
    """One recipe: exactly one of `models` and `slices` is set."""

    merge_method: str
    models: tuple[ModelEntry, ...] | None = None
    slices: tuple[Slice, ...] | None = None
    base_model: ModelRef | None = None
    parameters: Settings = Settings()
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: TokenizerSource | None = None
    chat_template: str | None = None
    notes: tuple[str, ...] = ()  # what was read but changes nothing (mergekit ignores it too)

    def referenced_models(self) -> tuple[ModelRef, ...]:
        """Every model the recipe names, each once, in the file's order (the base first when
        it is named apart)."""
        found = [self.base_model] if self.base_model else []
        for entry in self.models or ():
            found.append(entry.model)
        for piece in self.slices or ():
            found += [s.model for s in piece.sources] + ([piece.base_model] if piece.base_model else [])
        if isinstance(self.tokenizer_source, TokenizerSource) and self.tokenizer_source.model:
            found.append(self.tokenizer_source.model)
        return tuple(dict.fromkeys(found))


# ---- reading ---------------------------------------------------------------------------------

_TOP = ("models", "slices", "merge_method", "base_model", "parameters", "dtype", "out_dtype", "tokenizer_source",
        "chat_template")
_NOT_YET = {  # mergekit keys we do not do: refused, saying so (never silently ignored)
    "modules": "per-module recipes (`modules:`) are not supported; use `models:` or `slices:`",
    "tokenizer": "`tokenizer:` (building a tokenizer, added tokens) is not supported; use `tokenizer_source: base` "
                 "or a model",
}


def load_recipe(source: str | os.PathLike) -> Recipe:
    """A recipe from a file (a path: `Path` or any os.PathLike) or from YAML text (a str).
    A file that cannot be read or is not YAML is a CkptError; a recipe that is not mergekit's
    schema a UsageError naming the key and where it is."""
    if isinstance(source, os.PathLike):
        return read_recipe(source)[0]
    return _from_text(source, "recipe")


def read_recipe(path: str | os.PathLike) -> tuple[Recipe, str]:
    """A recipe file read once (bounded, UTF-8): the recipe and the file's exact text (a BOM kept),
    which a merged folder keeps as its copy of the recipe — read again, a pipe (`--config
    /dev/stdin`) would give nothing and a file changed meanwhile another recipe."""
    raw = _read_bytes(Path(path))
    return _from_text(_decoded(raw, Path(path)), str(path)), raw.decode("utf-8")


def _from_text(text: str, where: str) -> Recipe:
    data = _parse_yaml(text, where)
    _count_values(data, where)
    return _recipe(data, where)


def _read_bytes(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > MAX_BYTES:
                raise CkptError(f"{path}: {size} bytes is too large for a recipe (at most {MAX_BYTES >> 20} MB)")
            raw = f.read(MAX_BYTES + 1)
    except OSError as e:
        raise CkptError(f"{path}: cannot read the recipe ({e.strerror or e})") from None
    if len(raw) > MAX_BYTES:  # grew while read, or not a regular file
        raise CkptError(f"{path}: too large for a recipe (at most {MAX_BYTES >> 20} MB)")
    return raw


def _decoded(raw: bytes, path: Path) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise CkptError(f"{path}: the recipe is not UTF-8 text (byte {e.start})") from None


def _parse_yaml(text: str, where: str) -> Any:
    if len(text) > MAX_BYTES:
        raise CkptError(f"{where}: too large for a recipe (at most {MAX_BYTES >> 20} MB)")
    import yaml  # only recipes need it

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        _count_nodes(yaml, text, loader, where)
        return yaml.load(text, Loader=loader)  # a safe loader: plain data only
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = "holds more than one document (mergekit-multi's form)" if "another document" in str(e.problem) \
            else f"is not valid YAML: {e.problem}"
        raise CkptError(f"{where}: the recipe {problem}{at}") from None
    except yaml.YAMLError as e:
        raise CkptError(f"{where}: the recipe is not valid YAML: {str(e).splitlines()[0]}") from None
    except RecursionError:
        raise CkptError(f"{where}: the recipe is nested too deeply") from None
    except ValueError as e:  # PyYAML's int() of a number of more than 4300 digits
        raise CkptError(f"{where}: the recipe holds a value that cannot be read ({str(e)[:80]})") from None


def _count_nodes(yaml, text: str, loader, where: str) -> None:
    """Refuse a recipe that writes more than MAX_VALUES values out, from the parser's events, before
    any is built: 4 MB of `1,` are two million values, which PyYAML built in 8 s and 750 MB only
    for _count_values to refuse them (aliases are counted there, expanded)."""
    nodes = (yaml.ScalarEvent, yaml.SequenceStartEvent, yaml.MappingStartEvent)
    count = 0
    for event in yaml.parse(text, Loader=loader):
        if isinstance(event, nodes):
            count += 1
            if count > MAX_VALUES:
                raise CkptError(f"{where}: the recipe holds more than {MAX_VALUES} values; not read")


def _count_values(data: Any, where: str) -> None:
    """Refuse a recipe that expands to more than MAX_VALUES values, or holds itself, without
    expanding it: each distinct object (YAML aliases share them) is sized once. The tuples of
    `!!pairs` and `!!omap` are containers too: their anchors and aliases count as a list's."""
    sizes: dict[int, int] = {}
    open_: set[int] = set()  # being sized: meeting one again is a cycle (`&a [*a]`)
    stack: list[tuple[Any, bool]] = [(data, False)]
    while stack:
        node, done = stack.pop()
        children = [*node.keys(), *node.values()] if isinstance(node, dict) else \
            list(node) if isinstance(node, (list, tuple)) else []
        if not done:
            if id(node) in sizes:
                continue
            if id(node) in open_:
                raise CkptError(f"{where}: the recipe holds itself (a YAML alias inside its own anchor); not read")
            if children:
                open_.add(id(node))
                stack.append((node, True))
                stack.extend((c, False) for c in {id(c): c for c in children}.values() if id(c) not in sizes)
                continue
        open_.discard(id(node))
        total = sizes[id(node)] = 1 + sum(sizes.get(id(c), 1) for c in children)
        if total > MAX_VALUES:
            raise CkptError(f"{where}: the recipe expands to more than {MAX_VALUES} values (YAML aliases repeating "
                            f"aliases?); not read")


def _recipe(data: Any, where: str) -> Recipe:
    if not isinstance(data, dict):
        raise UsageError(f"{where}: a recipe is a mapping of keys (merge_method, models or slices, ...), "
                         f"not {_kind(data)}")
    for key in data:
        if key in _NOT_YET:
            raise UsageError(f"{where}: {_NOT_YET[key]}")
    _known(data, _TOP, where, "")
    if ("models" in data) == ("slices" in data):
        raise UsageError(f"{where}: a recipe has exactly one of `models:` and `slices:`")
    method = data.get("merge_method")
    if not isinstance(method, str) or not method:
        raise UsageError(f"{where}: `merge_method:` (the method's name) is required")
    notes: list[str] = []
    models = slices = None
    if "models" in data:
        models = tuple(_model_entry(e, where, f"models[{i}]") for i, e in enumerate(_list(data, "models", where, "")))
    else:
        slices = tuple(_slice(s, where, f"slices[{i}]", notes) for i, s in enumerate(_list(data, "slices", where, "")))
    return Recipe(
        merge_method=method,
        models=models,
        slices=slices,
        base_model=_optional_model(data.get("base_model"), where, "base_model"),
        parameters=_settings(data.get("parameters"), where, "parameters"),
        dtype=_dtype(data.get("dtype"), where, "dtype"),
        out_dtype=_dtype(data.get("out_dtype"), where, "out_dtype"),
        tokenizer_source=_tokenizer_source(data.get("tokenizer_source"), where),
        chat_template=_optional_text(data.get("chat_template"), where, "chat_template"),
        notes=tuple(notes),
    )


def _model_entry(data: Any, where: str, at: str) -> ModelEntry:
    _mapping(data, where, at)
    _known(data, ("model", "parameters"), where, at)
    return ModelEntry(_required_model(data, where, at), _settings(data.get("parameters"), where, f"{at}.parameters"))


def _slice(data: Any, where: str, at: str, notes: list[str]) -> Slice:
    _mapping(data, where, at)
    _known(data, ("sources", "parameters", "base_model", "residual_weight"), where, at)
    if "residual_weight" in data:
        notes.append(f"{at}.residual_weight is ignored, as mergekit 0.1.5 ignores it")
    sources = tuple(_source(s, where, f"{at}.sources[{i}]") for i, s in enumerate(_list(data, "sources", where, at)))
    lengths = {s.length for s in sources}
    if len(lengths) > 1:
        raise UsageError(f"{where}: {at}: every source of a slice must have as many layers (here "
                         f"{', '.join(str(s.length) for s in sources)})")
    return Slice(sources, _settings(data.get("parameters"), where, f"{at}.parameters"),
                 _optional_model(data.get("base_model"), where, f"{at}.base_model"))


def _source(data: Any, where: str, at: str) -> SliceSource:
    _mapping(data, where, at)
    _known(data, ("model", "layer_range", "parameters"), where, at)
    span = data.get("layer_range")
    if not (isinstance(span, list) and len(span) == 2 and all(type(v) is int for v in span)):
        raise UsageError(f"{where}: {at}.layer_range must be [start, end): two whole numbers")
    start, end = span
    if not 0 <= start < end:
        raise UsageError(f"{where}: {at}.layer_range [{start}, {end}) must have 0 <= start < end")
    return SliceSource(_required_model(data, where, at), (start, end),
                       _settings(data.get("parameters"), where, f"{at}.parameters"))


def _settings(data: Any, where: str, at: str) -> Settings:
    if data is None:  # `parameters:` with nothing under it
        return Settings()
    if not isinstance(data, dict):
        raise UsageError(f"{where}: {at} must map parameter names to values, not {_kind(data)}")
    items = []
    for name, value in data.items():
        if not isinstance(name, str):
            raise UsageError(f"{where}: {at}: parameter name {name!r} is not text")
        items.append((name, _setting(value, where, f"{at}.{name}")))
    return Settings(tuple(items))


def _setting(data: Any, where: str, at: str) -> Setting:
    """mergekit's ParameterSetting: a scalar, a gradient (list of scalars), one `{filter, value}`
    mapping or a list of them."""
    if isinstance(data, dict):
        return Filtered((_conditional(data, where, at),))
    if isinstance(data, list):
        if data and all(isinstance(e, dict) for e in data):
            return Filtered(tuple(_conditional(e, where, f"{at}[{i}]") for i, e in enumerate(data)))
        return _gradient(data, where, at)  # [] included: it gives no value, as in mergekit
    return _scalar(data, where, at)


def _conditional(data: dict, where: str, at: str) -> Conditional:
    _known(data, ("filter", "value"), where, at)
    if "value" not in data:
        raise UsageError(f"{where}: {at} has no `value:`")
    text = data.get("filter")
    if text is not None and not isinstance(text, str):
        raise UsageError(f"{where}: {at}.filter must be text (a part of tensor names), not {_kind(text)}")
    value = data["value"]
    value = _gradient(value, where, f"{at}.value") if isinstance(value, list) else _scalar(value, where, f"{at}.value")
    return Conditional(text, value)


def _gradient(data: list, where: str, at: str) -> Gradient:
    return Gradient(tuple(_scalar(e, where, f"{at}[{i}]") for i, e in enumerate(data)))


def _scalar(data: Any, where: str, at: str) -> Scalar:
    if isinstance(data, float) and not math.isfinite(data):
        raise UsageError(f"{where}: {at}: {data} is not a finite number")
    if isinstance(data, int) and not isinstance(data, bool) and not _fits_float(data):
        raise UsageError(f"{where}: {at}: {str(data)[:40]}… is beyond a float's range")
    if isinstance(data, (bool, int, float, str)):
        return data
    shown = "a list mixing values and {filter, value} entries" if isinstance(data, (list, dict)) else _kind(data)
    raise UsageError(f"{where}: {at} must be a number, true/false, text, a list of them (a gradient) or "
                     f"{{filter, value}} entries, not {shown}")


def _fits_float(value: int) -> bool:
    """A whole number a float can hold (a parameter's value is made one: mergekit's pydantic float)."""
    try:
        float(value)
    except OverflowError:
        return False
    return True


def _required_model(data: dict, where: str, at: str) -> ModelRef:
    if data.get("model") is None:
        raise UsageError(f"{where}: {at} has no `model:`")
    return _model(data["model"], where, f"{at}.model")


def _optional_model(data: Any, where: str, at: str) -> ModelRef | None:
    return None if data is None else _model(data, where, at)


def _model(data: Any, where: str, at: str) -> ModelRef:
    """`path` or `path+adapter`, as mergekit's ModelReference reads it (or its mapping form)."""
    if isinstance(data, dict):
        _known(data, ("model", "lora"), where, at)
        path, lora = data.get("model"), data.get("lora")
        if not isinstance(path, str) or not (lora is None or isinstance(lora, str)):
            raise UsageError(f"{where}: {at}: `model` (and `lora`) must be paths")
        return ModelRef(_path(path, where, at), None if lora is None else _path(lora, where, at))
    if not isinstance(data, str) or not data:
        raise UsageError(f"{where}: {at} must be a model's path, not {_kind(data)}")
    parts = data.split("+")
    if len(parts) > 2:
        raise UsageError(f"{where}: {at} {data!r}: more than one '+' (the form is MODEL or MODEL+ADAPTER)")
    return ModelRef(_path(parts[0], where, at), _path(parts[1], where, at) if len(parts) == 2 else None)


def _path(text: str, where: str, at: str) -> str:
    if not text:
        raise UsageError(f"{where}: {at}: an empty path")
    if "\0" in text:  # no file has one: os.stat refused it in the catch-all
        raise UsageError(f"{where}: {at} {text!r}: a path with a NUL character")
    if "@" in text and not text.startswith("hf://"):  # mergekit's hub revision (`repo@rev`)
        raise UsageError(f"{where}: {at} {text!r}: `@revision` names a hub revision; write the model as "
                         f"hf://ORG/REPO@REVISION (or give a local path)")
    return text


def _dtype(data: Any, where: str, at: str) -> str | None:
    if data is None:
        return None
    name = data.removeprefix("torch.") if isinstance(data, str) else data
    if name not in DTYPES:
        raise UsageError(f"{where}: {at} {data!r}: not one of {', '.join(DTYPES)}")
    return name


def _tokenizer_source(data: Any, where: str) -> TokenizerSource | None:
    if data is None:
        return None
    if data == "union":
        raise UsageError(f"{where}: tokenizer_source: union (a tokenizer built from every model's) is not supported; "
                         f"use `base` or a model")
    if data == "base":
        return TokenizerSource(TokenizerKind.BASE)
    return TokenizerSource(TokenizerKind.MODEL, _model(data, where, "tokenizer_source"))


def _optional_text(data: Any, where: str, at: str) -> str | None:
    if data is not None and not isinstance(data, str):
        raise UsageError(f"{where}: {at} must be text, not {_kind(data)}")
    return data


# ---- shared checks ---------------------------------------------------------------------------

def _known(data: dict, keys: tuple[str, ...], where: str, at: str) -> None:
    for key in data:
        if key not in keys:
            near = difflib.get_close_matches(str(key), keys, n=1)
            hint = f"did you mean {near[0]!r}?" if near else f"known: {', '.join(keys)}"
            place = f"{at}: " if at else ""
            raise UsageError(f"{where}: {place}unknown key {str(key)[:60]!r} ({hint})")


def _mapping(data: Any, where: str, at: str) -> None:
    if not isinstance(data, dict):
        raise UsageError(f"{where}: {at} must be a mapping of keys, not {_kind(data)}")


def _list(data: dict, key: str, where: str, at: str) -> list:
    value = data.get(key)
    place = f"{at}.{key}" if at else key
    if not isinstance(value, list) or not value:
        raise UsageError(f"{where}: {place} must be a non-empty list")
    return value


def _kind(data: Any) -> str:
    if data is None:
        return "nothing (null)"
    return {dict: "a mapping", list: "a list", str: f"text {str(data)[:40]!r}"}.get(type(data), f"{str(data)[:40]!r}")


def walk_settings(recipe: Recipe) -> Iterator[tuple[str, Settings]]:
    """Every `parameters:` of the recipe, with where it is (`parameters`, `models[1].parameters`,
    `slices[0].sources[1].parameters`) — for checking the names against the method."""
    yield "parameters", recipe.parameters
    for i, entry in enumerate(recipe.models or ()):
        yield f"models[{i}].parameters", entry.parameters
    for i, piece in enumerate(recipe.slices or ()):
        yield f"slices[{i}].parameters", piece.parameters
        for j, source in enumerate(piece.sources):
            yield f"slices[{i}].sources[{j}].parameters", source.parameters


def setting_names(recipe: Recipe) -> Mapping[str, str]:
    """Every parameter name the recipe sets -> the first place it is set."""
    found: dict[str, str] = {}
    for at, settings in walk_settings(recipe):
        for name in settings.names:
            found.setdefault(name, f"{at}.{name}")
    return found


def refuse_unknown_parameters(recipe: Recipe, accepted: Iterable[str], method: str | None = None) -> None:
    """A UsageError naming the first parameter the recipe sets that `method` (the recipe's
    merge_method by default) does not take, and where it is set."""
    accepted = set(accepted)
    for name, at in setting_names(recipe).items():
        if name not in accepted:
            near = difflib.get_close_matches(name, sorted(accepted), n=1)
            hint = f"did you mean {near[0]!r}? " if near else ""
            takes = ", ".join(sorted(accepted)) or "no parameters"
            raise UsageError(f"{at}: {method or recipe.merge_method} does not take {name!r} ({hint}it takes: {takes})")
