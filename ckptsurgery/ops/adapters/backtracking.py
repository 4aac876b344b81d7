"""How much work Python's regular-expression matcher can do: an upper bound on the steps of one
match attempt of a pattern against a string of a given length. `re` backtracks, so a pattern
and a string chosen together (an adapter's config brings both its patterns and the module names
they meet) can take exponential or high-polynomial time; patterns.py asks this bound before it
runs anything, and refuses what would take too long.

The bound follows re's own parse of the pattern. Each part has `ways` — how many times it can
succeed from one place, each success running everything after it again — and `work`, the steps
it takes itself. A sequence multiplies ways (each way of the first part runs the rest), an
alternation adds them, and a repetition of a part with w ways up to k times has w + w² + … +
w^k ways, k being its upper bound or the string's length: `(a+)+` and `(a|a)*` are exponential,
`a{0,999}` five times over is 1000⁵, `.*` three times over is n³.

Given the string (`count`: how often characters occur in it), the bound is tightened where a
repetition of one character is followed by a character that must be there: the places it
continues from are those holding that character, so `.*\\.` costs the dots of a name, not its
length."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

try:  # Python 3.11+
    from re import _constants as _c
    from re import _parser as _sre_parse
except ImportError:  # pragma: no cover - Python 3.10
    import sre_constants as _c
    import sre_parse as _sre_parse

INFINITE = math.inf
IGNORECASE = _c.SRE_FLAG_IGNORECASE
MULTILINE = _c.SRE_FLAG_MULTILINE
_SINGLE = (_c.LITERAL, _c.NOT_LITERAL, _c.ANY, _c.IN)  # one character each
_REPEATS = (_c.MAX_REPEAT, _c.MIN_REPEAT) + ((_c.POSSESSIVE_REPEAT,) if hasattr(_c, "POSSESSIVE_REPEAT") else ())
_ATOMIC = getattr(_c, "ATOMIC_GROUP", None)
_BACKREFS = tuple(getattr(_c, name) for name in ("GROUPREF", "GROUPREF_EXISTS", "GROUPREF_IGNORE",
                                                  "GROUPREF_LOC_IGNORE", "GROUPREF_UNI_IGNORE") if hasattr(_c, name))


def parse(pattern: str):
    """re's parse of `pattern` (raises re.error, RecursionError, OverflowError as re does)."""
    return _sre_parse.parse(pattern)


def refusal(parsed) -> str | None:
    """Why the bound cannot be had for a pattern (a back-reference or a conditional, whose work
    depends on what a group matched), or None."""
    def walk(items) -> str | None:
        for op, av in items:
            if op in _BACKREFS:
                return "has a back-reference"
            for sub in _children(op, av):
                found = walk(sub)
                if found:
                    return found
        return None

    return walk(parsed.data)


def anchored(parsed) -> bool:
    """The pattern starts with `^` or `\\A` outside MULTILINE: it matches only at a string's start."""
    return bool(parsed.data) and parsed.data[0][0] == _c.AT and parsed.data[0][1] in (
        _c.AT_BEGINNING, _c.AT_BEGINNING_STRING) and not parsed.state.flags & MULTILINE


def steps(parsed, length: int, count: Callable[[frozenset], int] | None = None) -> float:
    """An upper bound on the steps of one match attempt of `parsed` (a `parse` result) at one
    place of a string of `length` characters, anchored at its end (`$`) or not; `count(chars)`,
    if given, the number of the string's characters that are among `chars`. INFINITE past any
    float."""
    walk = _Walk(max(length, 0), count)
    try:
        cost = walk.sequence(parsed.data, bool(parsed.state.flags & IGNORECASE))
    except RecursionError:
        return INFINITE
    return _add(_add(cost.work, cost.ways), 1.0)  # each success is checked against the end once


def first_sets(parsed) -> list[frozenset]:
    """Every set of characters whose count `steps` may ask for: what it returns depends on
    the string only through the length and these counts."""
    walk = _Walk(0, None)
    walk.firsts = []
    try:
        walk.sequence(parsed.data, bool(parsed.state.flags & IGNORECASE))
    except RecursionError:
        return []
    return list(dict.fromkeys(walk.firsts))


def _children(op, av) -> list:
    """The sub-sequences of one parsed item."""
    if op == _c.BRANCH:
        return [list(alt) for alt in av[1]]
    if op == _c.SUBPATTERN:
        return [list(av[-1])]
    if op in _REPEATS:
        return [list(av[2])]
    if op in (_c.ASSERT, _c.ASSERT_NOT):
        return [list(av[1])]
    if op == _ATOMIC:
        return [list(av)]
    if op == _c.GROUPREF_EXISTS:
        return [list(p) for p in av[1:] if p is not None]
    return []


@dataclass(frozen=True)
class _Cost:
    ways: float  # successes from one place (each runs what follows once more)
    work: float  # steps it takes itself, not counting what follows
    least: int  # fewest characters a success consumes
    most: float  # most characters a success consumes
    first: frozenset | None = None  # every success starts with one of these characters (None: unknown)
    distinct: bool = False  # its successes from one place end at different places


def _add(a: float, b: float) -> float:
    return a + b if a + b < 1e300 else INFINITE


