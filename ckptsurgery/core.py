"""Pure key logic: no I/O, no printing.

Patterns select keys of a state dict:
- a glob (`*`, `?`, `[...]`) matched against the whole key; `*` spans dots (`layer*.bias`);
- a plain name selects that key and everything under it as a module (`fc` -> `fc.weight`,
  `fc.bias`, never `fc2.weight`);
- `re:REGEX` is a Python regular expression searched in the key.
"""

from __future__ import annotations

import fnmatch
import re
from typing import Callable, Iterable

from .errors import CkptError

_GLOB_CHARS = set("*?[")


def compile_pattern(pattern: str) -> Callable[[str], bool]:
    if pattern.startswith("re:"):
        try:
            return re.compile(pattern[3:]).search
        except re.error as e:
            raise CkptError(f"pattern {pattern!r}: not a valid regular expression ({e})") from None
    if _GLOB_CHARS & set(pattern):
        return re.compile(fnmatch.translate(pattern), re.DOTALL).fullmatch
    if not pattern:
        raise CkptError("an empty pattern selects nothing")
    module = pattern + "."
    return lambda key: key == pattern or key.startswith(module)


def select(keys: Iterable[str], patterns: list[str]) -> list[str]:
    """The keys (in their order) that any pattern selects. Every pattern must select something:
    a typo should fail loudly, not silently keep or drop nothing."""
    keys = list(keys)
    matchers = [(p, compile_pattern(p)) for p in patterns]
    chosen = set()
    unmatched = []
    for pattern, match in matchers:
        hits = [k for k in keys if match(k)]
        if not hits:
            unmatched.append(pattern)
        chosen.update(hits)
    if unmatched:
        raise CkptError(f"pattern{'s' if len(unmatched) > 1 else ''} "
                        f"{', '.join(map(repr, unmatched))} selected no key")
    return [k for k in keys if k in chosen]


_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """'2GB' -> 2*10**9, '500MiB' -> 500*2**20 (Hugging Face's convention), '1000' -> 1000."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    unit = match and match.group(2).upper()
    if not match or unit not in _SIZE_UNITS:
        raise CkptError(f"size {text!r}: expected a number with an optional unit like 2GB or 500MiB")
    size = int(float(match.group(1)) * _SIZE_UNITS[unit])
    if size <= 0:
        raise CkptError(f"size {text!r} must be positive")
    return size


def plan_shards(sizes: list[tuple[str, int]], limit: int) -> list[list[str]]:
    """Fill shards greedily in key order; an item larger than the limit gets a shard of its own."""
    shards: list[list[str]] = []
    used = limit + 1
    for name, size in sizes:
        if used + size > limit or not shards:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    return shards


def fold_runs(names: list[str], signature: Callable[[str], object]) -> list[tuple[str, list[str]]]:
    """Group consecutive numbered siblings (`0`, `1`, ... `23`) whose signatures are equal into one
    entry labelled `{0..23}`; other names stand alone. Returns (label, members)."""
    out: list[tuple[str, list[str]]] = []
    run: list[str] = []

    def flush():
        if len(run) > 1:
            out.append((f"{{{run[0]}..{run[-1]}}}", list(run)))
        elif run:
            out.append((run[0], list(run)))
        run.clear()

    for name in names:
        if (name.isdigit() and run and int(name) == int(run[-1]) + 1
                and signature(name) == signature(run[0])):
            run.append(name)
            continue
        flush()
        if name.isdigit():
            run.append(name)
        else:
            out.append((name, [name]))
    flush()
    return out
