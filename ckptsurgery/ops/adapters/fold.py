"""Folding adapters into a base checkpoint (`merge BASE --lora ADAPTER...`), per base weight W
(computed in float32, float64 for a float64 W, written in W's dtype): each adapter's modules
change the weights they resolve to, in the order given, each by its kind (read.KINDS: LoRA's
W + S·s·ΔW and the others, see kind_<name>.py) with the user's scale S.

A folded tensor is made a chunk of rows at a time when it is written: the base's rows, widened,
then each step of each module on them (kinds.Step) — no more than a chunk of W is ever widened,
and a step that needs every row first (a norm over a column) sees them in a pass before. A tensor
whose steps can all be made in numpy (`Step.numpy`: every kind's steps from plain float factors
laid out in their files — LoRA's ΔW, DoRA's norms and rescale, IA3's vector, LoHa's and LoKr's
products, LyCORIS's dora_scale — and a replacing tensor), its base a plain float, is folded
in numpy, without torch, and rounded once as torch rounds (`methods._codec.encode`); any other in torch.
A norm in numpy sums its squares in float64 and may differ from torch's float32 norm by an ulp.
Folding knows adapters only through kinds.Adapter and the two tables (read.FORMATS, read.KINDS),
so a new format or kind folds without a change here."""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

from ...errors import CkptError, UsageError
from ...io import Checkpoint, TensorRef
from ...io.model import chunked_tensor
from ..digest import tensor_sha256
from ..reports import AdapterFolded
from ..spools import Spools
from .kind_lora import delta_rows
from .kinds import (NUMPY_DTYPES, Adapter, Layout, Module, Resolver, Step, numpy_ready, raw_rows, row_reader,
                    row_values, widen)
from .read import KINDS, resolver

CHUNK = 1 << 20  # elements of a folded tensor made at a time (whole rows): 4 MiB of float32, few
# enough torch calls per weight that their fixed cost does not show, small beside the model


@dataclass
class Folded:
    """What `fold` did: merge --lora's report (reports.FoldReport) without the write's fields,
    in the same order."""

    adapters: list[AdapterFolded]
    folded: int  # base tensors changed by any adapter (tied names each)
    changed: list[str]  # their names
    unmatched: list[str]  # every adapter's unmatched names


def fold_into(base: Checkpoint, adapters: list[tuple[Adapter, float]], *,
         allow_unmatched: bool = False, cast=None, spools: Spools | None = None) -> tuple[OrderedDict, Folded]:
    """The base's state dict with every adapter folded in, in the given order, each with its
    scale S, each module by its kind (read.KINDS; a LoRA's W + S·s·ΔW). Untouched tensors are the
    base's own (no copy). Names tied in the base (one storage) get every change aimed at any of
    them and stay tied — as peft's in-place merge into a shared parameter does. `cast`: the dtype a folded tensor is
    written in (default its own), so it is rounded once. Nothing is computed until the tensors
    are written. `spools`: where a weight of a remote base that a fold reads twice (DoRA's norms,
    then its rows) is kept between the reads (ops/spools.py; default tempfile's folder, closed with
    `base`). Returns (tensors, what was folded)."""
    tensors = base.tensors
    groups: dict[tuple, list[str]] = {}  # tied names: one view of one storage
    for name, t in tensors.items():
        groups.setdefault(t.view_key(), []).append(name)
    owner = {name: names[0] for names in groups.values() for name in names}
    steps: dict[str, list[Step]] = OrderedDict()  # first name of a tie group -> its steps
    reports = [_fold_one(base, adapter, scale, owner, steps, allow_unmatched) for adapter, scale in adapters]
    out: OrderedDict[str, TensorRef] = OrderedDict()
    made: dict[str, TensorRef] = {}
    recent = _Recent()
    if spools is None and any(_reads_twice(tensors[first], its) for first, its in steps.items()):
        spools = Spools()
        base.sources.append(spools)  # closed with the base: when the command ends, fails or is interrupted
    for name, t in tensors.items():
        first = owner[name]
        if first in steps:
            if first not in made:
                made[first] = _folded(tensors[first], steps[first], cast or tensors[first].dtype, recent, spools)
            out[name] = made[first]
        else:
            out[name] = t
    changed = [name for name in tensors if owner[name] in steps]
    return out, Folded(reports, len(changed), changed, [name for r in reports for name in r.unmatched])


