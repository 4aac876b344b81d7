"""The two tables of adapters — `FORMATS`, how an adapter is read, and `KINDS`, how its modules
fold — and `read_adapter`, which opens a path with the first format that recognises it.

Each adapter format is declared once, here, as an `AdapterFormat` (kinds.py): its name, how a
path of it is recognised, its reader (path -> Adapter) and its resolver (how its module names
meet a base's keys). A new format — LyCORIS, diffusers — is one module with those three
functions (see peft.py and kohya.py), a member of kinds.Format, and one entry below, before the
catch-all last one.

Each adapter kind is declared once, in its module kind_<name>.py, as a `FoldKind`: its name (an
AdapterKind), its factors, their check against the base weight and the steps that change it. A
reader names a module's kind; folding asks KINDS, never the kind's name."""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

from . import diffusers, kind_dora, kind_full, kind_ia3, kind_loha, kind_lokr, kind_lora, kohya, peft
from .kinds import Adapter, AdapterFormat, AdapterKind, FoldKind, Format, Resolver

FORMATS: tuple[AdapterFormat, ...] = (
    AdapterFormat(Format.PEFT, recognises=peft.recognises, read=peft.read, resolver=peft.PeftResolver),
    # a file of diffusers' keys (unet.…lora_A.weight): named as peft's modules are, one prefix off
    AdapterFormat(Format.DIFFUSERS, recognises=diffusers.recognises, read=diffusers.read,
                  resolver=peft.PeftResolver),
    # last: takes any file, and its reader says what a file of another kind is
    AdapterFormat(Format.KOHYA, recognises=kohya.recognises, read=kohya.read, resolver=kohya.KohyaResolver),
)

KINDS: dict[AdapterKind, FoldKind] = {kind.name: kind for kind in (
    kind_lora.LORA,
    kind_dora.DORA,
    kind_ia3.IA3,
    kind_loha.LOHA,
    kind_lokr.LOKR,
    kind_full.FULL,
)}


def format_of(path: str) -> AdapterFormat:
    """The first format of FORMATS that recognises `path`."""
    return next(f for f in FORMATS if f.recognises(path))


def resolver(adapter: Adapter, keys: list[str]) -> Resolver:
    """How `adapter`'s names meet a base of these `keys` (its format's resolver)."""
    return next(f for f in FORMATS if f.name == adapter.format).resolver(keys)


@contextmanager
def read_adapter(path: str) -> Iterator[Adapter]:
    """A PEFT adapter folder (or its adapter_model file), a diffusers or a kohya/LyCORIS file,
    open until the block ends (its tensors are read lazily, when the output is written)."""
    path = os.fspath(path)
    adapter = format_of(path).read(path)
    try:
        yield adapter
    finally:
        adapter.close()
