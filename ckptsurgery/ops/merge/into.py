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
from ..methods import option_of
from ..inputs import open_inputs, with_read
from ..options import READ_AS_IS, ReadOptions, WriteOptions, check_write_options, dtype_to_cast
from ..reports import IntoReport
from ..write import write_checkpoint


def merge_into(sources: list[str], template: str, write: WriteOptions, *, on_mismatch: str | None = None,
               otherwise: str | None = None, prefix_tokens: int | None = None,
               grid: str | tuple[int, int] | None = None, dtype: str | None = None,
               root: str | None = None, read: ReadOptions = READ_AS_IS) -> IntoReport:
    """`model_dict.update(pretrained_dict)`: exactly the template's keys, shapes and dtypes, in
    its order, each from the first source that has it (after removing a wrapper prefix). A
    shape that differs follows `on_mismatch`: "error" (the default), "skip", "overlap", or
    "adapt" (with `otherwise`, `prefix_tokens`, `grid`; see ops/adapt.py). A .safetensors
    output keeps the first source's metadata (not the template's). `read`: how the sources are read
    (ops/inputs.py; the template is read as it is)."""
    write = check_write_options(write)
    adapting = _adapt_options(on_mismatch, otherwise, prefix_tokens, grid)
    on_mismatch = core.check_choice("error" if on_mismatch is None else on_mismatch, core.MISMATCH_POLICIES,
                                    "--on-mismatch")
    cast = dtype_to_cast(dtype)
    with ExitStack() as stack:
        ckpts, done = open_inputs(stack, sources, root, read, cast)
        model = stack.enter_context(open_checkpoint(template))
        merged, details = _into_template(ckpts, model, on_mismatch, adapting)
        written = write_checkpoint(merged, write, source=model, cast=cast, inputs=[*ckpts, model],
                                   metadata_from=ckpts[0])
    return IntoReport.extend(with_read(written, done), input=None, mode="into", sources=list(sources), template=template, **details)


ADAPT_OPTIONS = ("otherwise", "prefix_tokens", "grid")  # what --on-mismatch adapt alone takes


def refuse_adapt_options(on_mismatch: str | None, given) -> None:
    """The options of ADAPT_OPTIONS among `given` (names) apply to --on-mismatch adapt only."""
    named = [name for name in ADAPT_OPTIONS if name in given]
    if named and on_mismatch != "adapt":
        raise UsageError(f"{option_of(named[0])} applies to --on-mismatch adapt only")


def _adapt_options(on_mismatch: str | None, otherwise: str | None, prefix_tokens: int | None, grid) -> dict:
    """--otherwise, --prefix-tokens and --grid, checked: they apply to --on-mismatch adapt only."""
    values = {"otherwise": otherwise, "prefix_tokens": prefix_tokens, "grid": grid}
    refuse_adapt_options(on_mismatch, [name for name, value in values.items() if value is not None])
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
    fitting = _Fitting(ckpts, template, on_mismatch, adapting or {})
    for name, tt in template.tensors.items():
        fitting.fit(name, tt)
    fitting.check()
    fitting.list_left_out()
    return fitting.merged, fitting.report


