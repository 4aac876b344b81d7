"""merge: a plain union of checkpoints, an update of a template (`--into`, the
`model_dict.update(pretrained_dict)` recipe), or a weighted average."""

from __future__ import annotations

import functools
import math
from collections import OrderedDict
from contextlib import ExitStack

from .. import core
from ..dtypes import CAST_TARGETS, DType, convertible
from ..errors import CkptError, UsageError
from ..io import Checkpoint, TensorRef, open_checkpoint
from ..io.model import chunked_tensor, computed_tensor, mapped_range
from . import methods
from .ranks import Ranks
from .write import ProgressFactory, write_checkpoint


def _cast(t: TensorRef, dtype) -> TensorRef:
    """`t` in another dtype, computed when written."""

    def make():
        from ..io.tensors import cast_bytes

        return cast_bytes(t.data(), t.dtype, dtype)

    return computed_tensor(t.shape, dtype, make)


def _overlap(source: TensorRef, template: TensorRef) -> TensorRef:
    """The template's tensor with the block it shares with `source` copied from the source."""
    region = core.overlap_region(source.shape, template.shape)

    def make():
        from ..io.tensors import as_torch, to_bytes

        out = as_torch(template).clone()
        out[region] = as_torch(source)[region].to(out.dtype)
        return to_bytes(out)

    return computed_tensor(template.shape, template.dtype, make)


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


def _check_fits(name: str, source: TensorRef, template: TensorRef) -> None:
    """Values can be cast or copied into the template's tensor only between plain numbers."""
    if not (source.is_plain and template.is_plain and convertible(source.dtype, template.dtype)):
        way_out = ("drop the key from the source first" if source.shape == template.shape
                   else "use --on-mismatch skip, or drop the key from the source")
        raise CkptError(f"{name}: cannot copy the source's {source.dtype.name} values into the template's "
                        f"{template.dtype.name} tensor (quantized, packed or bits dtypes do not convert); "
                        f"{way_out}")


