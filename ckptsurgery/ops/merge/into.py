"""merge --into TEMPLATE: `model_dict.update(pretrained_dict)` — the template's keys, shapes and
dtypes, each filled from the first source that has it; shapes that differ follow `--on-mismatch`."""

from __future__ import annotations

from collections import OrderedDict
from contextlib import ExitStack

from ... import core
from ...dtypes import convertible
from ...errors import CkptError, UsageError
from ...io import Checkpoint, TensorRef, open_checkpoint
from ...io.model import computed_tensor
from ..options import WriteOptions, dtype_to_cast
from ..reports import IntoReport
from ..write import write_checkpoint


def merge_into(sources: list[str], template: str, write: WriteOptions, *, on_mismatch: str | None = None,
               otherwise: str | None = None, prefix_tokens: int | None = None,
               grid: str | tuple[int, int] | None = None, dtype: str | None = None,
               root: str | None = None) -> IntoReport:
    """`model_dict.update(pretrained_dict)`: exactly the template's keys, shapes and dtypes, in
    its order, each from the first source that has it (after removing a wrapper prefix). A
    shape that differs follows `on_mismatch`: "error" (the default), "skip", "overlap", or
    "adapt" (with `otherwise`, `prefix_tokens`, `grid`; see ops/adapt.py). A .safetensors
    output keeps the first source's metadata (not the template's)."""
    adapting = _adapt_options(on_mismatch, otherwise, prefix_tokens, grid)
    on_mismatch = core.check_choice("error" if on_mismatch is None else on_mismatch, core.MISMATCH_POLICIES,
                                    "--on-mismatch")
    cast = dtype_to_cast(dtype)
    with ExitStack() as stack:
        ckpts = [stack.enter_context(open_checkpoint(s, root)) for s in sources]
        model = stack.enter_context(open_checkpoint(template))
        merged, details = _into_template(ckpts, model, on_mismatch, adapting)
        written = write_checkpoint(merged, write, source=model, cast=cast, inputs=[*ckpts, model],
                                   metadata_from=ckpts[0])
    return IntoReport.extend(written, input=None, mode="into", sources=list(sources), template=template, **details)


def _adapt_options(on_mismatch: str | None, otherwise: str | None, prefix_tokens: int | None, grid) -> dict:
    """--otherwise, --prefix-tokens and --grid, checked: they apply to --on-mismatch adapt only."""
    for option, value in (("otherwise", otherwise), ("prefix-tokens", prefix_tokens), ("grid", grid)):
        if value is not None and on_mismatch != "adapt":
            raise UsageError(f"--{option} applies to --on-mismatch adapt only")
    if otherwise is not None:
        otherwise = core.check_choice(otherwise, core.OTHERWISE_POLICIES, "--otherwise")
    if prefix_tokens is not None and (isinstance(prefix_tokens, bool) or not isinstance(prefix_tokens, int)
                                      or prefix_tokens < 0):
        raise UsageError(f"--prefix-tokens {prefix_tokens!r}: a whole number, 0 or more")
    return {"otherwise": otherwise, "prefix_tokens": prefix_tokens, "grid": _parse_grid(grid)}


def _cast(t: TensorRef, dtype) -> TensorRef:
    """`t` in another dtype, computed when written."""

    def make():
        from ...io.tensors import cast_bytes

        return cast_bytes(t.data(), t.dtype, dtype)

    return computed_tensor(t.shape, dtype, make)


def _overlap(source: TensorRef, template: TensorRef) -> TensorRef:
    """The template's tensor with the block it shares with `source` copied from the source."""
    region = core.overlap_region(source.shape, template.shape)

    def make():
        from ...io.tensors import as_torch, to_bytes

        out = as_torch(template).clone()
        out[region] = as_torch(source)[region].to(out.dtype)
        return to_bytes(out)

    return computed_tensor(template.shape, template.dtype, make)


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
    from .. import adapt

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
        if rule is core.AdaptRule.HEAD:
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
                                                  adapting.get("grid")) if rule is core.AdaptRule.POSITION else None)
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
        if not any(a["rule"] is core.AdaptRule.POSITION for a in report["adapted"]):
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
