"""`lora merge ADAPTER... --combine cat|svd`: several LoRA adapters as one, as peft's
`add_weighted_adapter` combines them (its "cat" and "svd"), per module:

    cat   A = cat(wᵢ·sᵢ·Aᵢ), B = cat(Bᵢ), r = Σ rᵢ, alpha = r    sᵢ = αᵢ/rᵢ each adapter's scale
          its fold is exactly Σ wᵢ·sᵢ·Bᵢ·Aᵢ = Σ wᵢ·ΔWᵢ (peft puts wᵢ·sᵢ into A and sets alpha = r too)
    svd   the best rank-R approximation of Σ wᵢ·ΔWᵢ, alpha = R (peft's "svd", from the factors:
          lowrank.factor_svd), R by default the largest rank of the inputs

A module only some adapters adapt is made of those (peft skips the others). peft writes one
rank for all and pads smaller modules with zeros; here each module has its own rank
(`rank_pattern`), which folds the same."""

from __future__ import annotations

import math
from contextlib import ExitStack

from ...errors import CkptError, UsageError
from ...kinds import Kind
from ..options import WriteOptions, check_write_options
from ..reports import LoraMergeReport, LoraModule
from .kinds import FLAT, Adapter, Module
from .lowrank import (
    adapter_write, as_ref, check_rank, factor_svd, factors, output_dtype, plain_modules, refuse_rank_past,
    relative_error, size, truncated, write_adapter,
)
from .output import Written
from .read import read_adapter


class Combine(Kind):
    """How `lora merge` combines the adapters' modules."""

    CAT = "cat"  # exact: the factors side by side
    SVD = "svd"  # the best rank-R approximation of the weighted sum


def merge_adapters(adapters: list[str], write: WriteOptions, *, weights: list[float] | None = None,
                   combine: str = "cat", rank: int | None = None) -> LoraMergeReport:
    """One adapter at `write.output` whose fold is Σ wᵢ·ΔWᵢ of `adapters` (PEFT folders, or kohya
    files; all of one format, written in it): `combine` "cat" exactly, "svd" as the best rank-R
    approximation per module (`rank`, by default the largest rank of the inputs)."""
    write = check_write_options(write)
    combine = Combine(combine) if combine in tuple(Combine) else _bad_combine(combine)
    weights = _weights(weights, len(adapters))
    check_rank(rank, None, need_one=False)
    if rank is not None and combine == Combine.CAT:
        raise UsageError("--rank applies to --combine svd only (cat's rank is the sum of the adapters')")
    metadata = adapter_write(write)
    with ExitStack() as stack:
        opened = [stack.enter_context(read_adapter(path)) for path in adapters]
        fmt = _one_format(opened)
        by_name = _modules_by_name(opened)
        target = rank or max(m.a.shape[0] for found in by_name.values() for _, m in found)
        written, records = [], []
        for name, found in by_name.items():
            if rank is not None:
                refuse_rank_past(rank, name, found[0][1], opened[found[0][0]].path)
            one, record = _combined(name, [(i, m, opened[i].path) for i, m in found], weights, combine, target,
                                    output_dtype([m for _, m in found]))
            record.ranks = [next((m.a.shape[0] for j, m in found if j == i), 0) for i in range(len(opened))]
            written.append(one)
            records.append(record)
        files, needs_force = write_adapter(written, fmt, write, metadata, opened[0].config)
    return LoraMergeReport(output=write.output, format=fmt.value, files=files, dry_run=write.dry_run,
                           metadata=dict(sorted({**metadata, "format": "pt"}.items())), needs_force=needs_force,
                           adapters=list(adapters), weights=weights, combine=combine.value,
                           rank=None if combine == Combine.CAT else target, modules=records)


def _bad_combine(combine) -> Combine:
    raise UsageError(f"--combine {combine!r}: expected one of {', '.join(Combine)}")