def _fold_one(base: Checkpoint, adapter: Adapter, scale: float, owner: dict[str, str],
              steps: dict[str, list[Step]], allow_unmatched: bool) -> AdapterFolded:
    """One adapter's steps added to `steps` (tie group -> steps), every module checked first."""
    tensors = base.tensors
    resolve = resolver(adapter, list(tensors))
    found, unmatched = _matched(adapter, resolve)
    square = _square_layouts([(m, tensors[k]) for m, k in found], bool(adapter.config.get("fan_in_fan_out")))
    changes = []
    for module, key in found:
        kind = KINDS[module.kind]
        unknown = sorted(set(module.factors) - set(kind.factors))
        if unknown:  # never fold part of a module
            raise CkptError(f"{adapter.path}: {module.name}: {unknown[0]} is not a factor of a {kind.name} module "
                            f"({', '.join(kind.factors)}); not folded")
        bias_key = key[: -len("weight")] + "bias"
        layout = kind.check(f"{adapter.path}: {module.name}", module, key, tensors[key], tensors.get(bias_key),
                            square.get(module.name))
        made = [(target, step) for what, step in kind.steps(module, layout, scale, tensors[key])
                if (target := key if what == "weight" else bias_key) in tensors]
        for target, step in made:
            _refuse_overflowing(adapter, module, tensors[target], step)
        changes += made
    folded: set[str] = set()
    for key, step in changes:  # none before every module is checked
        steps.setdefault(owner[key], []).append(step)
        folded.add(key)
    replaced = _replacements(adapter, resolve, tensors, owner, steps, unmatched)
    prefix = resolve.check(adapter.path)
    if unmatched and not allow_unmatched:
        shown = ", ".join(unmatched[:8]) + (f" … (+{len(unmatched) - 8})" if len(unmatched) > 8 else "")
        raise CkptError(f"{adapter.path}: {len(unmatched)} LoRA weight(s) match no weight of {base.path}: "
                        f"{shown} (is it the right base? --allow-unmatched folds the rest)")
    kinds = {kind.value: n for kind in KINDS if (n := sum(m.kind == kind for m, _ in found))}
    return AdapterFolded(path=adapter.path, format=adapter.format.value, scale=scale, modules=len(adapter.modules),
                         kinds=kinds, folded=len(folded), replaced=replaced, unmatched=unmatched, prefix=prefix or None)


_FLOAT32_MAX = 3.4028234663852886e38


def _refuse_overflowing(adapter: Adapter, module: Module, target: TensorRef, step: Step) -> None:
    """A step's factor (--lora-scale × the module's scale) must be a number the fold's float32
    (float64 for a float64 weight) holds: torch refuses to add with one beyond it."""
    factor = getattr(step, "factor", None)
    if not isinstance(factor, (int, float)):
        return
    largest = math.inf if target.dtype.name == "float64" else _FLOAT32_MAX
    if not (math.isfinite(factor) and abs(factor) <= largest):
        raise CkptError(f"{adapter.path}: {module.name}: its scale {factor:g} (--lora-scale times the adapter's "
                        f"alpha/r) is beyond the range of the {'float64' if largest == math.inf else 'float32'} it "
                        f"is folded in; nothing was written")


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
                  steps: dict[str, list[Step]], unmatched: list[str]) -> list[str]:
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
        steps.setdefault(owner[key], []).append(_Replaced(t))
        replaced.append(key)
    return replaced


def delta(module: Module, shape: tuple[int, ...], wide, layout: Layout | None = None):
    """ΔW of one LoRA module (without its scale), in dtype `wide`, shaped like the base weight."""
    return delta_rows(module, layout or module.layout, 0, shape[0], shape, wide)


def _square_layouts(modules: list[tuple[Module, TensorRef]], config_says: bool) -> dict[str, Layout]:
    """The layout of each square linear weight, which its shape cannot tell. peft decides by the
    module's class — transformers' Conv1D transposed, nn.Linear not — and rewrites the config's
    fan_in_fan_out as it goes (the saved value is the last module's). So: what the adapter's
    other weights show (their kind's `orientation`: its siblings under the same parent first,
    then those of the same name, then all of them; see `_evidence`) when they agree; the config
    where no weight shows anything; nn.Linear's where the nearest evidence disagrees."""
    seen: dict[tuple, set[Layout]] = {}
    for module, base in modules:
        layout = KINDS[module.kind].orientation(module, base)
        if layout:
            for evidence in _evidence(module.name):
                seen.setdefault(evidence, set()).add(layout)
    out = {}
    for module, base in modules:
        if len(base.shape) != 2 or base.shape[0] != base.shape[1]:
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


class _Replaced(Step):
    """The rows of a tensor that replaces the base's whole (peft's modules_to_save)."""

    def __init__(self, t: TensorRef):
        self.t, self.numpy = t, numpy_ready(t)
        self.read = None  # made at the first torch rows: a numpy fold has no torch

    def rows(self, out, lo: int, hi: int) -> None:
        if self.read is None:
            self.read = row_reader(self.t)
        out.copy_(self.read(lo, hi))

    def rows_numpy(self, out, lo: int, hi: int) -> None:
        out[...] = widen(raw_rows(self.t)[lo:hi], self.t.dtype.name, out.dtype.name)