def _into_template(ckpts: list[Checkpoint], template: Checkpoint, on_mismatch: str,
                   adapting: dict | None = None) -> tuple[OrderedDict, dict]:
    """`model_dict.update(pretrained_dict)`: the template's keys, shapes and dtypes, in its order.
    `adapting` (with on_mismatch "adapt"): "otherwise", "prefix_tokens", "grid"."""
    from . import adapt

    found: dict[str, tuple[int, str, str]] = {}  # template key -> (source index, source key, how)
    for index, ckpt in enumerate(ckpts):
        for target, (source_key, how) in core.align(ckpt.tensors, template.tensors).items():
            found.setdefault(target, (index, source_key, how))
    used = {(index, source_key) for index, source_key, _ in found.values()}
    merged: OrderedDict[str, TensorRef] = OrderedDict()
    report = {"copied": [], "renamed": {}, "adapted": [], "kept_from_template": [], "kept_reasons": {},
              "mismatched": [], "left_out": []}
    shapes = {name: (ckpts[found[name][0]].tensors[found[name][1]].shape, tt.shape)
              for name, tt in template.tensors.items() if name in found
              and ckpts[found[name][0]].tensors[found[name][1]].shape != tt.shape}
    views: dict[tuple, list[str]] = {}  # names tied in the template: one storage, one outcome
    for name, tt in template.tensors.items():
        views.setdefault(tt.view_key(), []).append(name)
    tied = [names for names in views.values() if len(names) > 1]
    rules = core.adapt_rules(shapes, tied) if on_mismatch == "adapt" else {}
    adapting = adapting or {}
    otherwise = adapting.get("otherwise")
    unfit, made = [], {}  # made: (source view, template view) -> the adapted tensor, so ties stay tied
    for name, tt in template.tensors.items():
        if name not in found:
            merged[name] = tt
            report["kept_from_template"].append(name)
            continue
        index, source_key, how = found[name]
        st = ckpts[index].tensors[source_key]
        where = f"{ckpts[index].path}: {source_key} -> {template.path}: {name}"
        rule = rules.get(name)
        if rule == "head":
            merged[name] = tt
            report["kept_from_template"].append(name)
            report["kept_reasons"][name] = (f"a classifier head, {list(st.shape)} -> {list(tt.shape)}: the new "
                                           f"model's fresh values kept")
            continue
        if rule is not None:
            try:
                if not (st.is_plain and tt.is_plain and st.dtype.floating and tt.dtype.floating):
                    raise CkptError(f"{where}: {st.dtype.name} -> {tt.dtype.name}: shape adapters work on floating "
                                    f"tensors only; drop the key from the source, or give --otherwise")
                position = (core.prefix_and_grids(st.shape[-2], tt.shape[-2], adapting.get("prefix_tokens"),
                                                  adapting.get("grid")) if rule == "position" else None)
            except CkptError as e:
                if otherwise is None:
                    raise CkptError(str(e) if str(e).startswith(where) else f"{where}: {e}") from None
                rule = None  # the rule cannot apply here: --otherwise says what to do
        if rule is not None:
            tie = (st.view_key(), tt.view_key())
            if tie not in made:
                made[tie] = adapt.adapted(rule, st, tt, position)
            merged[name] = made[tie]
            report["adapted"].append({"name": name, "rule": rule, "from": list(st.shape), "to": list(tt.shape),
                                      **({"source": source_key} if how != "exact" else {}),
                                      **({"prefix_tokens": position[0], "grid": [list(position[1]), list(position[2])]}
                                         if position else {})})
            continue
        policy = otherwise if on_mismatch == "adapt" else on_mismatch
        if st.shape != tt.shape and on_mismatch == "adapt" and otherwise is None:
            unfit.append(f"{name} {list(st.shape)} -> {list(tt.shape)}")
            continue
        copies = policy == "overlap" if st.shape != tt.shape else st.dtype is not tt.dtype
        if copies:
            _check_fits(where, st, tt)
        if st.shape != tt.shape:
            report["mismatched"].append({"name": name, "source_shape": list(st.shape),
                                         "template_shape": list(tt.shape), "policy": policy})
            merged[name] = _overlap(st, tt) if policy == "overlap" else tt
            continue
        merged[name] = st if st.dtype is tt.dtype else _cast(st, tt.dtype)
        if how == "exact":
            report["copied"].append(name)
        else:
            report["renamed"][source_key] = name
    if unfit:
        raise CkptError(f"{len(unfit)} shape mismatch(es) no adapter fits: {'; '.join(unfit[:10])}"
                        f"{' …' if len(unfit) > 10 else ''} (--otherwise skip keeps the template's tensor, "
                        f"overlap copies the shared block)")
    if on_mismatch == "adapt":
        _keep_template_ties(tied, merged, report)
        if not any(a["rule"] == "position" for a in report["adapted"]):
            for option in ("prefix_tokens", "grid"):
                if adapting.get(option) is not None:
                    raise UsageError(f"--{option.replace('_', '-')} applies to a position embedding that is "
                                     f"adapted; this merge adapts none")
    if report["mismatched"] and on_mismatch == "error":
        listing = "; ".join(f"{m['name']} {m['source_shape']} -> {m['template_shape']}" for m in report["mismatched"])
        raise CkptError(f"{len(report['mismatched'])} shape mismatch(es): {listing} "
                        f"(--on-mismatch skip keeps the template's tensor, overlap copies the shared block, "
                        f"adapt fits them by their kind)")
    seen = {source_key for _, source_key, _ in found.values()}  # each name in one list only
    for index, ckpt in enumerate(ckpts):
        for k in ckpt.tensors:
            if (index, k) not in used and k not in seen:
                seen.add(k)
                report["left_out"].append(k)
    return merged, report


def _keep_template_ties(tied: list[list[str]], merged: OrderedDict, report: dict) -> None:
    """Names tied in the template stay tied: one that kept the template's fresh values (a source
    that stores a tied weight once, under the other name) takes its partner's, and is reported
    as its partner is."""
    kept = set(report["kept_from_template"])
    copied = set(report["copied"]) | set(report["renamed"].values())
    adapted = {a["name"]: a for a in report["adapted"]}
    for names in tied:
        donor = next((n for n in names if n in adapted or n in copied), None)
        if donor is None:
            continue
        for name in names:
            if name in kept:
                merged[name] = merged[donor]
                report["kept_from_template"].remove(name)
                report["kept_reasons"].pop(name, None)
                if donor in adapted:
                    report["adapted"].append({**adapted[donor], "name": name, "tied_to": donor})
                else:
                    report["copied"].append(name)