def _weights(weights: list[float] | None, count: int) -> list[float]:
    """--weights: one per adapter, finite (1 each when not given); two adapters at least."""
    if count < 2:
        raise UsageError(f"lora merge takes two adapters or more, got {count} (one adapter's rank: lora resize)")
    if weights is None:
        return [1.0] * count
    values = [float(w) for w in weights]
    if len(values) != count or not all(math.isfinite(w) for w in values):
        raise UsageError(f"--weights {','.join(map(str, weights))}: give one finite number per adapter "
                         f"({count}), in order")
    return values


def _one_format(opened: list[Adapter]):
    """The adapters' one format: names of a PEFT folder and a kohya file do not meet."""
    formats = {a.format for a in opened}
    if len(formats) > 1:
        raise CkptError(f"{opened[0].path} is {opened[0].format} but "
                        f"{next(a.path for a in opened if a.format != opened[0].format)} is not; convert one first "
                        f"(lora convert ADAPTER --to {opened[0].format})")
    return opened[0].format


def _modules_by_name(opened: list[Adapter]) -> dict[str, list[tuple[int, Module]]]:
    """Module name -> (adapter index, module) for each adapter that adapts it, in order of first
    appearance; the same module must have the same layout and shapes (but its rank) in each."""
    found: dict[str, list[tuple[int, Module]]] = {}
    for i, adapter in enumerate(opened):
        for m in plain_modules(adapter):
            found.setdefault(m.name, []).append((i, m))
    for name, each in found.items():
        (i, first), rest = each[0], each[1:]
        for j, m in rest:
            # linear and linear-t are one (B·A the same; peft saves fan_in_fan_out as its last module had it)
            same = m.layout == first.layout or m.layout in FLAT and first.layout in FLAT
            if not same or size(m) != size(first) or m.a.shape[1:] != first.a.shape[1:] \
                    or m.b.shape[2:] != first.b.shape[2:]:
                raise CkptError(f"{name}: {opened[i].path} has A {list(first.a.shape)}, B {list(first.b.shape)} "
                                f"({first.layout}) but {opened[j].path} has A {list(m.a.shape)}, B {list(m.b.shape)} "
                                f"({m.layout}); adapters of different models cannot be merged")
    return found


def _combined(name: str, found: list[tuple[int, Module, str]], weights: list[float], combine: Combine, target: int,
              dtype) -> tuple[Written, LoraModule]:
    """One module of the merged adapter (`found`: index, module, path of each adapter that has
    it), and its report (ranks filled in by the caller)."""
    import torch

    first = found[0][1]
    pairs = [factors(m, path) for _, m, path in found]
    scaled = [weights[i] * m.scale for i, m, _ in found]
    # B·A of the whole: B = [B₁ | B₂ | …], A = [w₁s₁A₁; w₂s₂A₂; …]
    b = torch.cat([fb for fb, _ in pairs], dim=1)
    a = torch.cat([s * fa for s, (_, fa) in zip(scaled, pairs)], dim=0)
    if combine == Combine.CAT:  # as peft: the scales go into A, B as it is, alpha = r
        rank, error = a.shape[0], 0.0
        a_ref = as_ref(a.reshape(rank, *first.a.shape[1:]), dtype, name)
        b_ref = as_ref(b.reshape(first.b.shape[0], rank, *first.b.shape[2:]), dtype, name)
    else:
        u, s, vh = factor_svd(b, a, name)
        rank = max(1, min(target, len(s)))
        error = relative_error(s, rank)
        a_ref, b_ref = truncated(u, s, vh, rank, tuple(first.a.shape[1:]), tuple(first.b.shape[2:]),
                                 first.b.shape[0], dtype, name)
    record = LoraModule(name=name, kind=first.layout.value, shape=list(size(first)), ranks=[], rank=rank,
                        alpha=float(rank), error=error)
    return Written(name, a_ref, b_ref, rank, float(rank), first.layout), record

