"""Folding adapters into a base checkpoint (`merge BASE --lora ADAPTER...`), per base weight W
(computed in float32, float64 for a float64 W, written in W's dtype):

    W' = W + Σ_adapters S · scale · ΔW        scale = α/r (α/√r with rsLoRA; kohya: alpha/rank)

with ΔW made from each module's factors by its kinds.Layout (see `delta`) — what peft's
`get_delta_weight` computes for Linear, Embedding and ConvNd (its conv form, conv(Aᵀ, B)ᵀ, is
the same sum over r). Folding knows adapters only through kinds.Adapter and the table of formats
(read.FORMATS), so a new format folds without a change here."""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

from ...errors import CkptError, UsageError
from ...io import Checkpoint, TensorRef
from ...io.model import computed_tensor
from ..digest import tensor_sha256
from ..reports import AdapterFolded
from .kinds import FLAT, TRANSPOSED, Adapter, Layout, Module, Resolver
from .read import resolver


@dataclass
class Folded:
    """What `fold` did: merge --lora's report (reports.FoldReport) without the write's fields,
    in the same order."""

    adapters: list[AdapterFolded]
    folded: int  # base tensors changed by any adapter (tied names each)
    changed: list[str]  # their names
    unmatched: list[str]  # every adapter's unmatched names


def fold_into(base: Checkpoint, adapters: list[tuple[Adapter, float]], *,
         allow_unmatched: bool = False, cast=None) -> tuple[OrderedDict, Folded]:
    """The base's state dict with every adapter folded in, in the given order, each with its
    scale S (W' = W + S·scale·ΔW). Untouched tensors are the base's own (no copy). Names tied in
    the base (one storage) get the sum of the deltas aimed at any of them and stay tied — as
    peft's in-place merge into a shared parameter does. `cast`: the dtype a folded tensor is
    written in (default its own), so it is rounded once. Nothing is computed until the tensors
    are written. Returns (tensors, what was folded)."""
    tensors = base.tensors
    groups: dict[tuple, list[str]] = {}  # tied names: one view of one storage
    for name, t in tensors.items():
        groups.setdefault(t.view_key(), []).append(name)
    owner = {name: names[0] for names in groups.values() for name in names}
    steps: dict[str, list[tuple]] = OrderedDict()  # first name of a tie group -> its steps
    reports = [_fold_one(base, adapter, scale, owner, steps, allow_unmatched) for adapter, scale in adapters]
    out: OrderedDict[str, TensorRef] = OrderedDict()
    made: dict[str, TensorRef] = {}
    for name, t in tensors.items():
        first = owner[name]
        if first in steps:
            if first not in made:
                made[first] = _folded(tensors[first], steps[first], cast or tensors[first].dtype)
            out[name] = made[first]
        else:
            out[name] = t
    changed = [name for name in tensors if owner[name] in steps]
    return out, Folded(reports, len(changed), changed, [name for r in reports for name in r.unmatched])


def _fold_one(base: Checkpoint, adapter: Adapter, scale: float, owner: dict[str, str],
              steps: dict[str, list[tuple]], allow_unmatched: bool) -> AdapterFolded:
    """One adapter's steps added to `steps` (tie group -> steps), every shape checked first."""
    tensors = base.tensors
    resolve = resolver(adapter, list(tensors))
    found, unmatched = _matched(adapter, resolve)
    square = _square_layouts([(m, tensors[k]) for m, k in found], bool(adapter.config.get("fan_in_fan_out")))
    folded: set[str] = set()
    for module, key in found:
        layout = _check_shapes(adapter, module, key, tensors[key], square.get(module.name))
        steps.setdefault(owner[key], []).append(("delta", module, scale * module.scale, layout))
        folded.add(key)
        if module.bias is not None:
            bias_key = key[: -len("weight")] + "bias"
            target = tensors.get(bias_key)
            if target is None or target.shape != module.bias.shape or not target.dtype.floating:
                raise CkptError(f"{adapter.path}: {module.name} has a LoRA bias (lora_bias) but the base has no "
                                f"matching floating {bias_key}")
            steps.setdefault(owner[bias_key], []).append(("bias", module.bias, scale * module.scale))
            folded.add(bias_key)
    replaced = _replacements(adapter, resolve, tensors, owner, steps, unmatched)
    prefix = resolve.check(adapter.path)
    if unmatched and not allow_unmatched:
        shown = ", ".join(unmatched[:8]) + (f" … (+{len(unmatched) - 8})" if len(unmatched) > 8 else "")
        raise CkptError(f"{adapter.path}: {len(unmatched)} LoRA weight(s) match no weight of {base.path}: "
                        f"{shown} (is it the right base? --allow-unmatched folds the rest)")
    return AdapterFolded(path=adapter.path, format=adapter.format.value, scale=scale, modules=len(adapter.modules),
                         folded=len(folded), replaced=replaced, unmatched=unmatched, prefix=prefix or None)


