"""Pattern safety: the regular expressions an adapter's config brings (peft's target_modules,
rank_pattern, alpha_pattern) are checked before any is run against a module name, and run as
peft runs them. A file chooses both the pattern and the names it meets, so a pattern that can
backtrack exponentially is refused instead of run."""

from __future__ import annotations

import re

from ...errors import CkptError


def check_file_pattern(pattern: object, where: str) -> str:
    """A regular expression read from an adapter's config, refused unless it is text, compiles,
    and has no shape that can backtrack exponentially: a repetition inside a repetition, an
    alternation or back-reference inside one, more than two unbounded repetitions. (peft's
    rank_pattern and target_modules are module names, or simple expressions like
    `.*\\.(q|v)_proj`.)"""
    if not isinstance(pattern, str):
        raise CkptError(f"{where}: pattern {str(pattern)[:40]!r} is a {type(pattern).__name__}, not text")
    try:
        parsed = _sre_parse(pattern)
    except (re.error, RecursionError, OverflowError) as e:
        raise CkptError(f"{where}: pattern {pattern[:60]!r} is not a valid regular expression ({e})") from None
    unbounded = 0

    def walk(items, in_repeat: bool) -> None:
        nonlocal unbounded
        for op, av in items:
            name = str(op)
            if name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
                low, high, sub = av
                if in_repeat:
                    raise CkptError(f"{where}: pattern {pattern[:60]!r} repeats a repetition, which can take "
                                    f"exponential time to match; not run")
                unbounded += high == _MAXREPEAT
                walk(sub, high > 1)  # `(x.*)?` repeats nothing
            elif name == "BRANCH":
                if in_repeat:
                    raise CkptError(f"{where}: pattern {pattern[:60]!r} repeats an alternation, which can take "
                                    f"exponential time to match; not run")
                for branch in av[1]:
                    walk(branch, in_repeat)
            elif name in ("GROUPREF", "GROUPREF_EXISTS"):
                raise CkptError(f"{where}: pattern {pattern[:60]!r} has a back-reference; not run")
            elif name == "SUBPATTERN":
                walk(av[-1], in_repeat)
            elif name in ("ASSERT", "ASSERT_NOT"):
                walk(av[1], in_repeat)

    walk(parsed, False)
    if unbounded > 2:
        raise CkptError(f"{where}: pattern {pattern[:60]!r} has {unbounded} unbounded repetitions, which can "
                        f"take a long time to match; not run")
    return pattern


def _sre_parse(pattern: str):
    try:
        from re import _parser as parser  # Python 3.11+
    except ImportError:  # pragma: no cover - Python 3.10
        import sre_parse as parser
    return parser.parse(pattern)


try:
    from re import _constants as _re_constants
except ImportError:  # pragma: no cover - Python 3.10
    import sre_constants as _re_constants
_MAXREPEAT = _re_constants.MAXREPEAT


def pattern_key(patterns, name: str) -> str | None:
    """The first of `patterns` (rank_pattern / alpha_pattern keys) that selects module `name`,
    as peft matches them: the pattern is a regular expression that must match the whole name
    or a dotted tail of it (`(.*\\.)?(pattern)$`)."""
    for key in patterns:
        try:
            if re.match(rf"(.*\.)?({key})$", name):
                return key
        except re.error as e:
            raise CkptError(f"rank/alpha pattern {key!r}: not a valid regular expression ({e})") from None
    return None


def targets(config: dict, name: str) -> bool | None:
    """Whether target_modules selects module `name`, as peft decides; None when it cannot say
    (`all-linear`, or none given)."""
    wanted = config.get("target_modules")
    if isinstance(wanted, str):
        if wanted == "all-linear":
            return None
        return re.fullmatch(wanted, name) is not None  # checked by check_config
    if isinstance(wanted, list) and wanted:
        return any(name == t or name.endswith("." + t) for t in wanted)
    return None


def check_config(config: dict, where: str) -> None:
    """The pattern fields of a peft config, of the types peft writes, and safe to run."""
    wanted = config.get("target_modules")
    if isinstance(wanted, str):
        if wanted != "all-linear":
            check_file_pattern(wanted, f"{where}: target_modules")
    elif isinstance(wanted, list):
        if not all(isinstance(t, str) for t in wanted):
            raise CkptError(f"{where}: target_modules must list module names (text)")
    elif wanted is not None:
        raise CkptError(f"{where}: target_modules must be a list of module names or one pattern")
    for field_name in ("rank_pattern", "alpha_pattern"):
        patterns = config.get(field_name) or {}
        if not isinstance(patterns, dict):
            raise CkptError(f"{where}: {field_name} must be an object")
        for key in patterns:
            check_file_pattern(key, f"{where}: {field_name}")
