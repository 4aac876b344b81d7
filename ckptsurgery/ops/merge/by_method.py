"""merge --method: every key merged by a merge method (ops/methods), chunk by chunk.

`merge_by_method` checks that the models agree and gives each key a tensor computed as the writer
reads it; what the merges note about their keys (slerp's fallback) is read from the result once
the tensors are written (`MethodMerge.notes`). A parameter given as a gradient (`--t 0,0.5,1`) is
spread over the layers found in the reference's key names (or `--layer-pattern`), each key taking
the value a recipe's gradient gives it (ops/recipes: `layer_scheme`, `evaluate`). A key's inputs
are read through `InputReads` (recipes' too): a remote tensor a method's measure pass reads is
fetched once for both passes, kept in memory when small, else in a temporary file (ops/spools.py: `Spools`)."""

from __future__ import annotations

import functools
import threading
from collections import OrderedDict
from contextlib import ExitStack
from dataclasses import dataclass, field

from ... import core
from ...dtypes import DType
from ...errors import CkptError, UsageError
from ...io import Checkpoint, TensorRef
from ...io.model import chunked_tensor, mapped_range
from .. import methods
from ..methods import MergeMethod, Parameters
from ..inputs import open_inputs, with_read
from ..options import READ_AS_IS, ReadOptions, WriteOptions, check_write_options, dtype_to_cast
from ..reports import MethodReport
from ..spools import InMemory, Spools, fetched_by_range, output_folder
from ..write import write_checkpoint


def merge_with_method(sources: list[str], write: WriteOptions, *, method: str | None = None, average: bool = False,
                      base: str | None = None, dtype: str | None = None, root: str | None = None,
                      layer_pattern: str | None = None, read: ReadOptions = READ_AS_IS, **parameters) -> MethodReport:
    """Every key of the models merged by a merge method (ops/methods; `average` is method
    "linear"), with the method's `parameters` by name (weights, density, ...; a float that is
    not per model may be a gradient over the layers, t=[0, 0.5, 1] or "0,0.5,1"); tensors that
    are not floating come from the base (else the first model). `layer_pattern`: the layers'
    regex when the key names do not tell them apart (with a gradient only). A .safetensors
    output keeps the base's metadata (else the first model's). `read`: how the models (and the base)
    are read (ops/inputs.py: scaled FP8 weights dequantized, GGUF names).

    Example:
        >>> merge_with_method(["a.safetensors", "b.safetensors"], WriteOptions("ties.safetensors"),
        ...                   method="ties", base="base.safetensors", density=0.5)
        >>> merge_with_method(["a.safetensors", "b.safetensors"], WriteOptions("slerp.safetensors"),
        ...                   method="slerp", t=[0, 0.5, 1])
    """
    write = check_write_options(write)
    method = _method_named(method, average)
    _check_base(method, base)
    unknown = sorted(set(parameters) - set(methods.PARAMETERS))
    if unknown:
        raise UsageError(f"no merge method takes {', '.join(unknown)}")
    params = methods.resolve_parameters(method, len(sources), {name: parameters.get(name) for name in methods.PARAMETERS})
    if layer_pattern is not None and not params.gradients:
        raise UsageError("--layer-pattern goes with a gradient (--t 0,0.5,1) or --config")
    cast = dtype_to_cast(dtype)
    with ExitStack() as stack:
        ckpts, done = open_inputs(stack, [*sources, *([base] if base is not None else [])], root, read, cast)
        base_ckpt = ckpts.pop() if base is not None else None
        spools = stack.enter_context(Spools(output_folder(write.output)))
        merged = merge_by_method(ckpts, base_ckpt, method, params, cast, layer_pattern, spools)
        first = base_ckpt or ckpts[0]
        written = write_checkpoint(merged.tensors, write, source=first, cast=cast, inputs=[*ckpts, first])
    return MethodReport.extend(with_read(written, done), input=None, mode="method", sources=list(sources), method=method, base=base,
                               parameters=params.report(), layers=merged.layers, merged=merged.merged,
                               not_merged=merged.not_merged,
                               notes=merged.notes())  # read from the keys' merges, once written


