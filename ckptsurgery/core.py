"""Pure key logic: no I/O, no printing.

Patterns select keys of a state dict:
- a glob (`*`, `?`, `[...]`) matched against the whole key; `*` spans dots (`layer*.bias`);
- a plain name selects that key and everything under it as a module (`fc` -> `fc.weight`,
  `fc.bias`, never `fc2.weight`);
- `re:REGEX` is a Python regular expression searched in the key.
"""

from __future__ import annotations

import fnmatch
import math
import re
from dataclasses import dataclass
from typing import Callable, Iterable

from .errors import CkptError, UsageError
from .kinds import Kind

_GLOB_CHARS = set("*?[")
# what re.compile raises besides re.error: a repeat count beyond C's int (a{4294967296}), or
# thousands of nested groups
_REGEX_ERRORS = (re.error, OverflowError, RecursionError)


def compile_pattern(pattern: str) -> Callable[[str], bool]:
    if pattern.startswith("re:"):
        try:
            return re.compile(pattern[3:]).search
        except _REGEX_ERRORS as e:
            raise UsageError(f"pattern {pattern!r}: not a valid regular expression ({e})") from None
    if _GLOB_CHARS & set(pattern):
        return re.compile(fnmatch.translate(pattern), re.DOTALL).fullmatch
    if not pattern:
        raise UsageError("an empty pattern selects nothing")
    module = pattern + "."
    return lambda key: key == pattern or key.startswith(module)


def select(keys: Iterable[str], patterns: list[str]) -> list[str]:
    """The keys (in their order) that any pattern selects. Every pattern must select something:
    a typo should fail loudly, not silently keep or drop nothing."""
    if not patterns:
        raise UsageError("no pattern given: a pattern selects keys, so give at least one")
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
        hint = near_miss(keys, unmatched[0])
        raise CkptError(f"pattern{'s' if len(unmatched) > 1 else ''} "
                        f"{', '.join(map(repr, unmatched))} selected no key"
                        + (f" (did you mean {hint[0]!r}? it selects {hint[1]} key{'s' if hint[1] > 1 else ''})"
                           if hint else ""))
    return [k for k in keys if k in chosen]


MAX_NEAR_MISS_NAMES = 20_000  # names compared for a typo (keys, then module names); beyond, no typo is sought


def near_miss(keys: list[str], pattern: str) -> tuple[str, int] | None:
    """A pattern like `pattern` that selects keys, and how many: the name as the last part of
    keys (`num_batches_tracked` -> `*.num_batches_tracked`), as a module anywhere (`*.bn.*`), a
    glob anchored too tightly (`bn*` -> `*bn*`), or the module name nearest a typo (`liner1` ->
    `linear1`). None when nothing is near."""
    if pattern.startswith("re:") or not pattern:
        return None
    body = pattern.strip("*")
    for wider in (f"*.{pattern}", f"*.{pattern}.*", f"*{body}*"):
        if wider == pattern or not body:
            continue
        match = compile_pattern(wider)
        count = sum(1 for key in keys if match(key))
        if count:
            return wider, count
    if _GLOB_CHARS & set(pattern) or len(keys) > MAX_NEAR_MISS_NAMES:
        return None
    import difflib  # the error path only

    names = {key[:end] for key in keys for end in _dots(key)}
    if len(names) > MAX_NEAR_MISS_NAMES:
        return None
    close = difflib.get_close_matches(pattern, sorted(names), n=1, cutoff=0.75)
    if not close:
        return None
    match = compile_pattern(close[0])
    return close[0], sum(1 for key in keys if match(key))


def _dots(key: str) -> list[int]:
    """Where each module name a key lies under ends: "a.b.c" -> "a", "a.b", "a.b.c"."""
    return [i for i, c in enumerate(key) if c == "."] + [len(key)]


# ---- renaming --------------------------------------------------------------------------------

