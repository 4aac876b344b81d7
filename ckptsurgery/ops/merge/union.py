"""merge, plain: the union of the sources' state dicts (`--on-conflict`)."""

from __future__ import annotations

from collections import OrderedDict

from ...errors import CkptError
from ...io import Checkpoint, TensorRef


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
                        f"{' …' if len(unique) > 20 else ''} (choose with --on-conflict first|last)")
    counts = [sum(1 for i in origin.values() if i == n) for n in range(len(ckpts))]
    tensors = OrderedDict((k, v) for k, v in merged.items() if isinstance(v, TensorRef))
    others = OrderedDict((k, v) for k, v in merged.items() if not isinstance(v, TensorRef))
    return tensors, others, {"conflicts": sorted(set(conflicts)), "on_conflict": on_conflict,
                             "keys_from": counts}  # per source, in the order of `sources`
