"""Which tensors belong to which layer, found from a model's key names alone (no architecture
file, unlike mergekit, which knows each model family by a JSON description).

The rule: a *container* is the part of a key before a number segment (`model.layers` in
`model.layers.7.mlp.up_proj.weight`, `transformer.h` in `transformer.h.3.attn.c_attn.weight`,
`blocks`, `bert.encoder.layer`). Containers inside another container's numbered part
(`model.layers.7.block_sparse_moe.experts`: the experts of one layer) are not candidates — the
layers hold them. Of the others, the one that numbers the most tensors holds the layers; it is
refused as ambiguous when

- another numbers at least half as many (two stacks: T5's `encoder.block` and
  `decoder.block`, an encoder-decoder, a vision tower beside a language model), or
- its numbers are not 0, 1, …, N − 1 (an `nn.Sequential` of mixed modules: `features.0`,
  `features.3`),

and `--layer-pattern REGEX` says instead: a regular expression searched in each key, with one
group that captures the layer number (`model\\.layers\\.(\\d+)\\.`, `decoder\\.block\\.(\\d+)\\.`).
A model with no number segment has no layers (N = 0)."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from ...errors import UsageError

MAX_PATTERN = 1_000  # characters of --layer-pattern
# a layer number as written: no sign, no leading zero, at most 18 digits (a segment of thousands of
# digits is no layer's number, and int() refuses past 4300)
_DIGITS = r"0|[1-9][0-9]{0,17}"
_NUMBER = re.compile(_DIGITS)


@dataclass(frozen=True)
class Template:
    """A layer key with its number taken out: `head` + number + `tail`."""

    head: str
    tail: str

    def key(self, index: int) -> str:
        return f"{self.head}{index}{self.tail}"

    def __str__(self) -> str:
        return f"{self.head}{{layer}}{self.tail}"


@dataclass(frozen=True)
class LayerScheme:
    """How one model numbers its layers: `count` layers 0..count−1, under `container` (a key
    prefix, or the --layer-pattern given); `pattern` None when the model has no layers."""

    container: str | None
    count: int
    pattern: re.Pattern | None = None

    def split(self, key: str) -> tuple[int | None, Template | None]:
        """(layer number, key without it), or (None, None) for a key outside the layers."""
        found = self.pattern.search(key) if self.pattern is not None else None
        if found is None:
            return None, None
        return int(found.group(1)), Template(key[:found.start(1)], key[found.end(1):])

    def layer_of(self, key: str) -> int | None:
        return self.split(key)[0]

    def t(self, key: str) -> float:
        """Where `key` lies over the layers, for a gradient: its layer's `layer_t`, 0 outside them."""
        layer = self.layer_of(key)
        return 0.0 if layer is None else layer_t(layer, self.count)


def layer_t(index: int, count: int) -> float:
    """A gradient's `t` at layer `index` of `count`: index/(count − 1), 1 for a single layer
    (mergekit's MergePlanner)."""
    return index / (count - 1) if count > 1 else 1.0


def layer_scheme(keys: Iterable[str], where: str = "model", pattern: str | None = None) -> LayerScheme:
    """The layers of the model whose keys are `keys`, by the module's rule or by `pattern`
    (--layer-pattern); a UsageError names the candidates when the rule cannot decide."""
    keys = list(keys)
    if pattern is not None:
        return _given(keys, where, pattern)
    tensors: dict[str, Counter] = {}
    for key in keys:
        parts = key.split(".")
        for i in range(1, len(parts)):
            if _NUMBER.fullmatch(parts[i]):
                tensors.setdefault(".".join(parts[:i]), Counter())[int(parts[i])] += 1
    if not tensors:
        return LayerScheme(None, 0)
    candidates = sorted((c for c in tensors if not _inside(c, tensors)), key=lambda c: -sum(tensors[c].values()))
    best = candidates[0]
    most = sum(tensors[best].values())
    rivals = [c for c in candidates[1:] if 2 * sum(tensors[c].values()) >= most]
    if rivals:
        shown = ", ".join(f"{c}.N ({sum(tensors[c].values())} tensors)" for c in [best, *rivals][:4])
        raise UsageError(f"{where}: which numbered keys are the layers is ambiguous: {shown}; pass --layer-pattern "
                         f"REGEX with one group for the layer number, e.g. '{re.escape(best)}\\.(\\d+)\\.'")
    _contiguous(sorted(tensors[best]), where, f"{best}.N")
    return LayerScheme(best, max(tensors[best]) + 1, re.compile(rf"^{re.escape(best)}\.({_DIGITS})(?=\.|$)"))