@dataclass(frozen=True)
class RenameRule:
    """One rule: strip (module prefix), add (module prefix), replace (old, new), regex (compiled
    pattern, repl), map (dict of exact names). Build rules with `rename_rule`."""

    kind: str
    args: tuple

    def describe(self) -> str:
        if self.kind == "map":
            return f"--map ({len(self.args[0])} names)"
        shown = [a.pattern if isinstance(a, re.Pattern) else a for a in self.args]
        return f"--{RULE_OPTIONS[self.kind]} " + " ".join(map(repr, shown))

    def apply(self, name: str) -> str:
        if self.kind == "strip":
            return name[len(self.args[0]):] if name.startswith(self.args[0]) else name
        if self.kind == "add":
            return self.args[0] + name
        if self.kind == "replace":
            return name.replace(*self.args)
        if self.kind == "regex":
            return self.args[0].sub(self.args[1], name)
        return self.args[0].get(name, name)


# rule kind -> its option; the number of values each takes is in RULE_VALUES
RULE_OPTIONS = {"strip": "strip-prefix", "add": "add-prefix", "replace": "replace", "regex": "regex", "map": "map"}
RULE_VALUES = {"strip": 1, "add": 1, "replace": 2, "regex": 2, "map": 1}


def module_prefix(prefix: str, option: str) -> str:
    """A prefix names a module: `module` and `module.` both mean `module.`, so that stripping
    never leaves a key starting with a dot and adding never glues two names together."""
    name = prefix.removesuffix(".")
    if not name or name.startswith("."):
        raise UsageError(f"--{option} {prefix!r}: give a module name such as module or model.encoder")
    return name + "."


def rename_rule(kind: str, *args) -> RenameRule:
    r"""A checked rule: `rename_rule("strip", "module")`, `rename_rule("replace", "old", "new")`,
    `rename_rule("regex", r"layer(\d+)", r"block\1")`, `rename_rule("map", {"a": "b"})`."""
    if kind not in RULE_OPTIONS:
        raise UsageError(f"unknown rename rule {kind!r}: one of {', '.join(RULE_OPTIONS)}")
    option = RULE_OPTIONS[kind]
    if len(args) != RULE_VALUES[kind]:
        raise UsageError(f"--{option} takes {RULE_VALUES[kind]} value(s), got {len(args)}")
    if kind != "map" and not all(isinstance(a, str) for a in args):
        raise UsageError(f"--{option} takes text, not {', '.join(type(a).__name__ for a in args)}")
    if kind in ("strip", "add"):
        return RenameRule(kind, (module_prefix(args[0], option),))
    if kind == "replace":
        if not args[0]:
            raise UsageError("--replace: the text to replace is empty")
        return RenameRule(kind, tuple(args))
    if kind == "regex":
        try:
            return RenameRule(kind, (re.compile(args[0]), args[1]))
        except _REGEX_ERRORS as e:
            raise UsageError(f"--regex {args[0]!r}: not a valid regular expression ({e})") from None
    mapping = args[0]
    if not isinstance(mapping, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in mapping.items()):
        raise CkptError("--map: the JSON must map old names (strings) to new names (strings)")
    return RenameRule(kind, (mapping,))


