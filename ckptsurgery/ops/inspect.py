"""inspect: what a checkpoint holds, from its headers alone, and on request per-tensor statistics
(streamed) and a per-module tree with numbered repeats folded."""

from __future__ import annotations

import re
from operator import attrgetter
from typing import Callable

from .. import core
from ..errors import CkptError, UsageError
from ..io import Checkpoint, TensorRef
from ..io.model import numel_of
from ..io.tree import describe, extras, module_state
from .inputs import open_input, with_read
from .options import READ_AS_IS, ProgressFactory, ReadOptions
from .reports import InspectReport, Records


def inspect_checkpoint(input: str, *, keys: list[str] | None = None, stats: bool = False, tree: bool = False,
            depth: int | None = None, hash: bool = False, root: str | None = None,
            progress: ProgressFactory | None = None, read: ReadOptions = READ_AS_IS) -> InspectReport:
    """The report of `inspect_report` for the keys that `keys` select; with `stats`, each tensor's
    `tensor_stats` (reads data); with `hash`, each tensor's "sha256" and the listed tensors'
    "fingerprint" (ops/digest.py); with `tree`, the `module_tree` rows under "tree", `depth`
    levels deep. `read`: how the input is read (ops/inputs.py: scaled FP8 weights as they read
    dequantized, bfloat16, their scales gone; a GGUF file's names)."""
    if depth is not None and not tree:
        raise UsageError("--depth applies to --tree only")
    if depth is not None and (type(depth) is not int or depth < 1):
        raise UsageError(f"--depth {depth!r}: give a number of levels, 1 or more")
    with open_input(input, root, read) as (ckpt, done):
        report = with_read(inspect_report(ckpt, keys), done)
        records = report.tensors
        # the listed tensors, for what reads them (a plain listing needs no second table)
        chosen = {name: ckpt.tensors[name] for name in records.names} if stats or hash or tree else {}
        if stats:
            tick = progress(sum(map(_stored_nbytes, chosen.values())), "reading tensors") if progress else None
            if hash and _any_remote(chosen):  # each remote tensor fetched once for both
                records.stats, records.hashes = _stats_and_hashes(chosen, tick)
            else:
                from .stats import each_stats

                tensors, records.stats = list(chosen.values()), []
                for t, found in zip(tensors, each_stats(tensors)):
                    records.stats.append(found)
                    if tick:
                        tick(_stored_nbytes(t))
        if hash:
            from .digest import fingerprint, hashes_of

            if records.hashes is None:
                tick = progress(sum(t.nbytes for t in _unique_views(chosen, records.shares)), "hashing") \
                    if progress else None
                records.hashes = hashes_of(chosen, tick)
            report.fingerprint = fingerprint(records.hashes)
        if tree:
            report.tree = module_tree(chosen, depth)
    return report


def _any_remote(tensors: dict[str, TensorRef]) -> bool:
    """Whether reading some of the tensors fetches them by range requests (a remote input)."""
    from .spools import remote_range

    return any(remote_range(t) is not None for t in tensors.values())


def _stats_and_hashes(chosen: dict[str, TensorRef], tick) -> tuple[list[dict], dict[str, str]]:
    """`--stats` and `--hash` of tensors some of which are fetched by range requests (a remote
    input's): each distinct view read for both in one go, held between the two reads
    (ops/spools.py: in memory when small, else a temporary file with no name in tempfile's folder,
    closed once read), so it is fetched once; a local one is read twice where it lies."""
    from .digest import tensor_sha256
    from .spools import Spools
    from .stats import each_stats

    found: dict[tuple, tuple[dict, str]] = {}
    stats = []
    with Spools() as spools:
        for t in chosen.values():
            key = t.view_key()
            if key not in found:
                held = spools.hold(t)
                try:
                    found[key] = next(each_stats([held])), tensor_sha256(held)
                finally:
                    spools.release(held)
            stats.append(dict(found[key][0]))
            if tick:
                tick(_stored_nbytes(t))
    return stats, {name: found[t.view_key()][1] for name, t in chosen.items()}


def _unique_views(tensors: dict[str, TensorRef], shares: dict[str, str | None]) -> list[TensorRef]:
    """Tied names counted once, as `sum(p.numel() for p in model.parameters())` does. Only the
    tensors of a storage that several names share need comparing."""
    shared = {id(tensors[name].storage) for name, owner in shares.items() if owner is not None and name in tensors}
    if not shared:
        return list(tensors.values())
    alone = [t for t in tensors.values() if id(t.storage) not in shared]
    return alone + list({t.view_key(): t for t in tensors.values() if id(t.storage) in shared}.values())


