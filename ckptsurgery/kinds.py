"""The base of every kind the code names (formats, merge modes, policies, adapt rules, adapter
layouts, sparsification methods): a `str` Enum that is its text wherever it is shown — in
reports, --json, messages and --help — and equal to that text. Every layer may import it."""

from __future__ import annotations

from enum import Enum


class Kind(str, Enum):
    """A named kind; `Kind.X == "x"`, and f"{Kind.X}" is "x" (not "Kind.X")."""

    __str__ = str.__str__
    __format__ = str.__format__

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return tuple(member.value for member in cls)