def _method_named(method: str | None, average: bool) -> str:
    if average:
        if method not in (None, "linear"):
            raise UsageError(f"--average is --method linear: it does not combine with --method {method}")
        method = "linear"
    return core.check_choice(method, tuple(methods.METHODS), "--method")


def _check_base(method: str, base: str | None) -> None:
    spec = methods.METHODS[method]
    if base is None and spec.needs_base:
        raise UsageError(f"--method {method} needs --base BASE: the model the others' changes are measured from")
    if base is not None and not (spec.needs_base or spec.base_optional):
        takers = ", ".join(name for name, m in methods.METHODS.items() if m.needs_base or m.base_optional)
        raise UsageError(f"--base applies to --method {takers} only" + (f" ({spec.without_base})" if spec.without_base
                                                                        else ""))


@dataclass
class MethodMerge:
    """The merged checkpoint's tensors (in the base's order, else the first model's); `merged`:
    how many keys the method computes; `not_merged`: the keys taken as they are (not floating);
    `layers`: how many layers a gradient was spread over (0: none given)."""

    tensors: OrderedDict[str, TensorRef]
    merged: int
    not_merged: list[str]
    key_merges: dict[str, MergeMethod] = field(default_factory=dict, repr=False)  # by the key seeding each
    layers: int = 0

    def notes(self) -> dict[str, str]:
        """What the merges noted about their keys, by key, sorted: ask once the tensors are written
        (a key not computed — --dry-run, another rank's share — notes nothing)."""
        return {key: merge.note for key, merge in sorted(self.key_merges.items()) if merge.note is not None}


def merge_by_method(models: list[Checkpoint], base: Checkpoint | None, method_name: str, params: Parameters,
                    cast: DType | None, layer_pattern: str | None = None, spools: Spools | None = None) -> MethodMerge:
    """Every key merged by the method (floating tensors) or taken from the base — the first
    model where there is none — (the others), in the base's order. `params`: from
    methods.resolve_parameters; each key's merge asks them for its own values (a gradient's
    spread over the reference's layers, found by `layer_pattern` if given). `spools`: where a
    remote tensor a method reads twice is kept between its passes (see InputReads)."""
    reference = base if base is not None else models[0]
    _check_agreement(models, reference, "base" if base is not None else "first model")
    layers = 0
    if params.gradients:
        params, layers = over_layers(params, reference, layer_pattern)
    inputs = ([base] if base is not None else []) + models
    groups: dict[tuple, list[str]] = {}  # names tied in every input share one result: they stay tied
    for name in reference.tensors:
        groups.setdefault(tuple(c.tensors[name].view_key() for c in inputs), []).append(name)
    result = MethodMerge(OrderedDict(), 0, [])
    tied: dict[tuple, TensorRef] = {}
    for name, t in reference.tensors.items():
        group = [c.tensors[name] for c in inputs]
        if not all(g.dtype.floating for g in group):
            result.tensors[name] = t
            result.not_merged.append(name)
            continue
        tie = tuple(g.view_key() for g in group)
        if tie not in tied:  # seeded by the tied group's first name in sorted order: order-free
            key = min(groups[tie])
            merge = _key_merge(key, method_name, group, params, base is not None, spools)
            result.key_merges[key] = merge
            tied[tie] = streamed_tensor(merge, group[0].shape, cast or t.dtype)
        result.tensors[name] = tied[tie]
    result.merged = len(result.tensors) - len(result.not_merged)
    result.layers = layers
    return result