def plan_rename(keys: Iterable[str], rules: list[RenameRule],
                allow_unchanged: bool = False) -> tuple[dict[str, str], list[str]]:
    """(old -> new for every key, keys no rule changed), the rules applied in their order. Fails,
    before anything is written, when a rule changes no key (a typo; unless `allow_unchanged`, for
    scripts run on files that may have been renamed already), when two keys would get one name
    (listing every pair) or when a name would start with a dot."""
    if not rules:
        raise UsageError("no rename rule given: use --strip-prefix, --add-prefix, --replace, --regex or --map")
    if not all(isinstance(rule, RenameRule) for rule in rules):
        raise UsageError("rename rules are made by ckptsurgery.core.rename_rule(kind, *values)")
    keys = list(keys)
    current = keys  # every key's name so far, in key order
    for rule in rules:
        try:
            renamed = list(map(rule.apply, current))
        except (re.error, IndexError) as e:  # a bad group reference in the replacement
            raise CkptError(f"{rule.describe()}: {e}") from None
        if rule.kind == "map":
            present = set(current)
            unused = sorted(k for k in rule.args[0] if k not in present)
            if unused:
                raise CkptError(f"--map names {len(unused)} key(s) the checkpoint does not have: "
                                f"{', '.join(unused[:10])}")
        elif renamed == current and not allow_unchanged:
            raise CkptError(f"{rule.describe()} changed no key (--allow-unchanged accepts that, for a script run "
                            f"on files that may have been renamed already)")
        current = renamed
    names = dict(zip(keys, current))
    if len(set(current)) != len(current):
        by_new: dict[str, list[str]] = {}
        for old, new in names.items():
            by_new.setdefault(new, []).append(old)
        collisions = {new: olds for new, olds in by_new.items() if len(olds) > 1}
        pairs = "; ".join(f"{' + '.join(olds)} -> {new}" for new, olds in collisions.items())
        raise CkptError(f"renaming would give {len(collisions)} name(s) to several keys: {pairs}")
    if "" in names.values():
        raise CkptError(f"renaming leaves an empty name for {', '.join(old for old, new in names.items() if not new)}")
    dotted = [f"{old} -> {new}" for old, new in names.items() if new.startswith(".") and new != old]
    if dotted:
        raise CkptError(f"renaming would start {len(dotted)} name(s) with a dot: {'; '.join(dotted[:10])}")
    untouched = [k for k in keys if names[k] == k]
    return names, untouched



# ---- aligning a source with a template -------------------------------------------------------

# Prefixes that wrappers put in front of every key of the model they wrap.
WRAPPER_PREFIXES = (
    "module.",  # DataParallel / DistributedDataParallel
    "_orig_mod.",  # torch.compile
    "model.",  # Lightning: the LightningModule's attribute holding the model
)


def unwrap(name: str) -> str:
    """The name with every leading wrapper prefix removed (`module._orig_mod.fc` -> `fc`)."""
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if name.startswith(prefix) and len(name) > len(prefix):
                name, changed = name[len(prefix):], True
    return name


def align(source_keys: Iterable[str], template_keys: Iterable[str]) -> dict[str, tuple[str, str]]:
    """template key -> (source key, how): `exact`, or `prefix` when they match once wrapper
    prefixes are removed from both. A source key that would fit two template keys, or two
    source keys that fit one, is an error that lists them: never a silent guess."""
    source_keys, template_keys = list(source_keys), list(template_keys)
    sources = set(source_keys)
    matched: dict[str, tuple[str, str]] = {t: (t, "exact") for t in template_keys if t in sources}
    taken = {s for s, _ in matched.values()}
    by_base: dict[str, list[str]] = {}
    for s in source_keys:
        if s not in taken:
            by_base.setdefault(unwrap(s), []).append(s)
    wanted: dict[str, list[str]] = {}
    for t in template_keys:
        if t not in matched:
            wanted.setdefault(unwrap(t), []).append(t)
    problems = []
    for base, targets in wanted.items():
        found = by_base.get(base, [])
        if not found:
            continue
        if len(found) > 1 or len(targets) > 1:
            problems.append(f"{' / '.join(found)} ~ {' / '.join(targets)}")
            continue
        matched[targets[0]] = (found[0], "prefix")
    if problems:
        raise CkptError(f"ambiguous key match{'es' if len(problems) > 1 else ''} (rename first): "
                        + "; ".join(sorted(problems)))
    return {t: matched[t] for t in template_keys if t in matched}


# ---- shape reconciliation --------------------------------------------------------------------

class MismatchPolicy(Kind):
    """merge --into: what a source tensor whose shape differs from the template's gets."""

    ERROR = "error"  # nothing written
    SKIP = "skip"  # the template's tensor kept
    OVERLAP = "overlap"  # the shared block copied
    ADAPT = "adapt"  # fitted by an AdaptRule