def _parse_grid(grid) -> tuple[int, int] | None:
    """--grid "H,W" (or (H, W) from the library): the template's grid of patches."""
    if grid is None:
        return None
    try:
        parts = grid.split(",") if isinstance(grid, str) else list(grid)
        h, w = (int(p) for p in parts)
    except (ValueError, TypeError):
        raise UsageError(f"--grid {grid!r}: expected H,W (two whole numbers)") from None
    if h < 1 or w < 1:
        raise UsageError(f"--grid {grid!r}: both sizes must be 1 or more")
    return h, w


def merge(sources: list[str], output: str, *, into: str | None = None, on_mismatch: str | None = None,
          on_conflict: str | None = None, average: bool = False, method: str | None = None,
          base: str | None = None, weights: str | list[float] | None = None, density: float | None = None,
          scale: float | None = None, t: float | None = None, seed: int | None = None, dtype: str | None = None,
          root: str | None = None, force: bool = False, dry_run: bool = False,
          progress: ProgressFactory | None = None, format: str | None = None, ranks: Ranks | None = None,
          lora: list[str] | None = None, lora_scale: list[float] | None = None,
          allow_unmatched: bool = False, otherwise: str | None = None, prefix_tokens: int | None = None,
          grid: str | tuple[int, int] | None = None, metadata: dict[str, str] | None = None,
          no_metadata: bool = False) -> dict:
    """Four modes: plain union (`on_conflict`, default error), `into` a template (`on_mismatch`,
    default error; "adapt" with `otherwise`, `prefix_tokens`, `grid`), a merge `method` (`average`
    is method "linear") with its parameters, or `lora` adapters folded into one base
    (`lora_scale`, `allow_unmatched`; see ops/lora.py). An option of another mode is refused.
    `dtype` casts the floating tensors written. A safetensors output keeps the metadata of the
    first source (with `method`, of the base if given; with `lora`, of the base), edited by
    `metadata` / `no_metadata` (see write_checkpoint)."""
    for option, value in (("otherwise", otherwise), ("prefix-tokens", prefix_tokens), ("grid", grid)):
        if value is not None and on_mismatch != "adapt":
            raise UsageError(f"--{option} applies to --on-mismatch adapt only")
    if lora:
        return _merge_lora(sources, output, lora, lora_scale, allow_unmatched, into=into, average=average,
                           method=method, base=base, density=density, scale=scale, t=t, seed=seed,
                           on_conflict=on_conflict, on_mismatch=on_mismatch, weights=weights, dtype=dtype,
                           root=root, force=force, dry_run=dry_run, progress=progress, format=format, ranks=ranks,
                           metadata=metadata, no_metadata=no_metadata)
    if lora_scale or allow_unmatched:
        raise UsageError(f"--{'lora-scale' if lora_scale else 'allow-unmatched'} applies to --lora only")
    if average:
        if method not in (None, "linear"):
            raise UsageError(f"--average is --method linear: it does not combine with --method {method}")
        method = "linear"
    if method is not None:
        method = core.check_choice(method, tuple(methods.METHODS), "--method")
    if into is not None and method is not None:
        raise UsageError(f"--into and --{'average' if average else 'method'} do not combine: merge first, then merge --into")
    if on_mismatch is not None and into is None:
        raise UsageError("--on-mismatch applies to merge --into only")
    if otherwise is not None:
        otherwise = core.check_choice(otherwise, core.OTHERWISE_POLICIES, "--otherwise")
    if prefix_tokens is not None and (isinstance(prefix_tokens, bool) or not isinstance(prefix_tokens, int)
                                      or prefix_tokens < 0):
        raise UsageError(f"--prefix-tokens {prefix_tokens!r}: a whole number, 0 or more")
    adapting = {"otherwise": otherwise, "prefix_tokens": prefix_tokens, "grid": _parse_grid(grid)}
    if on_conflict is not None and (into is not None or method is not None):
        raise UsageError(f"--on-conflict applies to a plain merge only, not to --{'into' if into is not None else 'method'}")
    given = {"weights": weights, "density": density, "scale": scale, "t": t, "seed": seed}
    if method is None and (base is not None or any(v is not None for v in given.values())):
        option = "base" if base is not None else next(k for k, v in given.items() if v is not None)
        raise UsageError(f"--{option} applies to --method (or --average) only")
    if method is not None:
        if base is None and methods.METHODS[method].needs_base:
            raise UsageError(f"--method {method} needs --base BASE: the model the others' changes are measured from")
        if base is not None and not methods.METHODS[method].needs_base:
            raise UsageError(f"--base applies to --method {', '.join(m for m, s in methods.METHODS.items() if s.needs_base)}"
                             f" only{' (slerp goes from the first model, t=0, to the second, t=1)' if method == 'slerp' else ''}")
        params = _method_parameters(method, len(sources), given)
    cast = None
    if dtype is not None:
        cast = CAST_TARGETS[core.check_choice(dtype, tuple(CAST_TARGETS), "--dtype")]
    on_mismatch = core.check_choice("error" if on_mismatch is None else on_mismatch, core.MISMATCH_POLICIES,
                                    "--on-mismatch")
    on_conflict = core.check_choice("error" if on_conflict is None else on_conflict, core.CONFLICT_POLICIES,
                                    "--on-conflict")
    if not sources:
        raise UsageError("merge needs at least one source")
    with ExitStack() as stack:
        ckpts = [stack.enter_context(open_checkpoint(s, root)) for s in sources]
        others = None  # the base's own non-tensor entries
        notes: dict = {}
        if into is not None:
            template = stack.enter_context(open_checkpoint(into))
            merged, details = _into_template(ckpts, template, on_mismatch, adapting)
            first, mode = template, "into"
        elif method is not None:
            base_ckpt = stack.enter_context(open_checkpoint(base, root)) if base is not None else None
            merged, details, notes = _merged_by_method(ckpts, base_ckpt, method, params, cast)
            first, mode = base_ckpt or ckpts[0], "method"
            details = {"method": method, "base": base, "parameters": params, **details}
        else:
            merged, others, details = _plain_union(ckpts, on_conflict)
            first, mode = ckpts[0], "union"
        # the metadata of the weights' first source (--into: not the template's, whose values
        # are only the fresh ones the sources do not replace)
        report = write_checkpoint(first, merged, output, cast=cast, others=others, inputs=[*ckpts, first],
                                  force=force, dry_run=dry_run, progress=progress, format=format,
                                  ranks=ranks, metadata=metadata, no_metadata=no_metadata,
                                  metadata_from=ckpts[0] if mode == "into" else first)
    del report["input"]  # several inputs: `sources` and `template` name them
    report.update(mode=mode, sources=list(sources), **({"template": into} if into is not None else {}), **details)
    if mode == "method":  # filled while the tensors were computed: empty after --dry-run
        report["notes"] = dict(sorted(notes.items()))
    return report