def _matched(adapter: Adapter, resolve: Resolver) -> tuple[list[tuple[Module, str]], list[str]]:
    """(module, base key) for each module the base has, and the names of those it lacks."""
    found, unmatched = [], []
    claimed: dict[str, str] = {}  # base key -> the adapter's module folded into it
    for module in adapter.modules:
        key = resolve.module_key(module.name)
        if key is None:
            unmatched.append(module.name)
            continue
        if key in claimed:  # lora_te1_x and lora_te2_x on one text encoder: twice the delta
            raise CkptError(f"{adapter.path}: {claimed[key]} and {module.name} both fold into the base's "
                            f"{key}; fold into the component each was made for")
        claimed[key] = module.name
        found.append((module, key))
    return found, unmatched


def _replacements(adapter: Adapter, resolve: Resolver, tensors: dict[str, TensorRef], owner: dict[str, str],
                  steps: dict[str, list[tuple]], unmatched: list[str]) -> list[str]:
    """The base keys the adapter's whole tensors replace (a step each); names the base lacks are
    added to `unmatched`. A tensor equal to the base's own is no step."""
    replaced = []
    for name, t in adapter.replaced.items():
        key = resolve(name)
        if key is None:
            unmatched.append(name)
            continue
        target = tensors[key]
        if t.shape != target.shape or not (t.dtype.floating and target.dtype.floating):
            raise CkptError(f"{adapter.path}: {name} {list(t.shape)} {t.dtype.name} cannot replace the base's "
                            f"{key} {list(target.shape)} {target.dtype.name}")
        if t.dtype is target.dtype and tensor_sha256(t) == tensor_sha256(target):
            continue  # the base's own values (peft saves the base embedding layer as it was)
        steps.setdefault(owner[key], []).append(("replace", t))
        replaced.append(key)
    return replaced


def delta(module: Module, shape: tuple[int, ...], wide, layout: Layout | None = None):
    """ΔW of one module (without its scale), in dtype `wide`, shaped like the base weight."""
    from ...io.tensors import as_torch

    layout = layout or module.layout
    a = as_torch(module.a).to(wide)
    b = as_torch(module.b).to(wide)
    if layout in TRANSPOSED:
        return (b @ a).T
    if layout == Layout.CONV or a.dim() != 2 or b.dim() != 2:
        return (b.flatten(1) @ a.flatten(1)).reshape(shape)
    return b @ a


def _orientation(module: Module, base: TensorRef) -> Layout | None:
    """linear or linear-t where a 2-D weight's shape tells (it is not square), else None."""
    a, b = module.a.shape, module.b.shape
    if module.layout not in FLAT or len(a) != 2 or len(b) != 2 or a[1] == b[0]:
        return None
    return {(b[0], a[1]): Layout.LINEAR, (a[1], b[0]): Layout.LINEAR_T}.get(tuple(base.shape))


def _square_layouts(modules: list[tuple[Module, TensorRef]], config_says: bool) -> dict[str, Layout]:
    """The layout of each square linear weight, which its shape cannot tell. peft decides by the
    module's class — transformers' Conv1D transposed, nn.Linear not — and rewrites the config's
    fan_in_fan_out as it goes (the saved value is the last module's). So: what the adapter's
    other weights show (its siblings under the same parent first, then those of the same name,
    then all of them; see `_evidence`) when they agree; the config where no weight shows
    anything; nn.Linear's where the nearest evidence disagrees."""
    seen: dict[tuple, set[Layout]] = {}
    for module, base in modules:
        layout = _orientation(module, base)
        if layout:
            for evidence in _evidence(module.name):
                seen.setdefault(evidence, set()).add(layout)
    out = {}
    for module, base in modules:
        a, b = module.a.shape, module.b.shape
        if module.layout not in FLAT or len(a) != 2 or len(b) != 2 or a[1] != b[0]:
            continue
        same = next((seen[e] for e in _evidence(module.name) if e in seen), None)
        if not same:
            out[module.name] = Layout.LINEAR_T if config_says else Layout.LINEAR
        else:
            out[module.name] = next(iter(same)) if len(same) == 1 else Layout.LINEAR
    return out