def inspect_report(ckpt: Checkpoint, patterns: list[str] | None = None) -> InspectReport:
    """What `ckpt` holds (the tensors `patterns` select), from its headers alone."""
    names = core.select(ckpt.tensors, patterns) if patterns else list(ckpt.tensors)
    shares = {name: owner for name, owner in ckpt.shares_with().items() if owner is not None}
    chosen = ckpt.tensors if len(names) == len(ckpt.tensors) else {n: ckpt.tensors[n] for n in names}
    unique = _unique_views(chosen, shares)
    trainable, frozen = _trainable_and_frozen(unique) if _is_whole_model(ckpt) else (None, None)
    return InspectReport(
        path=ckpt.path,
        format=ckpt.format,
        root=ckpt.root,
        extras=extras(ckpt.obj, ckpt.root) if ckpt.root is not None else {},
        # non-tensor values inside the state dict itself (`fc._extra_state`)
        non_tensors={name: describe(value) for name, value in ckpt.others.items()},
        metadata=ckpt.metadata,
        inert=ckpt.inert,
        total_params=sum(map(numel_of, map(attrgetter("shape"), unique))),
        total_bytes=sum(map(_stored_nbytes, unique)),
        trainable_params=trainable,
        frozen_params=frozen,
        tensors=TensorRecords(ckpt.tensors, names, shares),
    )


class TensorRecords(Records):
    """`InspectReport.tensors`: each tensor's record made from the table when read (see
    Records), with its `--stats` figures and `--hash` once inspect_checkpoint has them."""

    def __init__(self, tensors: dict[str, TensorRef], names: list[str], shares: dict[str, str]):
        self.tensors, self.names = tensors, names
        self.shares = shares  # name -> the first name of its storage, for the names that share one
        self.stats: list[dict] | None = None  # per record, in order
        self.hashes: dict[str, str] | None = None

    def __len__(self) -> int:
        return len(self.names)

    def record(self, i: int) -> dict:
        name = self.names[i]
        t = self.tensors[name]
        out = {"name": name, "dtype": _dtype_shown(t), "shape": list(t.shape), "nbytes": _stored_nbytes(t),
               "requires_grad": t.requires_grad, "shares_with": self.shares.get(name), "contiguous": t.is_contiguous}
        if t.quant:
            out["quantization"] = _quantization(t)
        if self.stats is not None:
            out.update(self.stats[i])
        if self.hashes is not None:
            out["sha256"] = self.hashes[name]
        return out


def _dtype_shown(t: TensorRef) -> str:
    """Its dtype, or the file's own type when it is decoded as it is read (GGUF's Q4_K)."""
    return t.encoded.type if t.encoded else t.dtype.name


def _stored_nbytes(t: TensorRef) -> int:
    """The bytes the file holds for it: a tensor decoded as it is read (GGUF's Q4_K) counts its blocks."""
    return t.encoded.nbytes if t.encoded else t.nbytes


def _is_whole_model(ckpt: Checkpoint) -> bool:
    """Whether the state dict is a pickled nn.Module's (`torch.save(model)`, at the top level or
    under a key), whose parameters record requires_grad; a dict of tensors is not, even if it
    holds an nn.Parameter (its record says `requires_grad` all the same)."""
    if ckpt.obj is None or ckpt.root is None:
        return False
    if ckpt.root == "":
        return module_state(ckpt.obj) is not None
    return isinstance(ckpt.obj, dict) and module_state(ckpt.obj.get(ckpt.root)) is not None


def _trainable_and_frozen(unique: list[TensorRef]) -> tuple[int | None, int | None]:
    """Elements of the parameters with requires_grad true, and false (a whole pickled model's
    nn.Parameters record it; its buffers do not): (None, None) when no tensor records it."""
    flagged = [t for t in unique if t.requires_grad is not None]
    if not flagged:
        return None, None
    trainable = sum(numel_of(t.shape) for t in flagged if t.requires_grad)
    return trainable, sum(numel_of(t.shape) for t in flagged) - trainable


def _quantization(t: TensorRef) -> dict:
    """A quantized tensor's scheme and, per tensor, its scale and zero point (per channel: the axis)."""
    q = t.quant
    if q.axis is None:
        return {"scheme": q.scheme.name, "scale": q.scale, "zero_point": q.zero_point}
    return {"scheme": q.scheme.name, "axis": q.axis, "channels": q.scale.numel}


_FROZEN, _TRAINABLE = 1, 2  # a node's `grads`: the requires_grad flags of the parameters under it


class _Node:
    __slots__ = ("children", "tensor", "params", "nbytes", "sig", "grads")

    def __init__(self):
        self.children: dict[str, _Node] = {}
        self.tensor: TensorRef | None = None
        self.params = self.nbytes = self.grads = 0
        self.sig: int | None = None