def _mul(a: float, b: float) -> float:
    if a == 0 or b == 0:
        return 0.0
    return a * b if math.log10(a) + math.log10(b) < 300 else INFINITE


def _powers(w: float, low: int, high: float) -> float:
    """w^low + … + w^high (0 when high < low)."""
    if high < low:
        return 0.0
    if w <= 1:
        return (high - low + 1) * w if w < 1 else high - low + 1
    if (high + 1) * math.log10(w) >= 300:
        return INFINITE
    return (w ** (high + 1) - w ** low) / (w - 1)


class _Walk:
    def __init__(self, length: int, count: Callable[[frozenset], int] | None):
        self.length = length
        self.count = count
        self.firsts: list | None = None  # first_sets: every first set met

    def sequence(self, items, icase: bool) -> _Cost:
        ways, work, least, most = 1.0, 0.0, 0, 0.0
        first, leading = None, True
        entries, previous = 1.0, None  # how often the previous part was entered, and its cost
        parts = []
        for op, av in items:
            cost = self.item(op, av, icase)
            if self.firsts is not None and cost.first is not None:
                self.firsts.append(cost.first)
            work = _add(work, _mul(ways, cost.work))
            after = _mul(ways, cost.ways)
            if self.count and previous is not None and previous.distinct and cost.first is not None:
                # the previous part's successes end at different places: only those holding a
                # character this part starts with go on
                after = min(after, _mul(_mul(entries, min(previous.ways, self.count(cost.first))), cost.ways))
            entries, ways, previous = ways, after, cost
            if leading and not (op == _c.AT):
                first, leading = (cost.first if cost.least > 0 else None), False
            least, most = least + cost.least, _add(most, cost.most)
            parts.append(cost)
        return _Cost(ways, work, least, min(most, self.length), first, _distinct(parts, ways))

    def item(self, op, av, icase: bool) -> _Cost:
        if op in _SINGLE:
            return _Cost(1.0, 1.0 + (len(av) if op == _c.IN else 0), 1, 1, _first_of(op, av, icase), True)
        if op == _c.AT:
            return _Cost(1.0, 1.0, 0, 0, None, True)
        if op == _c.BRANCH:
            alts = [self.sequence(alt, icase) for alt in av[1]]
            firsts = [a.first for a in alts]
            ways = sum(a.ways for a in alts)
            return _Cost(ways, _add(sum(a.work for a in alts), len(alts)), min(a.least for a in alts),
                         max(a.most for a in alts), None if None in firsts else frozenset().union(*firsts), ways <= 1)
        if op == _c.SUBPATTERN:
            add, remove = av[1], av[2]
            return self.sequence(av[-1], (icase or bool(add & IGNORECASE)) and not remove & IGNORECASE)
        if op in _REPEATS:
            return self.repeat(op, av, icase)
        if op in (_c.ASSERT, _c.ASSERT_NOT):
            inner = self.sequence(av[1], icase)
            return _Cost(1.0, _add(inner.work, inner.ways), 0, 0, None, True)
        if op == _ATOMIC:
            inner = self.sequence(av, icase)
            return _Cost(min(inner.ways, 1.0), inner.work, inner.least, inner.most, inner.first, True)
        return _Cost(INFINITE, INFINITE, 0, self.length)  # nothing else is let through (see refusal)

    def repeat(self, op, av, icase: bool) -> _Cost:
        low, high, body = av
        inner = self.sequence(body, icase)
        # each pass consumes `least` characters or more; passes that consume nothing end the loop
        most_passes = self.length // inner.least if inner.least else low + self.length
        k = min(high, most_passes)
        w = inner.ways
        if w == 0:
            ways, work = (1.0 if low == 0 else 0.0), _add(inner.work, 1.0)
        else:
            ways = _powers(w, low, k)
            # pass j+1 is tried after each way of j passes, while j is below the upper bound
            tried = _powers(w, 0, k - 1 if k == high else k)
            work = _add(_mul(tried, _add(inner.work, 1.0)), 1.0)
        if hasattr(_c, "POSSESSIVE_REPEAT") and op == _c.POSSESSIVE_REPEAT:
            ways = min(ways, 1.0)
        one_char = len(body) == 1 and body[0][0] in _SINGLE
        distinct = ways <= 1 or one_char or (w <= 1 and inner.least > 0)
        return _Cost(ways, work, low * inner.least, min(_mul(k, inner.most), self.length),
                     inner.first if low > 0 else None, distinct)


def _first_of(op, av, icase: bool) -> frozenset | None:
    if icase:
        return None
    if op == _c.LITERAL:
        return frozenset(chr(av))
    if op == _c.IN and av and all(o == _c.LITERAL for o, _ in av):
        return frozenset(chr(v) for _, v in av)
    return None


def _distinct(parts: list[_Cost], ways: float) -> bool:
    """A sequence's successes end at different places: at most one part has several ways, its
    own successes do, and every part after it has a fixed width."""
    if ways <= 1:
        return True
    several = False
    for cost in parts:
        if cost.ways > 1:
            if several or not cost.distinct:
                return False
            several = True
        elif several and cost.least != cost.most:
            return False
    return True
