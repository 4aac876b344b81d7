"""`lora resize ADAPTER (--rank R | --energy E)`: each module's B·A replaced by its best rank-k
approximation (computed from the factors: lowrank.factor_svd), with k = min(R, its rank) or, with
--energy E, the smallest k whose squared singular values reach E of their sum. Its alpha is
scale·k, so that alpha/k is the module's old scale (kohya's resize_lora.py: new_alpha =
scale·new_rank); the factors are written in the adapter's dtype and format."""

from __future__ import annotations

from ..options import WriteOptions, check_write_options
from ..reports import LoraModule, LoraResizeReport
from .kinds import Module
from .lowrank import (
    adapter_write, check_rank, energy_rank, factor_svd, factors, output_dtype, plain_modules, refuse_rank_past,
    relative_error, size, truncated, write_adapter,
)
from .output import Written
from .read import read_adapter


def resize_adapter(adapter: str, write: WriteOptions, *, rank: int | None = None,
                   energy: float | None = None) -> LoraResizeReport:
    """The adapter at `write.output` with every module cut to `rank` (those of a smaller rank kept
    at theirs) or to the rank that keeps `energy` of its squared singular values."""
    write = check_write_options(write)
    check_rank(rank, energy)
    metadata = adapter_write(write)
    with read_adapter(adapter) as opened:
        modules = plain_modules(opened)
        for m in modules:
            refuse_rank_past(rank, m.name, m, opened.path)
        dtype = output_dtype(modules)
        written, records = zip(*(_resized(m, rank, energy, dtype, opened.path) for m in modules)) if modules \
            else ((), ())
        files, needs_force = write_adapter(list(written), opened.format, write, metadata, opened.config)
        fmt = opened.format
    return LoraResizeReport(output=write.output, format=fmt.value, files=files, dry_run=write.dry_run,
                            metadata=dict(sorted({**metadata, "format": "pt"}.items())), needs_force=needs_force,
                            adapter=adapter, rank=rank, energy=energy, modules=list(records))


def _resized(m: Module, rank: int | None, energy: float | None, dtype, where: str) -> tuple[Written, LoraModule]:
    b, a = factors(m, where)
    u, s, vh = factor_svd(b, a)
    k = max(1, min(rank, len(s)) if rank is not None else energy_rank(s, energy))
    a_ref, b_ref = truncated(u, s, vh, k, tuple(m.a.shape[1:]), tuple(m.b.shape[2:]), m.b.shape[0], dtype, m.name)
    alpha = m.scale * k  # alpha/k: the old scale
    record = LoraModule(name=m.name, kind=m.layout.value, shape=list(size(m)), ranks=[m.a.shape[0]], rank=k,
                        alpha=alpha, error=relative_error(s, k))
    return Written(m.name, a_ref, b_ref, k, alpha, m.layout), record