class OtherwisePolicy(Kind):
    """--on-mismatch adapt: what a mismatch no rule fits gets."""

    SKIP = "skip"
    OVERLAP = "overlap"


class ConflictPolicy(Kind):
    """Plain merge: a key several sources have."""

    ERROR = "error"
    FIRST = "first"
    LAST = "last"


class AdaptRule(Kind):
    """How --on-mismatch adapt fits a tensor (adapt_rules picks one; ops/adapt.py applies it)."""

    POSITION = "position"  # a position embedding: prefix tokens kept, grid resampled
    ROWS = "rows"  # token embeddings, output rows and their bias: rows kept, grown or cut
    CHANNELS = "channels"  # a convolution's input channels
    HEAD = "head"  # a classifier (and its bias): the template's fresh values kept


MISMATCH_POLICIES = MismatchPolicy.values()
OTHERWISE_POLICIES = OtherwisePolicy.values()
CONFLICT_POLICIES = ConflictPolicy.values()


def overlap_region(source_shape: tuple[int, ...], template_shape: tuple[int, ...]) -> tuple[slice, ...]:
    """The block both shapes share, from the start of every dimension: the first 3 of 4 input
    channels, the first 10 of 1000 classes, the old rows of a grown vocabulary."""
    if len(source_shape) != len(template_shape):
        raise CkptError(f"shapes {list(source_shape)} and {list(template_shape)} have different numbers "
                        f"of dimensions: no overlap to copy (use --on-mismatch skip)")
    return tuple(slice(0, min(a, b)) for a, b in zip(source_shape, template_shape))


# ---- shape adapters (merge --into --on-mismatch adapt) -----------------------------------------

POSITION_PARTS = ("pos_embed", "position_embedding")  # in any part of a key: decoder_pos_embed, ...
TOKEN_NAMES = frozenset({"embed_tokens", "word_embeddings", "wte", "lm_head", "shared", "embed_out", "embed_in",
                         "tok_embeddings", "token_embedding", "token_embeddings"})
TOKEN_KEYS = frozenset({"output.weight", "output.bias"})  # Meta's reference layout: the output layer
HEAD_NAMES = frozenset({"head", "fc", "classifier"})


def _names_in(key: str, names: frozenset) -> bool:
    return not names.isdisjoint(key.split("."))


def _is_position(key: str) -> bool:
    return any(part in piece for piece in key.split(".") for part in POSITION_PARTS)


def _module_of(key: str) -> str:
    return key.rsplit(".", 1)[0] if "." in key else ""


def adapt_rules(mismatches: dict[str, tuple[tuple[int, ...], tuple[int, ...]]],
                tied: list[list[str]] = ()) -> dict[str, AdaptRule | None]:
    """The rule for each shape mismatch (name -> (source shape, template shape), in the template's
    order): by name first — a name that claims a kind gets that kind's rule or none, so that a
    position embedding is never taken for a convolution — then by shape: an AdaptRule, or None
    when no rule fits. Names `tied` together (one storage in the template) take one rule: the first that
    adapts, over a head's."""
    rules: dict[str, AdaptRule | None] = {}
    heads: set[str] = set()
    row_modules: set[str] = set()
    last_rows = None  # the last 2-D weight whose first dimension alone differs: a head unless named
    for name, (old, new) in mismatches.items():
        if len(old) == len(new) == 2 and old[1] == new[1] and old[0] != new[0] and name.endswith("weight"):
            last_rows = name
    for name, (old, new) in mismatches.items():
        same_rank = len(old) == len(new)
        differs = [i for i in range(len(old)) if same_rank and old[i] != new[i]]
        empty = 0 in old or 0 in new  # nothing to resample, average or repeat
        rule = None
        if _is_position(name):
            if not empty and same_rank and len(old) in (2, 3) and differs == [len(old) - 2] \
                    and (len(old) == 2 or old[0] == 1):
                rule = AdaptRule.POSITION
        elif _names_in(name, TOKEN_NAMES) or name in TOKEN_KEYS:
            if not empty and len(old) == 2 and differs == [0]:
                rule = AdaptRule.ROWS
                row_modules.add(_module_of(name))
        elif not empty and name.endswith("weight") and len(old) in (3, 4, 5) and differs == [1]:
            rule = AdaptRule.CHANNELS
        elif len(old) == 2 and differs == [0] and (_names_in(name, HEAD_NAMES) or name == last_rows):
            rule = AdaptRule.HEAD
            heads.add(_module_of(name))
        rules[name] = rule
    for group in tied:  # one storage, one rule: an output layer tied to the embeddings grows with them
        chosen = next((rules[n] for n in group if rules.get(n) not in (None, AdaptRule.HEAD)), None)
        for n in group:
            if n in rules and chosen is not None:
                rules[n] = chosen
                if chosen is AdaptRule.ROWS:
                    row_modules.add(_module_of(n))
                heads.discard(_module_of(n))
    for name, (old, new) in mismatches.items():  # a bias follows its weight's rule
        if rules[name] is None and len(old) == len(new) == 1 and name.endswith("bias") and 0 not in old:
            module = _module_of(name)
            rules[name] = AdaptRule.ROWS if module in row_modules else AdaptRule.HEAD if module in heads else None
    return rules