def over_layers(params: Parameters, reference: Checkpoint, layer_pattern: str | None) -> tuple[Parameters, int]:
    """`params` with each gradient's value given per key as a recipe's gradient gives it: layer i
    of N at t = i/(N − 1), keys outside the layers at t = 0 (ops/recipes: layer_scheme, evaluate);
    and the count of layers. A model whose layers are ambiguous, or that has none, is refused."""
    from ..recipes import Gradient, evaluate, layer_scheme  # recipes' machinery: imported by a gradient alone

    scheme = layer_scheme(reference.tensors, str(reference.path), layer_pattern)
    if scheme.count == 0:
        raise UsageError(f"{reference.path}: no layers found (no numbered keys) to spread "
                         f"{', '.join(map(methods.option_of, params.gradients))} over; pass --layer-pattern REGEX "
                         f"with one group for the layer number, or give one value")
    for name, values in params.gradients.items():
        gradient = Gradient(values)
        params = params.varying(name, lambda key, gradient=gradient: evaluate(gradient, key, scheme.t(key), float))
    return params, scheme.count


def _check_agreement(models: list[Checkpoint], reference: Checkpoint, role: str) -> None:
    """Every model has the reference's keys and shapes; dtypes may differ between floating
    types only (an int beside a float would be silently merged, or silently taken from one)."""
    problems = []
    for other in models:
        if other is reference:
            continue
        missing = [k for k in reference.tensors if k not in other.tensors]
        extra = [k for k in other.tensors if k not in reference.tensors]
        shared = [(k, reference.tensors[k], t) for k, t in other.tensors.items() if k in reference.tensors]
        shapes = [f"{k} {list(a.shape)} vs {list(b.shape)}" for k, a, b in shared if a.shape != b.shape]
        dtypes = [f"{k} {a.dtype.name} vs {b.dtype.name}" for k, a, b in shared
                  if a.dtype.name != b.dtype.name and not (a.dtype.floating and b.dtype.floating)]
        for label, items in (("lacks", missing), ("has extra", extra), ("differs in shape:", shapes),
                             (f"differs in dtype from {reference.path}:", dtypes)):
            if items:
                problems.append(f"{other.path} {label} {', '.join(items[:10])}{' …' if len(items) > 10 else ''}")
    if problems:
        raise CkptError(f"the models must agree with the {role} on keys, shapes and dtypes: " + "; ".join(problems)
                        + " (merge --into the first one to fit them)")


def _key_merge(key: str, method_name: str, group: list[TensorRef], params: Parameters, has_base: bool,
               spools: Spools | None) -> MergeMethod:
    """The merge of one key: `group` is [base, model...] for the methods with a base, else
    [model...]; computed in float32, or float64 when an input is float64."""
    wide = "float64" if any(t.dtype.name == "float64" for t in group) else "float32"
    return methods.METHODS[method_name](params.for_tensor(key), key, [read_values(t, wide, spools) for t in group],
                                        group[0].numel, wide, chunk_size=methods.CHUNK, shape=group[0].shape,
                                        has_base=has_base)


def read_values(t: TensorRef, wide: str, spools: Spools | None = None, working: str | None = None) -> InputReads:
    """(first element, count) -> those elements of `t` as a `wide` numpy array (see InputReads);
    `working`: rounded to that dtype first, as mergekit casts a recipe's inputs to it."""
    return InputReads(t, wide, spools, None if working == t.dtype.name else working)


