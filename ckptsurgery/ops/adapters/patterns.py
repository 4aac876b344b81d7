"""Pattern safety: the regular expressions an adapter's config brings (peft's target_modules,
rank_pattern, alpha_pattern, IA3's feedforward_modules) are checked before any is run against a
module name, and run as peft runs them, under a budget. A file chooses both the patterns and the names they meet, and
Python's matcher backtracks: a pattern that could take long is refused instead of run.

peft's rules, kept exactly:

- target_modules, a list: a module is selected when its name is one of them or ends with `.`
  and one of them; one text: the name must match it whole (`re.fullmatch`), `all-linear` aside.
- feedforward_modules (IA3), a list: a module is one when its name ends with one of them (no dot
  needed); one text: the name must match it whole.
- rank_pattern and alpha_pattern: the first key (in the file's order) that matches the whole
  name or a dotted tail of it, ending at its end — peft's `re.match(rf"(.*\\.)?({key})$", name)`;
  a name that none matches but that is itself a key takes that key (peft's fallback).

How they are run: each key once against each dotted tail of the name (`(?:key)$` from that
place), never inside peft's `(.*\\.)?` wrapper, which tries the key again from every dot and
turns a quadratic key cubic. Keys that are plain dotted module names (what extract-lora writes,
what most configs hold) are looked up by their length and letters, without a matcher. Before a
pattern runs, backtracking.steps bounds its work for that name; every check of one adapter draws
on one budget (BUDGET steps), and a pattern that could take more than PATTERN_LIMIT steps on a
module name of NOMINAL_LENGTH characters is refused when the config is read."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from ...errors import CkptError
from . import backtracking

# Work is counted in steps of the matcher (a few nanoseconds each); what runs in Python is
# counted at what it costs in such steps.
NOMINAL_LENGTH = 128  # a long module name (real ones: 20-80 characters)
PATTERN_LIMIT = 1e8  # steps one pattern may take on such a name
BUDGET = 1e8  # steps one adapter's matching may take (half a second at the very most) …
PER_MODULE = 20_000  # … and more for each of its modules: the work grows as the file, never faster
CALL_STEPS = 100  # one call into re from Python
LOOKUP_STEPS = 40  # one lookup of a name's tail in a table
COMPILE_STEPS = 1_500  # checking and compiling a pattern, per character
PLAIN_STEPS = 20  # reading a plain key, per character
BOUND_STEPS = 500  # bounding a pattern's work for one name (backtracking.steps), per character
CHEAP = 1_000  # a pattern bounded below this many steps whatever the name is not bounded again

# a plain dotted module name, maybe anchored: `lin`, `layers.0.q_proj`, `^layers\.0\.q_proj`
_PLAIN = re.compile(r"\^?(?:[A-Za-z0-9_]|\\\.|\.)+")
_DOT = re.compile(r"\.")


class Budget:
    """The steps one adapter's pattern matching may take; `where` names it in a refusal (None:
    patterns of our own, not limited)."""

    def __init__(self, where: str | None, limit: float = BUDGET):
        self.where = where
        self.limit = limit if where is not None else math.inf
        self.spent = 0.0

    def charge(self, steps: float, what) -> None:
        """Count `steps` before they are taken; refuse once past the limit. `what()` says what
        was about to run."""
        self.spent += steps
        if self.spent > self.limit:
            raise CkptError(f"{self.where}: {what()} would take too long (the adapter's patterns could take more "
                            f"than {self.limit:.0e} matcher steps on its module names); not run — simplify the "
                            f"patterns")


def check_file_pattern(pattern: object, where: str) -> str:
    """A regular expression read from an adapter's config, refused unless it is text, compiles
    (alone and as peft runs it), has no back-reference, and could not take more than
    PATTERN_LIMIT steps on a NOMINAL_LENGTH-character name. Returns it."""
    _Regex.of(pattern, where)
    return pattern


def pattern_key(patterns, name: str) -> str | None:
    """The first of `patterns` (rank_pattern / alpha_pattern keys) that selects module `name`,
    as peft matches them (see the module's notes). For patterns of our own; a config's go
    through ConfigPatterns."""
    return PatternKeys(list(patterns), None, Budget(None)).first(name)


@dataclass
class _Regex:
    """One checked pattern: its parse, compiled as peft runs it (`(?:key)$` from a place, or
    whole), the widths of what it matches, and its step bounds by length."""

    text: str
    index: int
    parsed: object
    compiled: re.Pattern
    least: int
    most: int
    anchored: bool
    firsts: list = field(default_factory=list)  # backtracking.first_sets
    bounds: dict = field(default_factory=dict)  # length -> steps, whatever the string
    refined: dict = field(default_factory=dict)  # (length, counts of firsts) -> steps

    @classmethod
    def of(cls, pattern: object, where: str, index: int = 0, whole: bool = False, budget: Budget | None = None):
        if not isinstance(pattern, str):
            raise CkptError(f"{where}: pattern {str(pattern)[:40]!r} is a {type(pattern).__name__}, not text")
        shown = repr(pattern[:60]) + ("…" if len(pattern) > 60 else "")
        if budget is not None:
            budget.charge(COMPILE_STEPS * (len(pattern) + 1), lambda: f"compiling pattern {shown}")
        try:
            parsed = backtracking.parse(pattern)
            compiled = re.compile(pattern if whole else f"(?:{pattern})$")
        except (re.error, RecursionError, OverflowError, ValueError) as e:
            raise CkptError(f"{where}: pattern {shown} is not a valid regular expression as peft runs it "
                            f"({e})") from None
        why = backtracking.refusal(parsed)
        if why:
            raise CkptError(f"{where}: pattern {shown} {why}; not run")
        steps = backtracking.steps(parsed, NOMINAL_LENGTH)
        if steps > PATTERN_LIMIT:
            size = "more than can be counted" if steps == backtracking.INFINITE else f"about {steps:.0e}"
            raise CkptError(f"{where}: pattern {shown} could take {size} steps to match a {NOMINAL_LENGTH}-character "
                            f"module name (a repetition of a repetition or of an alternation, or many repetitions "
                            f"in a row); not run")
        least, most = parsed.getwidth()
        return cls(pattern, index, parsed, compiled, least, most, backtracking.anchored(parsed),
                   backtracking.first_sets(parsed))

    def steps(self, length: int, name: str, counts: dict) -> float:
        """A bound on one attempt against the `length` characters ending `name` (`counts`:
        the name's characters counted so far), plus what working it out cost. The bound grows
        with the length and the counts, so both are rounded up (by at most half) and the bound
        of the rounded ones kept: the names of one model share a few of them."""
        length = _rounded(length)
        bound = self.bounds.get(length)
        extra = 0.0
        if bound is None:
            bound = self.bounds[length] = backtracking.steps(self.parsed, length)
            extra = BOUND_STEPS * len(self.text)
        if bound <= CHEAP:
            return bound + extra
        for chars in self.firsts:
            for c in chars:
                if c not in counts:
                    counts[c] = name.count(c)
        rounded = {chars: _rounded(sum(counts[c] for c in chars)) for chars in self.firsts}
        key = (length, *rounded.values())
        refined = self.refined.get(key)
        if refined is None:
            refined = self.refined[key] = min(bound, backtracking.steps(self.parsed, length, rounded.__getitem__))
            extra += BOUND_STEPS * len(self.text)
        return refined + extra


@dataclass(frozen=True)
class _Plain:
    """A key that is a plain dotted module name: its letters, `.` (any character but a newline)
    at `wild`, `\\.` a dot; `^` in front: the whole name only."""

    anchored: bool
    text: str
    wild: tuple[int, ...]

    @classmethod
    def of(cls, key: str) -> "_Plain | None":
        if not _PLAIN.fullmatch(key):
            return None
        anchored = key.startswith("^")
        parts = key[anchored:].split("\\.")  # `\.` is the only escape a plain key has
        wild, offset = [], 0
        for part in parts:
            wild += [offset + found.start() for found in _DOT.finditer(part)]
            offset += len(part) + 1
        return cls(anchored, ".".join(parts), tuple(wild))


class PatternKeys:
    """rank_pattern or alpha_pattern: its keys checked and indexed, `first(name)` the key that
    applies to a module (see the module's notes)."""

    def __init__(self, keys: list, where: str | None, budget: Budget):
        self.keys, self.budget = keys, budget
        self.what = (where or "rank_pattern").rpartition(": ")[2]  # rank_pattern or alpha_pattern
        self.known = set(k for k in keys if isinstance(k, str))
        # plain keys by length -> (anchored, wild) -> {text: first index}
        self.plain: dict[int, dict[tuple, dict[str, int]]] = {}
        self.regexes: list[_Regex] = []
        for index, key in enumerate(keys):
            plain = _Plain.of(key) if isinstance(key, str) else None
            if plain is None:
                self.regexes.append(_Regex.of(key, where or self.what, index, budget=budget))
                continue
            budget.charge(PLAIN_STEPS * len(key) + CALL_STEPS, lambda: f"reading {self.what}")
            table = self.plain.setdefault(len(plain.text), {}).setdefault((plain.anchored, plain.wild), {})
            table.setdefault(plain.text, index)

    def first(self, name: str) -> str | None:
        best = self._first_plain(name)
        starts, counts = None, {}
        for regex in self.regexes:
            if best is not None and regex.index >= best:
                break
            starts = starts or _tail_starts(name, self.budget, self.what)
            if self._matches(regex, name, starts, counts):
                best = regex.index
                break
        if best is None:
            return name if name in self.known else None  # peft's get_pattern_key returns the name itself
        return self.keys[best]

    def _first_plain(self, name: str) -> int | None:
        """The first plain key that matches a dotted tail of `name` (ending at its end, or just
        before a final newline, as `$` does)."""
        if not self.plain:
            return None
        best = None
        for pos, end in self._places(name):
            groups = self.plain[end - pos]
            self.budget.charge(len(groups) * (LOOKUP_STEPS + end - pos), lambda: f"{self.what} on module {_shown(name)}")
            tail = name[pos:end]
            for (anchored, wild), table in groups.items():
                if anchored and pos:
                    continue
                found = table.get(_masked(tail, wild))
                if found is not None and (best is None or found < best):
                    best = found
        return best

    def _places(self, name: str) -> list[tuple[int, int]]:
        """(start, end) of each dotted tail of `name` as long as some plain key: found from the
        tails or from the keys' lengths, whichever are fewer (a name of 40 000 dots, or 40 000
        keys)."""
        n, newline = len(name), _newline(name)
        ends = (n, n - 1) if name.endswith("\n") else (n,)
        if name.count(".", 0, newline) < len(self.plain):
            starts = _tail_starts(name, self.budget, self.what)
        else:
            self.budget.charge(len(self.plain) * len(ends) * LOOKUP_STEPS, lambda: f"{self.what} on module {_shown(name)}")
            starts = [end - length for length in self.plain for end in ends
                      if end - length >= 0 and _tail_start(name, end - length, newline)]
        return [(pos, end) for pos in sorted(set(starts)) for end in ends if end - pos in self.plain]

    def _matches(self, regex: _Regex, name: str, starts: list[int], counts: dict) -> bool:
        """Whether `regex` matches a dotted tail of `name` (one starts at each of `starts`), to
        its end."""
        n = len(name)
        for pos in starts:
            if regex.anchored and pos:
                break
            if not regex.least <= n - pos <= regex.most + 1:  # `$` leaves a final newline
                continue
            steps = regex.steps(n - pos, name, counts) + CALL_STEPS
            self.budget.charge(steps, lambda: f"pattern {_shown(regex.text)} on module {_shown(name)}")
            if regex.compiled.match(name, pos):
                return True
        return False


class ConfigPatterns:
    """The patterns of one peft config — target_modules, rank_pattern, alpha_pattern — checked
    (of the types peft writes, and safe to run) when made, and matched as peft matches them
    under one Budget, for an adapter of `modules` modules."""

    def __init__(self, config: dict, where: str, modules: int = 0):
        self.budget = Budget(where, BUDGET + PER_MODULE * modules)
        self.target: _Regex | None = None
        self.names: frozenset[str] = frozenset()
        wanted = config.get("target_modules")
        if isinstance(wanted, str):
            if wanted != "all-linear":
                self.target = _Regex.of(wanted, f"{where}: target_modules", whole=True, budget=self.budget)
        elif isinstance(wanted, list):
            if not all(isinstance(t, str) for t in wanted):
                raise CkptError(f"{where}: target_modules must list module names (text)")
            self.names = frozenset(wanted)
        elif wanted is not None:
            raise CkptError(f"{where}: target_modules must be a list of module names or one pattern")
        self.lengths = sorted({len(t) for t in self.names})
        self.rank, self.alpha = (PatternKeys(_keys(config, f, where), f"{where}: {f}", self.budget)
                                 for f in ("rank_pattern", "alpha_pattern"))
        feedforward = config.get("feedforward_modules")  # IA3's
        self.feedforward_regex = None
        self.feedforward_names: tuple[str, ...] = ()
        if isinstance(feedforward, str):
            self.feedforward_regex = _Regex.of(feedforward, f"{where}: feedforward_modules", whole=True,
                                               budget=self.budget)
        elif isinstance(feedforward, list) and all(isinstance(t, str) for t in feedforward):
            self.feedforward_names = tuple(feedforward)
        elif config.get("peft_type") == "IA3":
            raise CkptError(f"{where}: feedforward_modules must list module names or be one pattern (peft fills it in "
                            f"from the model's type when it is null, which a state dict does not tell: write it in)")

    def targets(self, name: str) -> bool | None:
        """Whether target_modules selects module `name`, as peft decides; None when it cannot
        say (`all-linear`, or none given)."""
        if self.target is not None:
            if not self.target.least <= len(name) <= self.target.most:
                return False
            steps = self.target.steps(len(name), name, {}) + CALL_STEPS
            self.budget.charge(steps, lambda: f"target_modules on module {_shown(name)}")
            return self.target.compiled.fullmatch(name) is not None
        if not self.names:
            return None
        self.budget.charge((len(self.lengths) + 1) * LOOKUP_STEPS, lambda: f"target_modules on module {_shown(name)}")
        n = len(name)
        # peft: `name in target_modules or any(name.endswith("." + t) for t in target_modules)`
        return name in self.names or any(
            length < n and name[n - length - 1] == "." and name[n - length:] in self.names for length in self.lengths)


    def feedforward(self, name: str) -> bool:
        """IA3: whether feedforward_modules names module `name`, as peft decides
        (`_check_target_module_feedforward`): one pattern must match the whole name; from a
        list, the name ends with one of them — peft's plain `endswith`, no dot needed."""
        regex = self.feedforward_regex
        if regex is not None:
            if not regex.least <= len(name) <= regex.most:
                return False
            steps = regex.steps(len(name), name, {}) + CALL_STEPS
            self.budget.charge(steps, lambda: f"feedforward_modules on module {_shown(name)}")
            return regex.compiled.fullmatch(name) is not None
        self.budget.charge((len(self.feedforward_names) + 1) * LOOKUP_STEPS,
                           lambda: f"feedforward_modules on module {_shown(name)}")
        return name.endswith(self.feedforward_names)


def _keys(config: dict, field_name: str, where: str) -> list:
    patterns = config.get(field_name) or {}
    if not isinstance(patterns, dict):
        raise CkptError(f"{where}: {field_name} must be an object")
    return list(patterns)


def _newline(name: str) -> int:
    """Where peft's `(.*\\.)?` must stop: `.` matches no newline."""
    found = name.find("\n")
    return len(name) if found < 0 else found


def _tail_start(name: str, pos: int, newline: int) -> bool:
    """Whether a dotted tail of `name` starts at `pos` (peft's `(.*\\.)?` can consume all before it)."""
    return pos == 0 or (name[pos - 1] == "." and pos - 1 < newline)


def _tail_starts(name: str, budget: Budget, what: str) -> list[int]:
    newline = _newline(name)
    budget.charge(10 * name.count(".", 0, newline) + CALL_STEPS, lambda: f"{what} on module {_shown(name)}")
    return [0] + [m.end() for m in re.finditer(r"\.", name[:newline])]


def _masked(tail: str, wild: tuple[int, ...]) -> str | None:
    """`tail` with a `.` at each wild place (None if a newline is there: `.` does not match it)."""
    if not wild or all(tail[w] == "." for w in wild):
        return tail
    chars = list(tail)
    for w in wild:
        if chars[w] == "\n":
            return None
        chars[w] = "."
    return "".join(chars)


def _rounded(value: int) -> int:
    """`value` rounded up to one of 0-4, 6, 8, 12, 16, 24, 32, … (by at most half)."""
    if value <= 4:
        return value
    power = 1 << (value - 1).bit_length()
    return power * 3 // 4 if value <= power * 3 // 4 else power


def _shown(text: str) -> str:
    return repr(text[:60]) + ("…" if len(text) > 60 else "")
