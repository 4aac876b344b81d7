"""merge: a plain union of checkpoints, an update of a template (`--into`, the
`model_dict.update(pretrained_dict)` recipe), or a weighted average."""

from __future__ import annotations

import math
from collections import OrderedDict
from contextlib import ExitStack

from .. import core
from ..dtypes import convertible
from ..errors import CkptError, UsageError
from ..io import Checkpoint, TensorRef, open_checkpoint
from ..io.model import computed_tensor
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


def _average(tensors: list[TensorRef], weights: list[float]) -> TensorRef:
    """The weighted sum of same-dtype tensors, accumulated in float32 (float64 for float64)."""
    first = tensors[0]

    def make():
        import torch

        from ..io.tensors import as_torch, to_bytes

        wide = torch.float64 if first.dtype.name == "float64" else torch.float32
        total = torch.zeros(first.shape, dtype=wide)
        for t, w in zip(tensors, weights):
            total.add_(as_torch(t).to(wide), alpha=w)
        return to_bytes(total.to(getattr(torch, first.dtype.name)))

    return computed_tensor(first.shape, first.dtype, make)


def _parse_weights(weights: str | list[float] | None, count: int) -> list[float]:
    """"2,1,1" (the command line) or [2, 1, 1] (the library), normalised to sum to 1."""
    if weights is None:
        return [1.0 / count] * count
    try:
        parts = weights.split(",") if isinstance(weights, str) else list(weights)
        values = [float(w) for w in parts]
    except (ValueError, TypeError):
        raise UsageError(f"--weights {weights!r}: expected numbers separated by commas") from None
    if len(values) != count:
        raise UsageError(f"--weights gives {len(values)} weights for {count} sources")
    if not all(math.isfinite(v) for v in values):
        raise UsageError(f"--weights {weights!r}: every weight must be a finite number (no nan or inf)")
    total = sum(values)
    if not math.isfinite(total):
        raise UsageError(f"--weights {weights!r}: the weights are too large to add up")
    if total <= 0:  # dividing by a negative total would flip every weight's sign
        raise UsageError(f"--weights must not sum to zero or less (they sum to {total:g})")
    return [v / total for v in values]


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


def _averaged(ckpts: list[Checkpoint], weights: list[float]) -> tuple[OrderedDict, dict]:
    first = ckpts[0]
    problems = []
    for other in ckpts[1:]:
        missing = [k for k in first.tensors if k not in other.tensors]
        extra = [k for k in other.tensors if k not in first.tensors]
        shared = [(k, first.tensors[k], t) for k, t in other.tensors.items() if k in first.tensors]
        shapes = [f"{k} {list(a.shape)} vs {list(b.shape)}" for k, a, b in shared if a.shape != b.shape]
        # an int beside a float would be silently averaged, or silently taken from the first source
        dtypes = [f"{k} {a.dtype.name} vs {b.dtype.name}" for k, a, b in shared if a.dtype.name != b.dtype.name]
        for label, items in (("lacks", missing), ("has extra", extra), ("differs in shape:", shapes),
                             (f"differs in dtype from {first.path}:", dtypes)):
            if items:
                problems.append(f"{other.path} {label} {', '.join(items[:10])}{' …' if len(items) > 10 else ''}")
    if problems:
        raise CkptError("sources must agree on keys, shapes and dtypes to be averaged: " + "; ".join(problems))
    merged: OrderedDict[str, TensorRef] = OrderedDict()
    averages: dict[tuple, TensorRef] = {}  # names tied in every source share one average: they stay tied
    from_first = []
    for name, t in first.tensors.items():
        if t.dtype.floating:
            group = [c.tensors[name] for c in ckpts]
            tie = tuple(g.view_key() for g in group)
            if tie not in averages:
                averages[tie] = _average(group, weights)
            merged[name] = averages[tie]
        else:
            merged[name] = t
            from_first.append(name)
    return merged, {"weights": weights, "averaged": len(merged) - len(from_first), "from_first": from_first}


def _check_fits(name: str, source: TensorRef, template: TensorRef) -> None:
    """Values can be cast or copied into the template's tensor only between plain numbers."""
    if not (source.is_plain and template.is_plain and convertible(source.dtype, template.dtype)):
        way_out = ("drop the key from the source first" if source.shape == template.shape
                   else "use --on-mismatch skip, or drop the key from the source")
        raise CkptError(f"{name}: cannot copy the source's {source.dtype.name} values into the template's "
                        f"{template.dtype.name} tensor (quantized, packed or bits dtypes do not convert); "
                        f"{way_out}")


