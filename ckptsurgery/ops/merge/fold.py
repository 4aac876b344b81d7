"""merge BASE --lora ADAPTER...: adapters folded into one base (ops/lora)."""

from __future__ import annotations

from contextlib import ExitStack

from ... import core
from ...dtypes import CAST_TARGETS
from ...errors import UsageError
from ...io import open_checkpoint
from ..write import write_checkpoint


def _merge_lora(sources: list[str], output: str, loras: list[str], scales: list[float] | None, allow_unmatched: bool,
                *, into, average, method, base, density, scale, t, seed, on_conflict, on_mismatch, weights, dtype,
                root, force, dry_run, progress, format, ranks, metadata, no_metadata) -> dict:
    """`merge BASE --lora ADAPTER... -o OUT`: the adapters folded into BASE, in order."""
    from .. import lora

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