def _merge_lora(sources: list[str], output: str, loras: list[str], scales: list[float] | None, allow_unmatched: bool,
                *, into, average, method, base, density, scale, t, seed, on_conflict, on_mismatch, weights, dtype,
                root, force, dry_run, progress, format, ranks, metadata, no_metadata) -> dict:
    """`merge BASE --lora ADAPTER... -o OUT`: the adapters folded into BASE, in order."""
    from . import lora

    mixed = [option for option, given in (("--into", into is not None), ("--average", average),
                                          ("--method", method is not None), ("--base", base is not None),
                                          ("--on-conflict", on_conflict is not None),
                                          ("--on-mismatch", on_mismatch is not None), ("--weights", weights is not None),
                                          ("--density", density is not None), ("--scale", scale is not None),
                                          ("--t", t is not None), ("--seed", seed is not None)) if given]
    if mixed:
        raise UsageError(f"--lora does not combine with {', '.join(mixed)}: fold first, then merge")
    if len(sources) != 1:
        raise UsageError(f"--lora folds into exactly one base checkpoint, not {len(sources)}: fold first, then merge")
    scales = lora.parse_scales(scales, len(loras))
    cast = CAST_TARGETS[core.check_choice(dtype, tuple(CAST_TARGETS), "--dtype")] if dtype is not None else None
    with ExitStack() as stack:
        base = stack.enter_context(open_checkpoint(sources[0], root))
        adapters = [(stack.enter_context(lora.read_adapter(path)), scale) for path, scale in zip(loras, scales)]
        merged, details = lora.fold(base, adapters, allow_unmatched=allow_unmatched, cast=cast)
        report = write_checkpoint(base, merged, output, cast=cast, force=force, dry_run=dry_run, progress=progress,
                                  format=format, ranks=ranks, metadata=metadata, no_metadata=no_metadata)
    del report["input"]
    report.update(mode="lora", sources=list(sources), **details)
    return report
