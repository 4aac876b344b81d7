"""A recipe's parameter values for one tensor, as mergekit 0.1.5 works them out
(config.evaluate_setting, parameter_resolver.resolve_parameter):

- a scalar is itself;
- a gradient `[v0, v1, ..., vk]` at `t` in [0, 1]: numbers are interpolated linearly between
  the neighbours at t·k (`(1 − f)·v[i] + f·v[i+1]`, i = ⌊t·k⌋, f its fraction — written as
  mergekit writes it, so the floats are the same bits); if any value is not a number (true/false,
  text) the value at ⌊t·k⌋ is picked; an empty gradient gives no value;
- filter entries: the first entry whose filter is part of the tensor's name, or that has no
  filter or `*`, gives the value (itself a scalar or a gradient); none: no value.

`t` is the layer's place in its slice (plan.py): i/(n − 1) for layer i of a slice of n layers
(1 when n = 1), and 0 for every tensor outside the layers — mergekit's MergePlanner.

Precedence (`resolve`): the places are asked from the most specific — slice source (a `models:`
entry is one), slice, recipe — and the first that sets the name *and gives a value* wins: a
filter list that matches nothing falls through to the next place, as in mergekit.

`coerce` is the parameter's own conversion (mergekit's `validate`: its pydantic type), applied to
each value before interpolating and to the result; without it values are as the YAML gave them."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from .schema import Conditional, Filtered, Gradient, Setting, Settings

Coerce = Callable[[Any], Any]


def _same(value: Any) -> Any:
    return value


def evaluate(setting: Setting, tensor: str, t: float = 0.0, coerce: Coerce | None = None) -> Any:
    """The value `setting` gives the tensor named `tensor` at `t`; None when it gives none."""
    coerce = coerce or _same
    if isinstance(setting, Filtered):
        entry = first_match(setting.entries, tensor)
        return None if entry is None else evaluate(entry.value, tensor, t, coerce)
    if isinstance(setting, Gradient):
        return _at(setting, t, coerce)
    return coerce(setting)


def first_match(entries: Iterable[Conditional], tensor: str) -> Conditional | None:
    for entry in entries:
        if entry.filter is None or entry.filter == "*" or (tensor and entry.filter in tensor):
            return entry
    return None


def _at(gradient: Gradient, t: float, coerce: Coerce) -> Any:
    if not gradient.values:
        return None
    values, numbers = _converted(gradient, coerce)
    if not numbers:
        return values[int(t * (len(values) - 1))]
    scaled = t * (len(values) - 1)
    i0 = int(scaled)
    i1 = min(len(values) - 1, i0 + 1)
    frac = scaled - i0
    return coerce((1 - frac) * values[i0] + frac * values[i1])


def _converted(gradient: Gradient, coerce: Coerce) -> tuple[list, bool]:
    """The gradient's values converted by `coerce`, and whether they are all numbers: worked out
    once per gradient and conversion (the work of a plan grows with its tensors, not with the
    product of its tensors and a gradient's length)."""
    found = gradient._converted.get(coerce)
    if found is None:
        values = [coerce(v) for v in gradient.values]
        found = gradient._converted[coerce] = (
            values, all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values))
    return found


def resolve(scopes: Iterable[Settings | None], name: str, tensor: str, t: float = 0.0,
            coerce: Coerce | None = None) -> Any:
    """`name`'s value for the tensor named `tensor` at `t`: the first of `scopes` (most specific
    first) that sets it and gives a value; None when none does (the method's default applies)."""
    for scope in scopes:
        if scope is None or name not in scope:
            continue
        value = evaluate(scope.get(name), tensor, t, coerce)
        if value is not None:
            return value
    return None