class _Fitting:
    """Each template key filled from the first source that has it: copied, renamed, adapted,
    kept from the template or mismatched (the report's lists, one per key)."""

    def __init__(self, ckpts: list[Checkpoint], template: Checkpoint, on_mismatch: str, adapting: dict):
        self.ckpts, self.template, self.on_mismatch, self.adapting = ckpts, template, on_mismatch, adapting
        self.otherwise = adapting.get("otherwise")
        self.found: dict[str, tuple[int, str, str]] = {}  # template key -> (source index, source key, how)
        for index, ckpt in enumerate(ckpts):
            for target, (source_key, how) in core.align(ckpt.tensors, template.tensors).items():
                self.found.setdefault(target, (index, source_key, how))
        self.merged: OrderedDict[str, TensorRef] = OrderedDict()
        self.report = {"copied": [], "renamed": {}, "adapted": [], "kept_from_template": [], "kept_reasons": {},
                       "mismatched": [], "left_out": []}
        views: dict[tuple, list[str]] = {}  # names tied in the template: one storage, one outcome
        for name, tt in template.tensors.items():
            views.setdefault(tt.view_key(), []).append(name)
        self.tied = [names for names in views.values() if len(names) > 1]
        self.rules = core.adapt_rules(self._shapes(), self.tied) if on_mismatch == "adapt" else {}
        self.unfit: list[str] = []
        self.made: dict[tuple, TensorRef] = {}  # (source view, template view) -> adapted: ties stay tied

    def _source(self, name: str) -> TensorRef:
        index, source_key, _ = self.found[name]
        return self.ckpts[index].tensors[source_key]

    def _shapes(self) -> dict[str, tuple]:
        """Template key -> (source shape, template shape), where they differ."""
        return {name: (self._source(name).shape, tt.shape) for name, tt in self.template.tensors.items()
                if name in self.found and self._source(name).shape != tt.shape}

    def fit(self, name: str, tt: TensorRef) -> None:
        if name not in self.found:
            self.merged[name] = tt
            self.report["kept_from_template"].append(name)
            return
        index, source_key, how = self.found[name]
        st = self.ckpts[index].tensors[source_key]
        where = f"{self.ckpts[index].path}: {source_key} -> {self.template.path}: {name}"
        rule = self.rules.get(name)
        if rule is core.AdaptRule.HEAD:
            self.merged[name] = tt
            self.report["kept_from_template"].append(name)
            self.report["kept_reasons"][name] = (f"a classifier head, {list(st.shape)} -> {list(tt.shape)}: the new "
                                                f"model's fresh values kept")
            return
        position = None
        if rule is not None:
            rule, position = self._applicable(rule, st, tt, where)
        if rule is not None:
            self._adapt(name, rule, st, tt, position, source_key if how != "exact" else None)
        else:
            self._copy(name, st, tt, where, source_key, how)

    def _applicable(self, rule, st: TensorRef, tt: TensorRef, where: str) -> tuple:
        """(rule, position layout) — or (None, None) when the rule cannot apply and --otherwise
        says what to do instead."""
        try:
            if not (st.is_plain and tt.is_plain and st.dtype.floating and tt.dtype.floating):
                raise CkptError(f"{where}: {st.dtype.name} -> {tt.dtype.name}: shape adapters work on floating "
                                f"tensors only; drop the key from the source, or give --otherwise")
            position = (core.prefix_and_grids(st.shape[-2], tt.shape[-2], self.adapting.get("prefix_tokens"),
                                              self.adapting.get("grid")) if rule is core.AdaptRule.POSITION else None)
            return rule, position
        except CkptError as e:
            if self.otherwise is None:
                raise CkptError(str(e) if str(e).startswith(where) else f"{where}: {e}") from None
            return None, None

    def _adapt(self, name: str, rule, st: TensorRef, tt: TensorRef, position, renamed_from: str | None) -> None:
        from .. import adapt

        tie = (st.view_key(), tt.view_key())
        if tie not in self.made:
            self.made[tie] = adapt.adapted(rule, st, tt, position)
        self.merged[name] = self.made[tie]
        self.report["adapted"].append({"name": name, "rule": rule, "from": list(st.shape), "to": list(tt.shape),
                                       **({"source": renamed_from} if renamed_from is not None else {}),
                                       **({"prefix_tokens": position[0],
                                           "grid": [list(position[1]), list(position[2])]} if position else {})})

    def _copy(self, name: str, st: TensorRef, tt: TensorRef, where: str, source_key: str, how: str) -> None:
        """Copied (cast to the template's dtype), or a shape mismatch under the policy."""
        policy = self.otherwise if self.on_mismatch == "adapt" else self.on_mismatch
        if st.shape != tt.shape and self.on_mismatch == "adapt" and self.otherwise is None:
            self.unfit.append(f"{name} {list(st.shape)} -> {list(tt.shape)}")
            return
        copies = policy == "overlap" if st.shape != tt.shape else st.dtype is not tt.dtype
        if copies:
            _check_fits(where, st, tt)
        if st.shape != tt.shape:
            self.report["mismatched"].append({"name": name, "source_shape": list(st.shape),
                                              "template_shape": list(tt.shape), "policy": policy})
            self.merged[name] = _overlap(st, tt) if policy == "overlap" else tt
            return
        self.merged[name] = st if st.dtype is tt.dtype else _cast(st, tt.dtype)
        if how == "exact":
            self.report["copied"].append(name)
        else:
            self.report["renamed"][source_key] = name

    def check(self) -> None:
        """What the keys together make an error: mismatches no rule fits, options that found
        nothing to apply to, mismatches under --on-mismatch error."""
        report = self.report
        if self.unfit:
            raise CkptError(f"{len(self.unfit)} shape mismatch(es) no adapter fits: {'; '.join(self.unfit[:10])}"
                            f"{' …' if len(self.unfit) > 10 else ''} (--otherwise skip keeps the template's tensor, "
                            f"overlap copies the shared block)")
        if self.on_mismatch == "adapt":
            _keep_template_ties(self.tied, self.merged, report)
            if not any(a["rule"] is core.AdaptRule.POSITION for a in report["adapted"]):
                for option in ("prefix_tokens", "grid"):
                    if self.adapting.get(option) is not None:
                        raise UsageError(f"--{option.replace('_', '-')} applies to a position embedding that is "
                                         f"adapted; this merge adapts none")
        if report["mismatched"] and self.on_mismatch == "error":
            listing = "; ".join(f"{m['name']} {m['source_shape']} -> {m['template_shape']}"
                                for m in report["mismatched"])
            raise CkptError(f"{len(report['mismatched'])} shape mismatch(es): {listing} "
                            f"(--on-mismatch skip keeps the template's tensor, overlap copies the shared block, "
                            f"adapt fits them by their kind)")

    def list_left_out(self) -> None:
        """The sources' keys the template did not take, each name once."""
        used = {(index, source_key) for index, source_key, _ in self.found.values()}
        seen = {source_key for _, source_key, _ in self.found.values()}
        for index, ckpt in enumerate(self.ckpts):
            for k in ckpt.tensors:
                if (index, k) not in used and k not in seen:
                    seen.add(k)
                    self.report["left_out"].append(k)


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