def _into_template(ckpts: list[Checkpoint], template: Checkpoint, on_mismatch: str) -> tuple[OrderedDict, dict]:
    """`model_dict.update(pretrained_dict)`: the template's keys, shapes and dtypes, in its order."""
    found: dict[str, tuple[int, str, str]] = {}  # template key -> (source index, source key, how)
    for index, ckpt in enumerate(ckpts):
        for target, (source_key, how) in core.align(ckpt.tensors, template.tensors).items():
            found.setdefault(target, (index, source_key, how))
    used = {(index, source_key) for index, source_key, _ in found.values()}
    merged: OrderedDict[str, TensorRef] = OrderedDict()
    report = {"copied": [], "renamed": {}, "kept_from_template": [], "mismatched": [], "left_out": []}
    for name, tt in template.tensors.items():
        if name not in found:
            merged[name] = tt
            report["kept_from_template"].append(name)
            continue
        index, source_key, how = found[name]
        st = ckpts[index].tensors[source_key]
        copies = on_mismatch == "overlap" if st.shape != tt.shape else st.dtype is not tt.dtype
        if copies:
            _check_fits(f"{ckpts[index].path}: {source_key} -> {template.path}: {name}", st, tt)
        if st.shape != tt.shape:
            report["mismatched"].append({"name": name, "source_shape": list(st.shape),
                                         "template_shape": list(tt.shape), "policy": on_mismatch})
            merged[name] = _overlap(st, tt) if on_mismatch == "overlap" else tt
            continue
        merged[name] = st if st.dtype is tt.dtype else _cast(st, tt.dtype)
        if how == "exact":
            report["copied"].append(name)
        else:
            report["renamed"][source_key] = name
    if report["mismatched"] and on_mismatch == "error":
        listing = "; ".join(f"{m['name']} {m['source_shape']} -> {m['template_shape']}" for m in report["mismatched"])
        raise CkptError(f"{len(report['mismatched'])} shape mismatch(es): {listing} "
                        f"(--on-mismatch skip keeps the template's tensor, overlap copies the shared block)")
    seen = {source_key for _, source_key, _ in found.values()}  # each name in one list only
    for index, ckpt in enumerate(ckpts):
        for k in ckpt.tensors:
            if (index, k) not in used and k not in seen:
                seen.add(k)
                report["left_out"].append(k)
    return merged, report


def merge(sources: list[str], output: str, *, into: str | None = None, on_mismatch: str | None = None,
          on_conflict: str | None = None, average: bool = False, weights: str | list[float] | None = None,
          root: str | None = None, force: bool = False, dry_run: bool = False,
          progress: ProgressFactory | None = None, format: str | None = None, ranks: Ranks | None = None,
          lora: list[str] | None = None, lora_scale: list[float] | None = None,
          allow_unmatched: bool = False) -> dict:
    """Four modes: plain union (`on_conflict`, default error), `into` a template (`on_mismatch`,
    default error), `average` (`weights`, default equal), `lora` adapters folded into one base
    (`lora_scale`, `allow_unmatched`; see ops/lora.py). An option of another mode is refused."""
    if lora:
        return _merge_lora(sources, output, lora, lora_scale, allow_unmatched, into=into, average=average,
                           on_conflict=on_conflict, on_mismatch=on_mismatch, weights=weights, root=root, force=force,
                           dry_run=dry_run, progress=progress, format=format, ranks=ranks)
    if lora_scale or allow_unmatched:
        raise UsageError(f"--{'lora-scale' if lora_scale else 'allow-unmatched'} applies to --lora only")
    if into is not None and average:
        raise UsageError("--into and --average do not combine: average first, then merge --into")
    if on_mismatch is not None and into is None:
        raise UsageError("--on-mismatch applies to merge --into only")
    if on_conflict is not None and (into is not None or average):
        raise UsageError(f"--on-conflict applies to a plain merge only, not to --{'average' if average else 'into'}")
    if weights is not None and not average:
        raise UsageError("--weights applies to --average only")
    on_mismatch = core.check_choice("error" if on_mismatch is None else on_mismatch, core.MISMATCH_POLICIES,
                                    "--on-mismatch")
    on_conflict = core.check_choice("error" if on_conflict is None else on_conflict, core.CONFLICT_POLICIES,
                                    "--on-conflict")
    if not sources:
        raise UsageError("merge needs at least one source")
    if average and len(sources) < 2:
        raise UsageError("--average needs at least two sources")
    with ExitStack() as stack:
        ckpts = [stack.enter_context(open_checkpoint(s, root)) for s in sources]
        others = None  # the base's own non-tensor entries
        if into is not None:
            template = stack.enter_context(open_checkpoint(into))
            merged, details = _into_template(ckpts, template, on_mismatch)
            base, mode = template, "into"
        elif average:
            merged, details = _averaged(ckpts, _parse_weights(weights, len(ckpts)))
            base, mode = ckpts[0], "average"
        else:
            merged, others, details = _plain_union(ckpts, on_conflict)
            base, mode = ckpts[0], "union"
        report = write_checkpoint(base, merged, output, others=others, inputs=[*ckpts, base],
                                  force=force, dry_run=dry_run, progress=progress, format=format,
                                  ranks=ranks)
    del report["input"]  # several inputs: `sources` and `template` name them
    report.update(mode=mode, sources=list(sources), **({"template": into} if into is not None else {}), **details)
    return report


def _merge_lora(sources: list[str], output: str, loras: list[str], scales: list[float] | None, allow_unmatched: bool,
                *, into, average, on_conflict, on_mismatch, weights, root, force, dry_run, progress, format,
                ranks) -> dict:
    """`merge BASE --lora ADAPTER... -o OUT`: the adapters folded into BASE, in order."""
    from . import lora

    mixed = [option for option, given in (("--into", into is not None), ("--average", average),
                                          ("--on-conflict", on_conflict is not None),
                                          ("--on-mismatch", on_mismatch is not None),
                                          ("--weights", weights is not None)) if given]
    if mixed:
        raise UsageError(f"--lora does not combine with {', '.join(mixed)}: fold first, then merge")
    if len(sources) != 1:
        raise UsageError(f"--lora folds into exactly one base checkpoint, not {len(sources)}: fold first, then merge")
    scales = lora.parse_scales(scales, len(loras))
    with ExitStack() as stack:
        base = stack.enter_context(open_checkpoint(sources[0], root))
        adapters = [(stack.enter_context(lora.read_adapter(path)), scale) for path, scale in zip(loras, scales)]
        merged, details = lora.fold(base, adapters, allow_unmatched=allow_unmatched)
        report = write_checkpoint(base, merged, output, force=force, dry_run=dry_run, progress=progress,
                                  format=format, ranks=ranks)
    del report["input"]
    report.update(mode="lora", sources=list(sources), **details)
    return report
