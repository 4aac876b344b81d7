"""filter, drop and rename: keep, remove or rename keys of one checkpoint. Keys are chosen and
renamed over the whole state dict: its tensors and the non-tensor entries beside them
(`fc._extra_state` goes where `fc` goes). `drop` also removes top-level entries beside the state
dict (a training checkpoint's `optimizer`) by name, when no key of the state dict answers it."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import replace
from typing import NamedTuple

from .. import core
from ..errors import CkptError, UsageError
from ..io import Checkpoint, OutputFormat, TensorRef, open_checkpoint
from ..io.tree import outside_names, without_entries
from .inputs import open_input, with_read
from .options import READ_AS_IS, ReadOptions, WriteOptions, check_write_options
from .reports import DropReport, FilterReport, RenameReport, WriteReport
from .write import write_checkpoint


def _keys(ckpt: Checkpoint) -> list[str]:
    return [*ckpt.tensors, *ckpt.others]


def _subset(ckpt: Checkpoint, names: list[str]) -> tuple[OrderedDict, OrderedDict]:
    chosen = set(names)
    return (OrderedDict((k, t) for k, t in ckpt.tensors.items() if k in chosen),
            OrderedDict((k, v) for k, v in ckpt.others.items() if k in chosen))


class _Fit(NamedTuple):
    """How the input's keys fit a template (`filter --like`)."""

    missing: list[str]  # the template's keys the input lacks
    shapes: list[dict]  # {name, shape, template_shape}: left out (--skip-mismatched)
    dtypes: list[dict]  # {name, dtype, template_dtype}: written as the input has them


MISMATCHES_SHOWN = 5  # in the refusal's one line


def _shape(t: TensorRef | None) -> list[int] | None:
    return None if t is None else list(t.shape)


def _shown(shape: list[int] | None) -> str:
    return "(not a tensor)" if shape is None else str(shape)


def _like_template(ckpt: Checkpoint, input: str, like: str, skip_mismatched: bool) -> tuple[list[str], _Fit]:
    """The input's keys the template has, in the input's order, and how they fit it. A key whose
    shape differs (or a tensor where the template has another value) would make the template's
    model fail `load_state_dict`: an error, or with `skip_mismatched` left out. A dtype that
    differs is reported only (load_state_dict copies into the model's own dtype)."""
    with open_checkpoint(like) as template:
        wanted = {k: template.tensors.get(k) for k in _keys(template)}
    have = set(_keys(ckpt))
    shared = [k for k in _keys(ckpt) if k in wanted]
    if not shared:
        raise CkptError(f"{input} and the template {like} share no key "
                        f"(different prefixes? see `ckptsurgery rename` or `merge --into`)")
    shapes, dtypes = [], []
    for name in shared:
        mine, theirs = ckpt.tensors.get(name), wanted[name]
        if mine is None and theirs is None:  # two values that are not tensors (_extra_state)
            continue
        if mine is None or theirs is None or tuple(mine.shape) != tuple(theirs.shape):
            shapes.append({"name": name, "shape": _shape(mine), "template_shape": _shape(theirs)})
        elif mine.dtype is not theirs.dtype:
            dtypes.append({"name": name, "dtype": mine.dtype.name, "template_dtype": theirs.dtype.name})
    if shapes and not skip_mismatched:
        shown = ", ".join(f"{m['name']} {_shown(m['shape'])} (template {_shown(m['template_shape'])})"
                          for m in shapes[:MISMATCHES_SHOWN])
        more = f" … (+{len(shapes) - MISMATCHES_SHOWN})" if len(shapes) > MISMATCHES_SHOWN else ""
        raise CkptError(f"{input}: {len(shapes)} key(s) differ in shape from the template {like}, whose model "
                        f"could not load them: {shown}{more}; --skip-mismatched leaves them out, "
                        f"`merge --into` fits them (--on-mismatch skip, overlap or adapt)")
    skipped = {m["name"] for m in shapes}
    names = [k for k in shared if k not in skipped]
    if not names:
        raise CkptError(f"{input}: every key it shares with the template {like} differs in shape: nothing to write "
                        f"(`merge --into` fits them)")
    return names, _Fit([k for k in wanted if k not in have], shapes, dtypes)


def filter_keys(input: str, write: WriteOptions, *, keep: list[str] | None = None, like: str | None = None,
                root: str | None = None, skip_mismatched: bool = False, read: ReadOptions = READ_AS_IS) -> FilterReport:
    """Keep the keys that patterns select, or the keys a template checkpoint has
    (`{k: v for k, v in pretrained.items() if k in model_dict}`) — as long as their shapes are the
    template's: a shape that differs is an error, or with `skip_mismatched` the key is left out
    (`shape_mismatched`); a dtype that differs is reported (`dtype_mismatched`). `read`: how the
    input is read (ops/inputs.py: scaled FP8 weights dequantized to bfloat16, their scales gone; a GGUF
    file's names), before keys are chosen."""
    write = check_write_options(write)
    if bool(keep) == bool(like):
        raise UsageError("give either --keep PATTERN (repeatable) or --like TEMPLATE, not both")
    if skip_mismatched and not like:
        raise UsageError("--skip-mismatched applies to --like TEMPLATE only")
    with open_input(input, root, read) as (ckpt, done):
        if keep:
            names, fit = core.select(_keys(ckpt), keep), _Fit([], [], [])
        else:
            names, fit = _like_template(ckpt, input, like, skip_mismatched)
        kept, others = _subset(ckpt, names)
        written = write_checkpoint(kept, write, source=ckpt, others=others)
    chosen = set(names)
    return FilterReport.extend(with_read(written, done), kept=names, left_out=[k for k in _keys(ckpt) if k not in chosen],
                               missing_from_input=fit.missing, shape_mismatched=fit.shapes,
                               dtype_mismatched=fit.dtypes)