class InputReads:
    """One input tensor's values for one key's merge: (first element, count) -> a `wide` array.

    Read straight from the mapped file when its bytes lie in order there, else from one copy made
    at the first read and dropped after the last. A method's measure pass (`measuring`, set by
    `streamed_tensor` around it) reads every input it needs whole before the chunks read them
    again: a tensor fetched by range requests (a remote input's) is then fetched once, into memory
    when small, else streamed into a temporary file (`Spools`) that both passes read, and dropped
    as the chunks read its last elements; a copy is kept for the second pass, not made again.
    Without `spools` (a library caller's) a remote tensor is read as it is asked, once per pass."""

    def __init__(self, t: TensorRef, wide: str, spools: Spools | None, working: str | None):
        self.t, self.wide, self.working = t, wide, working
        self.spools = spools
        self.name, self.size = t.dtype.name, t.dtype.itemsize
        self.in_order = mapped_range(t)
        # kept for the chunks after a measure pass: a remote tensor, when there are `spools` to close it
        self.fetched = spools is not None and self.in_order is not None and fetched_by_range(self.in_order[0])
        self.measuring = False
        self._kept = None  # the tensor's bytes in memory (InMemory), or a Spool holding them
        self._lock = threading.Lock()

    def __call__(self, start: int, count: int):
        values = methods.decode(self._bytes(start * self.size, count * self.size, start + count == self.t.numel),
                                self.name, self.wide)
        if self.working is not None:
            values = methods.decode(methods.encode(values, self.working), self.working, self.wide)
        return values

    def _bytes(self, offset: int, nbytes: int, last: bool):
        kept = self._kept
        if kept is None and (self.in_order is None or self.measuring and self.fetched):
            kept = self._keep()
        if kept is None:
            source, first = self.in_order
            return source.view(first + offset, nbytes)
        data = kept.view(offset, nbytes)
        if last and not self.measuring:  # the chunks are done with it: dropped (a spool's bytes copied out first)
            data = data if isinstance(kept, InMemory) else bytes(data)
            self.release()
        return data

    def _keep(self):
        with self._lock:  # a measure pass may read from two threads (arcee-fusion)
            if self._kept is None:
                if self.in_order is None:
                    self._kept = InMemory(memoryview(self.t.data()).cast("B"))
                else:
                    self._kept = self.spools.keep(*self.in_order, self.t.nbytes)
            return self._kept

    def release(self) -> None:
        """Drop what is kept of the tensor (a spool closed); reads after it read the source again."""
        with self._lock:
            kept, self._kept = self._kept, None
        if kept is not None and self.spools is not None:
            self.spools.release(kept)


@functools.cache
def _prefetcher():
    """One thread that makes a merged tensor's next chunk while the writer writes this one
    (numpy and the writes release the GIL: two cores work at once); made on first use."""
    from concurrent.futures import ThreadPoolExecutor

    return ThreadPoolExecutor(1, thread_name_prefix="ckptsurgery-merge")


def streamed_tensor(merge: MergeMethod, shape: tuple[int, ...], dtype: DType) -> TensorRef:
    """A key's merge as a tensor written chunk by chunk, as `dtype`; its measure pass, if any,
    made first with the inputs told (`InputReads.measuring`: a remote one is then fetched once)."""
    buffers: list = []  # two result buffers, used in turn: chunk j+1 is made while j is written
    pending: dict = {}  # j -> the future making chunk j
    measuring = threading.Lock()
    measured: list = []
    inputs = [read for read in merge.reads if isinstance(read, InputReads)]

    def measure() -> None:
        with measuring:
            if measured:
                return
            for read in inputs:
                read.measuring = True
            try:
                merge.prepare()
            finally:
                for read in inputs:
                    read.measuring = False
            measured.append(True)

    def made(j: int) -> memoryview:
        import numpy as np

        measure()
        if not buffers:
            buffers.extend(np.empty(min(merge.chunk_size, merge.numel), merge.wide) for _ in range(2))
        return methods.encode(merge.chunk(j, out=buffers[j % 2][:merge.span(j)[1]]), dtype.name)

    def make(j: int) -> memoryview:
        future = pending.pop(j, None)
        for other in pending.values():  # asked out of turn: let the one in flight finish first
            other.result()
        pending.clear()
        data = future.result() if future is not None else made(j)
        if j + 1 < merge.chunks:  # the writer asks for j+1 only once j is written: its buffer is free
            pending[j + 1] = _prefetcher().submit(made, j + 1)
        else:
            buffers.clear()  # `data` keeps what it views alive until it is written
        return data

    sizes = [merge.span(j)[1] * dtype.itemsize for j in range(merge.chunks)]
    return chunked_tensor(shape, dtype, sizes, make)