def _signature(node: _Node, ids: dict) -> int:
    """Structure and shapes as a number, equal for subtrees that repeat each other (numbered
    siblings). Hash-consed bottom-up with an explicit stack: names may nest thousands of levels,
    deeper than Python's recursion (or nested tuples' comparison) allows."""
    if node.sig is not None:
        return node.sig
    stack = [node]
    while stack:
        n = stack[-1]
        pending = [c for c in n.children.values() if c.sig is None]
        if pending:  # children first; each is finished before `n` is seen again
            stack.extend(pending)
            continue
        stack.pop()
        # requires_grad too: frozen layers never fold with trainable ones
        own = (_dtype_shown(n.tensor), n.tensor.shape, n.tensor.requires_grad) if n.tensor is not None else None
        n.sig = ids.setdefault((own, tuple((k, c.sig) for k, c in n.children.items())), len(ids))
    return node.sig


def _child_rows(node: _Node, prefix: str, level: int, ids: dict):
    """(row, first member) for each child of `node`, numbered repeats folded."""
    kids = node.children
    for label, members in fold_runs(list(kids), lambda n: _signature(kids[n], ids)):
        child = kids[members[0]]
        row = {"name": prefix + label, "label": label, "depth": level,
               "params": sum(kids[m].params for m in members),
               "bytes": sum(kids[m].nbytes for m in members), "repeat": len(members)}
        if child.tensor is not None and not child.children:
            row.update(dtype=_dtype_shown(child.tensor), shape=list(child.tensor.shape))
        if child.grads == _FROZEN:  # members fold only when their flags agree (`_signature`)
            row["frozen"] = True
        yield row, child


MAX_TREE_LEVELS = 5000  # rows repeat their path: memory grows as levels² (5000: ~60 MB)


def module_tree(tensors: dict[str, TensorRef], depth: int | None = None) -> list[dict]:
    """Per-module rows (name, depth, params, bytes, repeat; `frozen` when every parameter under
    it has requires_grad false, as a whole pickled model records), numbered siblings with the
    same structure folded into one row (`blocks.{0..23}`) whatever order the file lists them in
    (see `fold_runs`), down to `depth` levels."""
    top = _Node()
    for name, t in tensors.items():
        numel, nbytes = t.numel, _stored_nbytes(t)
        grads = 0 if t.requires_grad is None else _TRAINABLE if t.requires_grad else _FROZEN
        node = top
        parts = name.split(".")
        if len(parts) > MAX_TREE_LEVELS:
            raise CkptError(f"--tree: key {name[:40]!r}... has {len(parts)} levels, more than "
                            f"{MAX_TREE_LEVELS}; list it without --tree")
        for part in parts:
            child = node.children.get(part)
            if child is None:
                child = node.children[part] = _Node()
            node = child
            node.params += numel
            node.nbytes += nbytes
            node.grads |= grads
        node.tensor = t
    rows: list[dict] = []
    ids: dict = {}
    open_levels = [_child_rows(top, "", 0, ids)]  # one generator per level being listed: no recursion
    while open_levels:
        item = next(open_levels[-1], None)
        if item is None:
            open_levels.pop()
            continue
        row, child = item
        rows.append(row)
        if depth is None or row["depth"] + 1 < depth:
            open_levels.append(_child_rows(child, row["name"] + ".", row["depth"] + 1, ids))
    return rows


# A run member: ASCII digits only (str.isdigit accepts "²" and "١", which int() refuses), and
# short enough that int() never meets Python's limit on the digits of a string.
_INDEX = re.compile(r"0|[1-9][0-9]{0,17}")  # as a number writes itself: `01` is a name, not layer 1


def fold_runs(names: list[str], signature: Callable[[str], object]) -> list[tuple[str, list[str]]]:
    """Group numbered siblings whose numbers follow one another (`0`, `1`, ... `23`) and whose
    signatures are equal into one entry labelled `{0..23}`; other names stand alone. Returns
    (label, members). The numbered siblings are taken in numeric order, whatever order the file
    lists them in (safetensors stores names sorted as strings: `0, 1, 10, 11, 2, ...`), at the
    place of the first of them; the other names keep their order."""
    numbered = [name for name in names if _INDEX.fullmatch(name)]
    if not numbered:
        return [(name, [name]) for name in names]
    first = names.index(numbered[0])
    runs: list[list[str]] = []
    for name in sorted(numbered, key=int):  # stable: "1" and "01" keep the file's order
        run = runs[-1] if runs else None
        if run and int(name) == int(run[-1]) + 1 and signature(name) == signature(run[0]):
            run.append(name)
        else:
            runs.append([name])
    return ([(name, [name]) for name in names[:first]]
            + [(f"{{{run[0]}..{run[-1]}}}" if len(run) > 1 else run[0], run) for run in runs]
            + [(name, [name]) for name in names[first:] if not _INDEX.fullmatch(name)])
