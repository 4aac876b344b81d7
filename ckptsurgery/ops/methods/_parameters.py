"""A merge method's parameters: each declared once (`Parameter`: its type, default, range, help,
and whether it may vary per model and per tensor), checked when given (`Parameter.resolve`), and
held, resolved, by `Parameters`, which a key's merge asks for that key's values.

The parameters several methods share are declared at the bottom; a parameter of one method only
is declared in that method's module. One name is one parameter: the registry refuses two
declarations of the same name."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

from ...errors import UsageError


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()  # the default of a parameter that must be given


class Range(NamedTuple):  # a NamedTuple, not a dataclass: ~0.3 ms less at every start of the command
    """The values a parameter takes, and how a message and the docs say so ("in (0, 1]")."""

    contains: Callable[[Any], bool]
    wording: str


FINITE = Range(lambda v: True, "a finite number")  # every number given must be finite anyway
FRACTION = Range(lambda v: 0 < v <= 1, "in (0, 1]")
UNIT_INTERVAL = Range(lambda v: 0 <= v <= 1, "in [0, 1]")
NON_NEGATIVE = Range(lambda v: v >= 0, "a whole number, 0 or more")


def option_of(name: str) -> str:
    """The command line's spelling of a parameter (the library's keyword): --with-dashes."""
    return "--" + name.replace("_", "-")


@dataclass(frozen=True)
class Parameter:
    """One parameter of the merge methods, named as its option (`--{name}`) and the library's keyword.

    `type` is one value's: float, int or bool (a bool is a flag pair on the command line,
    `--name/--no-name`, and true/false in a recipe). A `per_model` one takes one value per model
    (a list, or "a,b,c" on the command line), `each` naming one of them in messages; with
    `broadcast` one value may also stand for every model (`--density 0.5` or `--density 0.5,0.7`),
    and is held as given: a number, or a list. `per_tensor`: the value may depend on the key
    (`Parameters.varying`); a float one that is not per model also takes a gradient over the
    layers ("0,0.5,1": `gradient`).

    Two methods that take the same parameter with another default or range declare a `variant`
    of it (one name is one parameter: same type, per model and per tensor alike)."""

    name: str
    help: str  # what it does, for --help and the docs; which methods take it is added there
    metavar: str
    type: type = float
    default: Any = REQUIRED
    range: Range = FINITE
    per_model: bool = False
    per_tensor: bool = True  # every parameter but the seed: a method reads its key's values, whatever they are
    each: str = "value"
    broadcast: bool = False
    of: Parameter | None = field(default=None, compare=False, repr=False)  # the declaration this is a variant of

    def __post_init__(self) -> None:
        if self.type not in (float, int, bool) or (self.per_model and self.type is not float) or (
                self.broadcast and not self.per_model):
            raise TypeError(f"parameter {self.name}: a float, an int, a bool, or floats per model")

    def variant(self, **changes: Any) -> Parameter:
        """This parameter as another method takes it: another default, range or help."""
        if {"name", "type", "per_model", "per_tensor", "broadcast"} & set(changes):
            raise TypeError(f"parameter {self.name}: a variant changes its default, range, help or metavar only")
        return replace(self, of=self.origin, **changes)

    @property
    def origin(self) -> Parameter:
        """The declaration this parameter is (a variant of)."""
        return self.of or self

    @property
    def option(self) -> str:
        return option_of(self.name)

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    @property
    def takes_gradient(self) -> bool:
        """Whether a list of values is a gradient over the layers (--t 0,0.5,1): for a float that
        is one value for every model and may vary per tensor (a per-model one's list is per model)."""
        return self.type is float and not self.per_model and self.per_tensor

    def _one(self, value: Any) -> str:
        if self.type is bool:
            return "true" if value else "false"
        return f"{value:g}" if self.type is float else str(value)

    def shown(self, value: Any) -> str:
        """A resolved value as a summary shows it: "2,1,1" per model, "0 → 0.5 → 1" a gradient
        (first layer to last), 0.5, 3, true."""
        if isinstance(value, (list, tuple)):
            return (" → " if self.takes_gradient else ",").join(f"{v:g}" for v in value)
        return self._one(value)

    def default_wording(self) -> str:
        if self.required:
            return "required"
        shown = self._one(self.default)
        return f"{shown} each" if self.per_model and not self.broadcast else shown

    def range_wording(self) -> str:
        if self.type is bool:
            return "true or false"
        if self.broadcast:
            return f"{self.range.wording}, one or one per model"
        return f"each {self.range.wording}" if self.per_model else self.range.wording

    def resolve(self, raw: Any, method: str, models: int) -> Any:
        """The value used for `raw` (None: not given), checked; a UsageError says what is wrong."""
        if raw is None and self.required:
            raise UsageError(f"--method {method} needs {self.option}")
        if self.type is bool:
            value = self.default if raw is None else raw
            if not isinstance(value, bool):
                raise UsageError(f"{self.option} {value!r}: must be true or false")
            return value
        if self.per_model:
            if _nested(raw):  # a gradient per model: the command line has no spelling for it
                alone = " or one for all" if self.broadcast else ""
                raise UsageError(f"{self.option} {raw!r}: one {self.each} per model{alone}; a gradient over the layers "
                                 f"per model needs a recipe (merge --config RECIPE.yml)")
            if self.broadcast and (raw is None or isinstance(raw, (int, float)) or (
                    isinstance(raw, str) and "," not in raw)):
                return self._number(self.default if raw is None else raw)
            return self._per_model(raw, models)
        if self.type is int:
            value = self.default if raw is None else _whole(raw)
            if isinstance(value, bool) or not isinstance(value, int) or not self.range.contains(value):
                raise UsageError(f"{self.option} {value!r}: must be {self.range.wording}")
            return value
        return self._number(self.default if raw is None else raw)

    def gradient(self, raw: Any) -> tuple[float, ...] | None:
        """`raw` as a gradient over the layers — "0,0.5,1" (the command line) or a list of 2 or
        more numbers (the library), each checked as one value is — or None when it is not a list
        (a per-model parameter's list is its values per model: None too). A list for a parameter
        that takes no gradient (an int, a bool, the seed) is refused."""
        if self.per_model or not (isinstance(raw, (list, tuple)) or (isinstance(raw, str) and "," in raw)):
            return None
        if not self.takes_gradient:
            kind = {bool: "true or false", int: "one whole number"}.get(self.type, "one number")
            raise UsageError(f"{self.option} {raw!r}: takes {kind} for every tensor; a gradient over the layers "
                             f"(a comma list: --t 0,0.5,1) is for a float parameter")
        parts = raw.split(",") if isinstance(raw, str) else list(raw)
        if len(parts) < 2 or any(isinstance(v, str) and not v.strip() for v in parts):
            raise UsageError(f"{self.option} {raw!r}: a gradient over the layers is 2 or more numbers separated by "
                             f"commas ({self.option} 0,0.5,1); one value is given alone")
        values = []
        for value in parts:  # each checked as one value is
            try:
                values.append(self._number(value))
            except UsageError:
                raise UsageError(f"{self.option} {raw!r}: every value must be {self.range.wording} "
                                 f"({value!r} is not)") from None
        return tuple(values)

    def _number(self, raw: Any) -> float:
        try:
            value = float(raw)
        except (ValueError, TypeError):
            raise UsageError(f"{self.option} {raw!r}: expected a number") from None
        if isinstance(raw, bool) or not (math.isfinite(value) and self.range.contains(value)):  # nan fails every comparison
            raise UsageError(f"{self.option} {value!r}: must be {self.range.wording}")
        return value

    def _per_model(self, raw: Any, models: int) -> list[float]:
        """"2,1,1" (the command line) or [2, 1, 1] (the library); the default for each when not given."""
        if raw is None:
            return [float(self.default)] * models
        try:
            parts = raw.split(",") if isinstance(raw, str) else list(raw)
            if any(isinstance(v, bool) for v in parts):
                raise TypeError
            values = [float(v) for v in parts]
        except (ValueError, TypeError):
            raise UsageError(f"{self.option} {raw!r}: expected numbers separated by commas") from None
        if len(values) != models:
            raise UsageError(f"{self.option} gives {len(values)} {self.name} for {models} models")
        if not all(math.isfinite(v) for v in values):
            raise UsageError(f"{self.option} {raw!r}: every {self.each} must be a finite number (no nan or inf)")
        if not math.isfinite(sum(values)):  # a weighted sum of them would overflow
            raise UsageError(f"{self.option} {raw!r}: the {self.name} are too large to add up")
        if not all(self.range.contains(v) for v in values):
            raise UsageError(f"{self.option} {raw!r}: every {self.each} must be {self.range.wording}")
        return values


@dataclass(frozen=True)
class Parameters:
    """A method's parameters, resolved: `values` in the method's declared order (a list, one per
    model, for a per-model parameter; a number or a list for one that may be either, as
    `density`); `rules` give a per-tensor parameter's value by key.

    A recipe passes per-model values as lists in the models' order (`resolve_parameters(...,
    {"density": [0.5, 0.7]})`), and per-tensor ones as `varying(name, rule)`, the rule giving a
    key's value in the same forms, already checked (`Parameter.resolve`).

    `gradients`: the parameters given as a gradient over the layers ("0,0.5,1"), their values as
    given; `values` holds the first (a key outside the layers takes it) until whoever knows the
    layers gives each key its own by a rule (ops/merge/by_method.py).

    A key's merge asks `for_tensor(key)` and reads nothing else; the report shows `report()`,
    the values every key gets unless a rule says otherwise, and the gradients as given."""

    method: str
    values: Mapping[str, Any]
    declared: tuple[Parameter, ...] = ()
    rules: Mapping[str, Callable[[str], Any]] = field(default_factory=dict)
    models: int = 0  # how many models (a per-model value given by a rule is checked against it)
    check: Callable[[dict], None] | None = None  # the method's check across its values, run on each key's
    gradients: Mapping[str, tuple[float, ...]] = field(default_factory=dict)

    def for_tensor(self, key: str) -> dict[str, Any]:
        """The values of `key`: a rule's value checked as the command line's are (Parameter.resolve:
        "0.5,0.7", [0.5, 0.7], 0.5 for a per-model one), and the method's check across them; a
        UsageError names the key."""
        values = dict(self.values)
        if not self.rules:
            return values
        declared = {p.name: p for p in self.declared}
        try:
            for name, rule in self.rules.items():
                values[name] = declared[name].resolve(rule(key), self.method, self.models)
            if self.check is not None:
                self.check(values)
        except UsageError as refused:
            raise UsageError(f"{key}: {refused}") from None
        return values

    def varying(self, name: str, rule: Callable[[str], Any]) -> Parameters:
        """These parameters with `name`'s value given per key by `rule(key)` (a value of the forms
        `resolve_parameters` takes: a number, a bool, a list per model or "a,b" for a per-model
        parameter; None: the method's default), checked when a key asks for its values."""
        parameter = next((p for p in self.declared if p.name == name), None)
        if parameter is None or not parameter.per_tensor:
            raise ValueError(f"--method {self.method}: {name} is not a parameter that may vary per tensor")
        return replace(self, rules={**self.rules, name: rule})

    def report(self) -> dict[str, Any]:
        values = {name: list(v) if isinstance(v, list) else v for name, v in self.values.items()}
        return {**values, **{name: list(given) for name, given in self.gradients.items()}}  # in the declared order


def _nested(raw: Any) -> bool:
    """Whether a per-model value is given as lists of lists ("[0,1],[1,0]"): a gradient per model."""
    if isinstance(raw, str):
        return any(c in raw for c in "[]();")
    return isinstance(raw, (list, tuple)) and any(isinstance(v, (list, tuple)) for v in raw)


def _whole(raw: Any) -> Any:
    """The command line's text of a whole number as one ("3" -> 3); anything else as it is, for
    the check to refuse."""
    if isinstance(raw, str):
        try:
            return int(raw)
        except ValueError:
            return raw
    return raw


# ---- the parameters several methods share ------------------------------------------------------

WEIGHTS = Parameter("weights", "One weight per model, separated by commas.", "W,W,..", default=1.0, per_model=True,
                    per_tensor=True, each="weight")
DENSITY = Parameter("density", "The fraction of each delta kept: the largest by magnitude (ties, breadcrumbs*), each "
                    "entry with this chance (dare-*), or on average (della*); one value, or one per model.", "D[,D..]",
                    default=1.0, range=FRACTION, per_model=True, broadcast=True, per_tensor=True, each="density")
SCALE = Parameter("scale", "Multiplies the combined delta (λ, mergekit's `lambda`); passthrough: the tensor.",
                  "LAMBDA", default=1.0, per_tensor=True)
T = Parameter("t", "slerp: where between the two models, 0 the first, 1 the second; nearswap: the distance "
              "below which the model's value is taken whole.", "T", range=UNIT_INTERVAL, per_tensor=True)
SEED = Parameter("seed", "Seeds the random drop (with each key's name: the draws do not depend on the order keys "
                 "are written in, nor on how they are chunked).", "N", type=int, default=0, range=NON_NEGATIVE,
                 per_tensor=False)
NORMALIZE = Parameter("normalize", "Divide the combined delta by the sum of the weights (with a sign election: of "
                      "the weights that agree); linear: by the sum of the weights.", "", type=bool, default=False)
RESCALE = Parameter("rescale", "Multiply what each delta keeps so that it keeps its L1 norm.", "", type=bool,
                    default=False)
INT8_MASK = Parameter("int8_mask", "Accepted for mergekit's recipes: its masks in int8 to save memory; changes "
                      "nothing here (our masks are bits, the math float32).", "", type=bool, default=False)

NORMALIZE_ON = NORMALIZE.variant(default=True)  # as the methods that normalize by default take it

SHARED = (WEIGHTS, DENSITY, SCALE, T, SEED, NORMALIZE, RESCALE, INT8_MASK)  # the command line lists them in this order, then any other