class _Recent:
    """The chunk of a folded tensor made last (one for all the tensors of a fold): a reader that
    takes a chunk in several spans — a recipe's merge reads a `model+lora` tensor a method's
    chunk at a time — makes it once."""

    def __init__(self):
        import threading

        self.lock = threading.Lock()
        self.key, self.data = None, None

    def get(self, key):
        with self.lock:
            return self.data if key == self.key else None

    def keep(self, key, data) -> None:
        with self.lock:
            self.key, self.data = key, data


def _reads_twice(base: TensorRef, steps: list[Step]) -> bool:
    """Whether making `base`'s rows reads them more than once: a step measures every row first
    (`whole`), or reads the base's own rows beside those the steps change (DoRA's norms: W₀)."""
    key = base.view_key()
    return any(step.whole or _reads_base(step, key) for step in steps)


def _reads_base(step: Step, key: tuple) -> bool:
    """Whether the step reads the base's own rows (`weight`, W₀: DoRA's norms)."""
    weight = getattr(step, "weight", None)
    return isinstance(weight, TensorRef) and weight.view_key() == key


def _folded(base: TensorRef, steps: list[Step], dtype, recent: _Recent, spools: Spools | None = None) -> TensorRef:
    """`base` with `steps` applied in order, made CHUNK elements (whole rows) at a time: in numpy
    when every step can (no torch imported), else in torch. A remote base read more than once is
    fetched once, at the first chunk, kept (`spools.later`) until the last is made."""
    done = None
    if spools is not None and _reads_twice(base, steps):
        held = spools.later(base)
        if held is not base:
            for step in steps:  # the steps that read W₀ read it there too
                if _reads_base(step, base.view_key()):
                    step.weight = held
            base, done = held, lambda: spools.release(held)
    count = base.shape[0] if base.shape else 1
    per_row = base.numel // count if count else 0
    span = max(1, CHUNK // max(per_row, 1))
    spans = [(lo, min(lo + span, count)) for lo in range(0, count, span)]
    sizes = [(hi - lo) * per_row * dtype.itemsize for lo, hi in spans]
    wide = "float64" if base.dtype.name == "float64" else "float32"
    route = _numpy_route if _in_numpy(base, steps, dtype, wide) else _torch_route
    return chunked_tensor(base.shape, dtype, sizes, _chunks(steps, spans, recent, *route(base, steps, dtype, wide),
                                                            done))


def _torch_route(base: TensorRef, steps: list[Step], dtype, wide: str):
    """(rows(lo, hi, upto): rows [lo, hi) after the first `upto` steps, measure(step, rows, lo, hi),
    encode(rows): their bytes in `dtype`) in torch."""
    import torch

    from ...io.tensors import to_bytes

    read, wide_torch, out_torch = row_reader(base), getattr(torch, wide), getattr(torch, dtype.name)

    def rows(lo: int, hi: int, upto: int):
        out = read(lo, hi).to(wide_torch, copy=True)
        for step in steps[:upto]:
            step.rows(out, lo, hi)
        return out

    return rows, lambda step, out, lo, hi: step.measure(out, lo, hi), lambda out: to_bytes(out.to(out_torch))


def _numpy_route(base: TensorRef, steps: list[Step], dtype, wide: str):
    """The same in numpy: no torch (rounded to `dtype` as torch's .to rounds)."""
    from ..methods._codec import encode

    values = row_values(base, wide)

    def rows(lo: int, hi: int, upto: int):
        out = values(lo, hi)
        for step in steps[:upto]:
            step.rows_numpy(out, lo, hi)
        return out

    return rows, lambda step, out, lo, hi: step.measure_numpy(out, lo, hi), lambda out: encode(out, dtype.name)


def _chunks(steps: list[Step], spans: list[tuple[int, int]], recent: _Recent, rows, measure, encode, done=None):
    """j -> the bytes of chunk j (rows spans[j]), every step applied; the steps that need every row
    first (`whole`) see them once, under a lock, as the steps before them left them. `done`: called
    once the last chunk is made."""
    import threading

    tag = object()  # this tensor, in `recent`
    lock = threading.Lock()
    measured: list = []

    def make(j: int):
        data = recent.get((tag, j))
        if data is None:
            with lock:
                if not measured:
                    for k, step in enumerate(steps):
                        if step.whole:
                            for lo, hi in spans:
                                measure(step, rows(lo, hi, k), lo, hi)
                    measured.append(True)
            data = encode(rows(*spans[j], len(steps)))  # rounded once, when written
            recent.keep((tag, j), data)
            if done is not None and j == len(spans) - 1:
                done()
        return data

    return make


def _in_numpy(base: TensorRef, steps: list[Step], dtype, wide: str) -> bool:
    """Whether a folded tensor is made in numpy, without torch: every step can (`Step.numpy`: a
    kind's step from plain float factors, a replacing tensor), the base is a plain float and the
    output a float numpy writes as torch does (rounded once from `wide`: float64 is never
    rounded to bfloat16 through float32)."""
    return (numpy_ready(base) and dtype.name in NUMPY_DTYPES and not (wide == "float64" and dtype.name == "bfloat16")
            and all(step.numpy for step in steps))


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