def prefix_and_grids(old: int, new: int, prefix: int | None = None, grid: tuple[int, int] | None = None):
    """(P, old grid, new grid) of a position embedding going from `old` to `new` tokens: P prefix
    tokens (class, register) and a square grid before; after, the square grid the rest makes, or
    `grid`. P is `prefix`, else the one P in 0…8 that leaves perfect squares on both sides."""
    def square(n: int) -> int | None:  # the side of a square grid of n > 0 tokens
        root = math.isqrt(n) if n > 0 else 0
        return root if root and root * root == n else None

    if prefix is None:
        if grid is not None:
            prefix = new - grid[0] * grid[1]
        else:
            fits = [p for p in range(9) if p <= min(old, new) and square(old - p) and square(new - p)]
            if len(fits) != 1:
                raise CkptError(f"{old} -> {new} position tokens: {'no' if not fits else 'more than one'} count "
                                f"of prefix tokens (0…8) leaves square grids on both sides"
                                f"{' (' + ', '.join(map(str, fits)) + ')' if fits else ''}; give --prefix-tokens P "
                                f"(and --grid H,W for a grid that is not square)")
            prefix = fits[0]
    if not 0 <= prefix <= min(old, new):
        raise CkptError(f"{prefix} prefix tokens do not fit {old} -> {new} position tokens")
    side = square(old - prefix)
    if side is None:
        raise CkptError(f"{old} position tokens less {prefix} prefix tokens is not a square grid")
    if grid is None:
        new_side = square(new - prefix)
        if new_side is None:
            raise CkptError(f"{new} position tokens less {prefix} prefix tokens is not a square grid; "
                            f"give --grid H,W")
        grid = (new_side, new_side)
    if grid[0] * grid[1] != new - prefix:
        raise CkptError(f"--grid {grid[0]},{grid[1]} holds {grid[0] * grid[1]} tokens; the template has "
                        f"{new - prefix} after {prefix} prefix tokens")
    return prefix, (side, side), grid


def check_choice(value: str, choices: tuple[str, ...], option: str) -> str:
    if value not in choices:
        raise UsageError(f"{option} {value!r}: choose one of {', '.join(choices)}")
    return value


# ---- safetensors metadata (`__metadata__`, a map of string to string) ----------------------------
#
# What a write does with the input's metadata (docs/reading-and-writing.md, "Metadata"):
# - kept: every entry, as it still describes the output — a cast, a rename, a filter or a merge
#   does not make a licence, a title, an architecture or training parameters untrue;
# - rewritten: `format` is always "pt" (the layout torch reads), and the tool's own records
#   (`ckptsurgery.*`, the tied names stored once) are recomputed from what is written;
# - dropped: the content hashes below, which vouch for the exact bytes of the tensors: the
#   output's bytes, offsets or order may differ, and the tool does not recompute them.
# Entries the user gives (--metadata-file, then --metadata) are applied last and win.

