"""filter, drop and rename: keep, remove or rename keys of one checkpoint. Keys are chosen and
renamed over the whole state dict: its tensors and the non-tensor entries beside them
(`fc._extra_state` goes where `fc` goes)."""

from __future__ import annotations

from collections import OrderedDict

from .. import core
from ..errors import CkptError, UsageError
from ..io import Checkpoint, open_checkpoint
from .options import WriteOptions, check_write_options
from .reports import DropReport, FilterReport, RenameReport
from .write import write_checkpoint


def _keys(ckpt: Checkpoint) -> list[str]:
    return [*ckpt.tensors, *ckpt.others]


def _subset(ckpt: Checkpoint, names: list[str]) -> tuple[OrderedDict, OrderedDict]:
    chosen = set(names)
    return (OrderedDict((k, t) for k, t in ckpt.tensors.items() if k in chosen),
            OrderedDict((k, v) for k, v in ckpt.others.items() if k in chosen))


def filter_keys(input: str, write: WriteOptions, *, keep: list[str] | None = None, like: str | None = None,
                root: str | None = None) -> FilterReport:
    """Keep the keys that patterns select, or exactly the keys a template checkpoint has
    (`{k: v for k, v in pretrained.items() if k in model_dict}`)."""
    write = check_write_options(write)
    if bool(keep) == bool(like):
        raise UsageError("give either --keep PATTERN (repeatable) or --like TEMPLATE, not both")
    with open_checkpoint(input, root) as ckpt:
        missing: list[str] = []
        if keep:
            names = core.select(_keys(ckpt), keep)
        else:
            with open_checkpoint(like) as template:
                wanted = _keys(template)
            present, have = set(wanted), set(_keys(ckpt))
            names = [k for k in _keys(ckpt) if k in present]
            missing = [k for k in wanted if k not in have]
            if not names:
                raise CkptError(f"{input} and the template {like} share no key "
                                f"(different prefixes? see `ckptsurgery rename` or `merge --into`)")
        kept, others = _subset(ckpt, names)
        written = write_checkpoint(kept, write, source=ckpt, others=others)
    chosen = set(names)
    return FilterReport.extend(written, kept=names, left_out=[k for k in _keys(ckpt) if k not in chosen],
                               missing_from_input=missing)


def drop_keys(input: str, patterns: list[str], write: WriteOptions, *, root: str | None = None) -> DropReport:
    """Remove the keys (or whole modules) that patterns select."""
    write = check_write_options(write)
    with open_checkpoint(input, root) as ckpt:
        dropped = core.select(_keys(ckpt), patterns)
        gone = set(dropped)
        kept, others = _subset(ckpt, [k for k in _keys(ckpt) if k not in gone])
        written = write_checkpoint(kept, write, source=ckpt, others=others)
    return DropReport.extend(written, dropped=dropped, kept=[*kept, *others])


def rename_keys(input: str, rules: list[core.RenameRule], write: WriteOptions, *,
                root: str | None = None, allow_unchanged: bool = False) -> RenameReport:
    """Rename keys by rules; refuse, before writing anything, if two keys would share a name, or
    if a rule changes no key (unless `allow_unchanged`: the same command run twice then writes
    the same file)."""
    write = check_write_options(write)
    with open_checkpoint(input, root) as ckpt:
        names, untouched = core.plan_rename(_keys(ckpt), rules, allow_unchanged)
        renamed = OrderedDict((names[k], t) for k, t in ckpt.tensors.items())
        others = OrderedDict((names[k], v) for k, v in ckpt.others.items())
        # _metadata holds module versions by the old module names: stale after a rename
        written = write_checkpoint(renamed, write, source=ckpt, keep_metadata=False, others=others)
    return RenameReport.extend(written, renamed={old: new for old, new in names.items() if old != new},
                               untouched=untouched)
