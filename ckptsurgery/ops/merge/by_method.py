"""merge --method: every key merged by a merge method (ops/methods), chunk by chunk."""

from __future__ import annotations

import functools
import math
from collections import OrderedDict

from ...dtypes import DType
from ...errors import CkptError, UsageError
from ...io import Checkpoint, TensorRef
from ...io.model import chunked_tensor, mapped_range
from .. import methods


def _parse_weights(weights: str | list[float] | None, count: int, positive_total: bool) -> list[float]:
    """"2,1,1" (the command line) or [2, 1, 1] (the library); 1 each by default. A weighted mean
    (`positive_total`) divides by their sum, which must then be above zero."""
    if weights is None:
        return [1.0] * count
    try:
        parts = weights.split(",") if isinstance(weights, str) else list(weights)
        values = [float(w) for w in parts]
    except (ValueError, TypeError):
        raise UsageError(f"--weights {weights!r}: expected numbers separated by commas") from None
    if len(values) != count:
        raise UsageError(f"--weights gives {len(values)} weights for {count} models")
    if not all(math.isfinite(v) for v in values):
        raise UsageError(f"--weights {weights!r}: every weight must be a finite number (no nan or inf)")
    total = sum(values)
    if not math.isfinite(total):
        raise UsageError(f"--weights {weights!r}: the weights are too large to add up")
    if positive_total and total <= 0:  # dividing by a negative total would flip every weight's sign
        raise UsageError(f"--weights must not sum to zero or less (they sum to {total:g})")
    return values


# option, default (None: required), the values it takes, how to say so


# option, default (None: required), the values it takes, how to say so
_RANGES = (("density", 1.0, lambda v: 0 < v <= 1, "in (0, 1]"), ("t", None, lambda v: 0 <= v <= 1, "in [0, 1]"),
           ("scale", 1.0, lambda v: True, "a finite number"))


def _method_parameters(method_name: str, models: int, given: dict) -> dict:
    """The method's parameters with their defaults (weight 1; mergekit's density 1 and λ 1), each
    checked; a parameter the method does not take is refused, naming the methods that do."""
    method = methods.METHODS[method_name]
    for option, value in given.items():
        if value is not None and option not in method.options:
            takers = [m for m, spec in methods.METHODS.items() if option in spec.options]
            raise UsageError(f"--{option} applies to --method {', '.join(takers)} only, not to {method_name}")
    if models < method.min_models or (method.max_models is not None and models > method.max_models):
        wanted = (f"exactly {method.min_models}" if method.max_models == method.min_models
                  else f"at least {method.min_models}")
        raise UsageError(f"--method {method_name} takes {wanted} model(s), not {models}"
                         + (" (the base is --base)" if method.needs_base else ""))
    params: dict = {}
    if "weights" in method.options:
        params["weights"] = _parse_weights(given["weights"], models, positive_total=method.mean)
    for option, default, fits, span in _RANGES:
        if option not in method.options:
            continue
        value = given[option]
        if value is None and default is None:
            raise UsageError(f"--method {method_name} needs --{option}")
        value = default if value is None else float(value)
        if not (math.isfinite(value) and fits(value)):  # nan fails every comparison: refused too
            raise UsageError(f"--{option} {value!r}: must be {span}")
        params[option] = value
    if "seed" in method.options:
        seed = 0 if given["seed"] is None else given["seed"]
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise UsageError(f"--seed {seed!r}: must be a whole number, 0 or more")
        params["seed"] = seed
    return params


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


def _reader(t: TensorRef, wide: str) -> methods.Read:
    """(first element, count) -> those elements of `t` as a `wide` numpy array; straight from the
    mapped file when its bytes lie in order there, else from one copy made at the first chunk and
    dropped after the last."""
    name, size, numel = t.dtype.name, t.dtype.itemsize, t.numel
    in_order = mapped_range(t)
    if in_order is not None:
        source, first = in_order
        return lambda start, count: methods.decode(source.view(first + start * size, count * size), name, wide)
    held: list = []

    def read(start: int, count: int):
        if not held:
            held.append(memoryview(t.data()))
        values = methods.decode(held[0][start * size:(start + count) * size], name, wide)
        if start + count == numel:
            held.clear()
        return values

    return read


@functools.cache
def _prefetcher():
    """One thread that makes a merged tensor's next chunk while the writer writes this one
    (numpy and the writes release the GIL: two cores work at once); made on first use."""
    from concurrent.futures import ThreadPoolExecutor

    return ThreadPoolExecutor(1, thread_name_prefix="ckptsurgery-merge")


def _merged_tensor(name: str, method: str, group: list[TensorRef], params: dict, dtype: DType,
                   notes: dict) -> TensorRef:
    """One key's merge, written chunk by chunk: `group` is [base, model...] for the methods with a
    base, else [model...]; the result is written as `dtype`."""
    wide = "float64" if any(t.dtype.name == "float64" for t in group) else "float32"
    merge = methods.TensorMerge(method, params, name, [_reader(t, wide) for t in group], group[0].numel, wide)

    buffers: list = []  # two result buffers, used in turn: chunk j+1 is made while j is written
    pending: dict = {}  # j -> the future making chunk j

    def made(j: int) -> memoryview:
        import numpy as np

        if not buffers:
            buffers.extend(np.empty(min(methods.CHUNK, merge.numel), wide) for _ in range(2))
        data = methods.encode(merge.chunk(j, out=buffers[j % 2][:merge.span(j)[1]]), dtype.name)
        if merge.collinear:
            notes[name] = "nearly collinear: interpolated linearly"
        return data

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
    return chunked_tensor(group[0].shape, dtype, sizes, make)


def _merged_by_method(models: list[Checkpoint], base: Checkpoint | None, method_name: str,
                      params: dict, cast: DType | None) -> tuple[OrderedDict, dict, dict]:
    """Every key merged by the method (floating tensors) or taken from the base — the first
    model where there is none — (the others), in the base's order."""
    reference = base if base is not None else models[0]
    _check_agreement(models, reference, "base" if base is not None else "first model")
    inputs = ([base] if base is not None else []) + models
    groups: dict[tuple, list[str]] = {}  # names tied in every input share one result: they stay tied
    for name in reference.tensors:
        groups.setdefault(tuple(c.tensors[name].view_key() for c in inputs), []).append(name)
    merged: OrderedDict[str, TensorRef] = OrderedDict()
    results: dict[tuple, TensorRef] = {}
    notes: dict[str, str] = {}
    not_floating = []
    for name, t in reference.tensors.items():
        group = [c.tensors[name] for c in inputs]
        if not all(g.dtype.floating for g in group):
            merged[name] = t
            not_floating.append(name)
            continue
        tie = tuple(g.view_key() for g in group)
        if tie not in results:  # seeded by the tied group's first name in sorted order: order-free
            results[tie] = _merged_tensor(min(groups[tie]), method_name, group, params, cast or t.dtype, notes)
        merged[name] = results[tie]
    return merged, {"merged": len(merged) - len(not_floating), "not_merged": not_floating}, notes
