"""merge: a plain union of checkpoints, an update of a template (`--into`, the
`model_dict.update(pretrained_dict)` recipe), a merge method, or adapters folded into a base."""

from __future__ import annotations

from contextlib import ExitStack

from ... import core
from ...dtypes import CAST_TARGETS
from ...errors import UsageError
from ...io import open_checkpoint
from .. import methods
from ..ranks import Ranks
from ..write import ProgressFactory, write_checkpoint
from .by_method import _merged_by_method, _method_parameters
from .fold import _merge_lora
from .into import _into_template, _parse_grid
from .union import _plain_union


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