def _evidence(name: str) -> list[tuple]:
    """Where a module's class shows, nearest first: its siblings (GPT-2's attn.c_attn for
    attn.c_proj), modules of its own name elsewhere (mlp.c_proj), then every module."""
    parent, _, leaf = name.rpartition(".")
    return [("parent", parent), ("name", leaf), ("all",)]


def _check_shapes(adapter: Adapter, module: Module, key: str, base: TensorRef, square: Layout | None = None) -> Layout:
    """The factors must make exactly the base weight's shape, checked before anything is written.
    Returns the layout that makes it (linear or linear-t decided by the shape where it can)."""
    a, b = tuple(module.a.shape), tuple(module.b.shape)
    where = f"{adapter.path}: {module.name}"
    if not (module.a.dtype.floating and module.b.dtype.floating):
        raise CkptError(f"{where}: LoRA factors of dtype {module.a.dtype.name}/{module.b.dtype.name}; "
                        f"expected floating point")
    if not base.dtype.floating or not base.is_plain:
        raise CkptError(f"{where}: the base's {key} is {base.dtype.name}; a LoRA folds into floating-point "
                        f"weights only")
    if len(a) < 2 or len(b) < 2 or b[1] != a[0]:
        grouped = " (a grouped conv? peft cannot merge those either)" if len(b) > 2 else ""
        raise CkptError(f"{where}: lora_B {list(b)} does not follow lora_A {list(a)}{grouped}")
    made, layout = None, module.layout
    if layout in FLAT and len(a) == len(b) == 2:
        # peft transposes for transformers' Conv1D ([in, out]) and never for nn.Linear, whatever
        # fan_in_fan_out says: the base's shape tells which, except for a square weight
        if a[1] != b[0]:
            layout = Layout.LINEAR_T if tuple(base.shape) == (a[1], b[0]) else Layout.LINEAR
        elif square:
            layout = square
    if layout in TRANSPOSED:
        made = (a[1], b[0]) if len(a) == len(b) == 2 else None
    elif len(a) == len(b) == 2:
        made = (b[0], a[1])
    elif all(s == 1 for s in b[2:]):  # conv: B [out, r, 1…], A [r, in, k…]
        made = (b[0], *a[1:])
        # kohya's 1×1 conv factors on a linear weight, or linear factors on a 1×1 conv
        if made != tuple(base.shape) and base.shape and base.shape[0] == b[0] and math.prod(made) == base.numel \
                and all(s == 1 for s in (*made[2:], *base.shape[2:])):
            made = tuple(base.shape)
    if made != tuple(base.shape):
        raise CkptError(f"{where}: factors A {list(a)}, B {list(b)} do not make the base's {key} "
                        f"{list(base.shape)}; is this adapter for another model?")
    return layout


def _folded(base: TensorRef, steps: list[tuple], dtype) -> TensorRef:
    """`base` with `steps` applied in order: ("delta", module, factor, layout) adds factor·ΔW,
    ("bias", vector, factor) adds factor·vector, ("replace", tensor) takes the tensor's values."""

    def make():
        import torch

        from ...io.tensors import as_torch, to_bytes

        wide = torch.float64 if base.dtype.name == "float64" else torch.float32
        out = as_torch(base).to(wide, copy=True)
        for step in steps:
            if step[0] == "replace":
                out = as_torch(step[1]).to(wide, copy=True)
            elif step[0] == "bias":
                out.add_(as_torch(step[1]).to(wide), alpha=step[2])
            else:
                out.add_(delta(step[1], base.shape, wide, step[3]), alpha=step[2])
        return to_bytes(out.to(getattr(torch, dtype.name)))  # rounded once, to what is written

    return computed_tensor(base.shape, dtype, make)


def parse_scales(scales: list[float] | None, count: int) -> list[float]:
    """--lora-scale: none (1 each), one (for every --lora), or one per --lora in order."""
    if not scales:
        return [1.0] * count
    if count == 0:
        raise UsageError("--lora-scale applies to --lora only")
    values = [float(s) for s in scales]
    if not all(math.isfinite(v) for v in values):
        raise UsageError("--lora-scale must be a finite number")
    if len(values) == 1:
        return values * count
    if len(values) != count:
        raise UsageError(f"--lora-scale given {len(values)} times for {count} --lora: give it once (for all) "
                         f"or once per --lora, in the same order")
    return values