def _inside(container: str, tensors: dict) -> bool:
    """Whether `container` lies in the numbered part of another (`a.layers.3.experts` in `a.layers`)."""
    parts = container.split(".")
    return any(_NUMBER.fullmatch(parts[i]) and ".".join(parts[:i]) in tensors for i in range(1, len(parts)))


def _contiguous(numbers: list[int], where: str, what: str) -> None:
    if numbers != list(range(len(numbers))):
        shown = ", ".join(map(str, numbers[:8])) + (", …" if len(numbers) > 8 else "")
        raise UsageError(f"{where}: {what} numbers {shown}: not the layers 0..{len(numbers) - 1} one after another, "
                         f"so they are not taken for layers; pass --layer-pattern REGEX with one group for the "
                         f"layer number")


def _given(keys: list[str], where: str, text: str) -> LayerScheme:
    compiled = check_layer_pattern(text, max((len(k) for k in keys), default=0))
    numbers = set()
    for key in keys:
        found = compiled.search(key)
        if found is None:
            continue
        if found.group(1) is None or not _NUMBER.fullmatch(found.group(1)):
            raise UsageError(f"--layer-pattern {text!r}: its group matches {found.group(1)!r} in {where}'s key "
                             f"{key!r}, not a layer number")
        numbers.add(int(found.group(1)))
    if not numbers:
        raise UsageError(f"--layer-pattern {text!r} matches none of {where}'s keys")
    _contiguous(sorted(numbers), where, f"--layer-pattern {text!r}")
    return LayerScheme(text, max(numbers) + 1, compiled)


def check_layer_pattern(text: str, longest: int = 256) -> re.Pattern:
    """--layer-pattern compiled, refused (UsageError) unless it has exactly one group, no
    back-reference, and a bounded cost searched in keys of `longest` characters (the bound
    adapter configs' patterns are held to: adapters/backtracking.py)."""
    from ..adapters import backtracking  # only a given pattern needs the bound
    from ..adapters.patterns import PATTERN_LIMIT

    shown = repr(text[:60]) + ("…" if len(text) > 60 else "")
    if not isinstance(text, str) or not text or len(text) > MAX_PATTERN:
        raise UsageError(f"--layer-pattern {shown}: must be a regular expression of 1 to {MAX_PATTERN} characters")
    try:
        parsed = backtracking.parse(text)
        compiled = re.compile(text)
    except (re.error, RecursionError, OverflowError, ValueError) as e:
        raise UsageError(f"--layer-pattern {shown}: not a valid regular expression ({e})") from None
    if compiled.groups != 1:
        raise UsageError(f"--layer-pattern {shown}: needs exactly one group, the layer number, e.g. "
                         f"'model\\.layers\\.(\\d+)\\.' (it has {compiled.groups}; use (?:...) for others)")
    why = backtracking.refusal(parsed)
    if why:
        raise UsageError(f"--layer-pattern {shown}: {why}; not run")
    length = max(longest, 1)
    places = 1 if backtracking.anchored(parsed) else length  # a search tries each place of the key
    steps = backtracking.steps(parsed, length) * places
    if steps > PATTERN_LIMIT:
        raise UsageError(f"--layer-pattern {shown}: could take too long searched in a {length}-character key (a "
                         f"repetition of a repetition or of an alternation, or a `.*` not anchored by ^); simplify it")
    return compiled