def _drop_plan(ckpt: Checkpoint, patterns: list[str]) -> tuple[list[str], list[str]]:
    """(keys of the state dict, entries outside it) that `patterns` select, each in order. A
    pattern that selects any key of the state dict means those keys, and only them; a pattern
    that selects none is matched against the top-level entries beside the state dict (never the
    one that holds it). Every pattern must select something."""
    keys = _keys(ckpt)
    if not patterns:
        core.select(keys, patterns)  # refuses, as for filter --keep
    outside = outside_names(ckpt.obj, ckpt.root)
    chosen, named, unmatched = set(), set(), []
    for pattern in patterns:
        match = core.compile_pattern(pattern)
        hits = [k for k in keys if match(k)]
        entries = [] if hits else [k for k in outside if match(k)]
        chosen.update(hits)
        named.update(entries)
        if not hits and not entries:
            unmatched.append(pattern)
    if unmatched:
        try:
            core.select(keys, unmatched)  # refuses, with the near miss among the keys if there is one
        except CkptError as e:
            raise CkptError(str(e) + _beside(ckpt, outside, unmatched)) from None
    return [k for k in keys if k in chosen], [k for k in outside if k in named]


def _beside(ckpt: Checkpoint, outside: list[str], unmatched: list[str]) -> str:
    """What a refusal of `unmatched` adds about the top-level entries beside the state dict."""
    more = ""
    if outside:
        more += f", nor an entry beside the state dict ({', '.join(map(repr, outside[:10]))})"
    if ckpt.root and any(core.compile_pattern(p)(ckpt.root) for p in unmatched):
        more += f"; {ckpt.root!r} holds the state dict itself: drop keys inside it"
    return more


def _refuse_entries_unheld(input: str, entries: list[str], planned: WriteReport) -> None:
    """Dropping an entry outside the state dict means writing the rest of the checkpoint: an
    output that holds the state dict only (.safetensors, shards) would leave them all out anyway."""
    if planned.format == OutputFormat.SAFETENSORS or planned.shards:
        what, instead = ((".safetensors", "write .pth") if planned.format == OutputFormat.SAFETENSORS
                         else ("sharded", "write one .pth, without --max-shard-size,"))
        names = ", ".join(map(repr, entries[:10]))
        raise CkptError(f"{input}: {names} lie{'s' if len(entries) == 1 else ''} outside the state dict, and a "
                        f"{what} output holds the state dict only (`convert` leaves out everything beside it); "
                        f"{instead} to keep the rest")


def drop_keys(input: str, patterns: list[str], write: WriteOptions, *, root: str | None = None,
              read: ReadOptions = READ_AS_IS) -> DropReport:
    """Remove the keys (or whole modules) that patterns select; a pattern that selects no key of
    the state dict but names a top-level entry beside it (a training checkpoint's `optimizer`)
    removes that entry from the written object (`dropped_outside`; .pth and DCP outputs).
    `read`: as for `filter_keys`."""
    write = check_write_options(write)
    with open_input(input, root, read) as (ckpt, done):
        dropped, entries = _drop_plan(ckpt, patterns)
        gone = set(dropped)
        kept, others = _subset(ckpt, [k for k in _keys(ckpt) if k not in gone])
        # the same checkpoint, its object without the entries: the writer carries the rest through,
        # and checks the output against the input's placeholder events (the same list)
        source = replace(ckpt, obj=without_entries(ckpt.obj, set(entries))) if entries else ckpt
        written = None
        if entries:  # planned first: refused before anything is written if the output cannot hold the rest
            written = write_checkpoint(kept, replace(write, dry_run=True), source=source, others=others)
            _refuse_entries_unheld(input, entries, written)
        if written is None or not write.dry_run:
            written = write_checkpoint(kept, write, source=source, others=others)
    return DropReport.extend(with_read(written, done), dropped=dropped, dropped_outside=entries, kept=[*kept, *others])


def rename_keys(input: str, rules: list[core.RenameRule], write: WriteOptions, *,
                root: str | None = None, allow_unchanged: bool = False, read: ReadOptions = READ_AS_IS) -> RenameReport:
    """Rename keys by rules; refuse, before writing anything, if two keys would share a name, or
    if a rule changes no key (unless `allow_unchanged`: the same command run twice then writes
    the same file). `read`: as for `filter_keys`."""
    write = check_write_options(write)
    with open_input(input, root, read) as (ckpt, done):
        names, untouched = core.plan_rename(_keys(ckpt), rules, allow_unchanged)
        renamed = OrderedDict((names[k], t) for k, t in ckpt.tensors.items())
        others = OrderedDict((names[k], v) for k, v in ckpt.others.items())
        # _metadata holds module versions by the old module names: stale after a rename
        written = write_checkpoint(renamed, write, source=ckpt, keep_metadata=False, others=others)
    return RenameReport.extend(with_read(written, done), renamed={old: new for old, new in names.items() if old != new},
                               untouched=untouched)
