"""merge, plain: the union of the sources' state dicts (`--on-conflict`)."""

from __future__ import annotations

from collections import OrderedDict
from contextlib import ExitStack

from ... import core
from ...errors import CkptError
from ...io import Checkpoint, TensorRef
from ..inputs import open_inputs, with_read
from ..options import READ_AS_IS, ReadOptions, WriteOptions, check_write_options, dtype_to_cast
from ..reports import UnionReport
from ..write import write_checkpoint


def merge_union(sources: list[str], write: WriteOptions, *, on_conflict: str | None = None,
                dtype: str | None = None, root: str | None = None, read: ReadOptions = READ_AS_IS) -> UnionReport:
    """The union of the sources' state dicts, in order; a key in several sources follows
    `on_conflict`: "error" (the default; nothing written), "first" or "last". `dtype` casts the
    floating tensors written. A .safetensors output keeps the first source's metadata. `read`: how
    the sources are read (ops/inputs.py: scaled FP8 weights dequantized, GGUF names)."""
    write = check_write_options(write)
    on_conflict = core.check_choice("error" if on_conflict is None else on_conflict, core.CONFLICT_POLICIES,
                                    "--on-conflict")
    cast = dtype_to_cast(dtype)
    with ExitStack() as stack:
        ckpts, done = open_inputs(stack, sources, root, read, cast)
        merged, others, details = _plain_union(ckpts, on_conflict)
        written = write_checkpoint(merged, write, source=ckpts[0], cast=cast, others=others,
                                   inputs=[*ckpts, ckpts[0]])
    return UnionReport.extend(with_read(written, done), input=None, mode="union", sources=list(sources), **details)



def _plain_union(ckpts: list[Checkpoint], on_conflict: str) -> tuple[OrderedDict, OrderedDict, dict]:
    """The union of the sources' state dicts — tensors and non-tensor entries alike, so that a
    later source's `fc._extra_state` neither vanishes nor silently replaces a tensor."""
    merged: OrderedDict[str, object] = OrderedDict()
    origin: dict[str, int] = {}
    conflicts: list[str] = []
    for index, ckpt in enumerate(ckpts):
        for name, value in [*ckpt.tensors.items(), *ckpt.others.items()]:
            if name in merged:
                conflicts.append(name)
                if on_conflict != "last":
                    continue
            merged[name] = value
            origin[name] = index
    if conflicts and on_conflict == "error":
        unique = sorted(set(conflicts))
        raise CkptError(f"{len(unique)} key(s) are in more than one source: {', '.join(unique[:20])}"
                        f"{' …' if len(unique) > 20 else ''} (choose with --on-conflict first|last, or combine "
                        f"their values with --average or --method)")
    counts = [sum(1 for i in origin.values() if i == n) for n in range(len(ckpts))]
    tensors = OrderedDict((k, v) for k, v in merged.items() if isinstance(v, TensorRef))
    others = OrderedDict((k, v) for k, v in merged.items() if not isinstance(v, TensorRef))
    return tensors, others, {"conflicts": sorted(set(conflicts)), "on_conflict": on_conflict,
                             "keys_from": counts}  # per source, in the order of `sources`