METADATA_FORMAT_KEY = "format"
METADATA_RESERVED_PREFIX = "ckptsurgery."
METADATA_CONTENT_HASHES = (
    "modelspec.hash_sha256",  # Stability AI's ModelSpec: SHA-256 of the model
    "sshs_legacy_hash",  # kohya sd-scripts: sd-webui-additional-networks' legacy hash
    "sshs_model_hash",  # kohya sd-scripts: SHA-256 of the tensor bytes after the header
)


def is_tool_metadata(key: str) -> bool:
    """Entries the tool writes itself: `format` and the `ckptsurgery.` records."""
    return key == METADATA_FORMAT_KEY or key.startswith(METADATA_RESERVED_PREFIX)


def short_repr(text: object, limit: int = 60) -> str:
    """A name as an error shows it: quoted, and cut — one line, however long the key."""
    shown = repr(text)
    return shown if len(shown) <= limit else shown[:limit] + "…"


def check_metadata(entries: dict, where: str) -> dict[str, str]:
    """`entries` to set in an output's metadata, checked: strings to strings, valid Unicode,
    no key the tool writes itself. Raises UsageError naming `where` (an option or a file)."""
    if not isinstance(entries, dict):
        raise UsageError(f"{where}: metadata must be a JSON object of string keys to string values")
    for key, value in entries.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise UsageError(f"{where}: metadata entry {short_repr(key)}: {type(value).__name__} value; keys and "
                             f"values must be strings (quote numbers: \"3\")")
        if not key:
            raise UsageError(f"{where}: a metadata key cannot be empty")
        for text in (key, value):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise UsageError(f"{where}: metadata entry {short_repr(key)} holds text that is not valid Unicode") from None
        if key == METADATA_FORMAT_KEY:
            raise UsageError(f"{where}: metadata key 'format' is written by ckptsurgery (always \"pt\", the "
                             f"layout torch reads) and cannot be set")
        if key.startswith(METADATA_RESERVED_PREFIX):
            raise UsageError(f"{where}: metadata keys starting with {METADATA_RESERVED_PREFIX!r} are the tool's own "
                             f"records, recomputed on every write; choose another key")
    return dict(entries)


def parse_metadata_pairs(pairs: Iterable[str]) -> dict[str, str]:
    """`--metadata KEY=VALUE` options, in order (a later KEY wins), split at the first `=`."""
    entries: dict[str, str] = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key:
            raise UsageError(f"--metadata {short_repr(pair)}: give KEY=VALUE (an empty VALUE is allowed: KEY=)")
        entries.update(check_metadata({key: value}, f"--metadata {short_repr(pair)}"))
    return entries


def plan_metadata(kept: dict, entries: dict[str, str] | None, clear: bool, holds_metadata: bool = True,
                  cast: bool = False, sharded: bool = False) -> tuple[dict[str, str] | None, list[str]]:
    """The metadata an output carries besides `format` and the tool's records, sorted (None when
    the output's format holds none), and the input's keys it does not carry, sorted. `kept`: the
    input's metadata; `entries`: the user's, set last; `clear`: start from nothing. Dropped
    besides: content hashes (the bytes may change), values that are not text (an index's
    numbers), `dtype` after a cast (it would be untrue), `total_size` in shards (the index's own)."""
    if not holds_metadata:
        return None, sorted(k for k in kept if not is_tool_metadata(k))
    stale = {"dtype"} if cast else set()
    out = {} if clear else {k: v for k, v in kept.items() if not is_tool_metadata(k) and isinstance(v, str)
                            and k not in METADATA_CONTENT_HASHES and k not in stale}
    out.update(entries or {})
    if sharded:
        out.pop("total_size", None)
    dropped = sorted(k for k in kept if not is_tool_metadata(k) and k not in out)
    return dict(sorted(out.items())), dropped
