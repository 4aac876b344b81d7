"""What `lora merge`, `lora resize` and `lora convert` share: the plain LoRA modules of an adapter
(factors A, B and a scale, nothing else: anything else is refused in one line naming it), the
best low-rank approximation of B·A computed from the factors, and writing the result in the
adapter's own format (output.py).

The algebra never forms ΔW: for B [out, m] and A [m, in], B = Q_B·R_B and Aᵀ = Q_A·R_A (reduced
QR), so B·A = Q_B·(R_B·R_Aᵀ)·Q_Aᵀ and the SVD of the small m×m core gives ΔW's singular values
and vectors: U = Q_B·U', Vh = Vh'·Q_Aᵀ (Eckart–Young: the first k of them are the best rank-k
approximation, with relative error √(Σ dropped s²) / √(Σ s²))."""

from __future__ import annotations

import math
import os
from dataclasses import fields

from ... import core
from ...errors import CkptError, UsageError
from ...io.model import computed_tensor
from ..options import WriteOptions
from .kinds import Adapter, Format, Layout, Module
from .output import Written, peft_config, write_kohya, write_peft

PLAIN = (Layout.LINEAR, Layout.LINEAR_T, Layout.CONV, Layout.EMBEDDING)  # ΔW = B·A, in some orientation
_PLAIN_FIELDS = {"name", "a", "b", "scale", "layout", "bias", "kind"}
# what an adapter output is not: a .pth, shards, a DCP folder, a job's ranks, an input's metadata
NOT_FOR_ADAPTERS = ("format", "max_shard_size", "jobs", "no_metadata", "ranks")


def plain_modules(adapter: Adapter) -> list[Module]:
    """The adapter's modules, each a plain LoRA (A, B, scale); anything else refused, named."""
    if adapter.format not in (Format.PEFT, Format.KOHYA):
        raise CkptError(f"{adapter.path}: a {adapter.format} adapter; the lora group combines, resizes and converts "
                        f"PEFT folders and kohya files (merge --lora folds this one)")
    for name in adapter.replaced:
        raise CkptError(f"{adapter.path}: {name} is a whole tensor (modules_to_save, a trained bias), not a LoRA "
                        f"module; only plain LoRA modules (A, B, scale) are combined, resized or converted")
    for m in adapter.modules:
        kind = getattr(m, "kind", "lora")  # DoRA, LoHa, ... (kinds.AdapterKind): not B·A alone
        extra = [f.name for f in fields(m) if f.name not in _PLAIN_FIELDS and _given(getattr(m, f.name))]
        what = (f"a module of kind {kind}" if kind != "lora" else f"layout {m.layout}" if m.layout not in PLAIN
                else "a LoRA bias (lora_bias)" if m.bias is not None
                else f"{', '.join(m.factors)} beside A and B (a LoCon's Tucker core: lora_mid)" if m.factors
                else f"{', '.join(extra)} beside its factors" if extra else None)
        if what:
            raise CkptError(f"{adapter.path}: {m.name}: {what}; only plain LoRA modules (A, B, scale) are combined, "
                            f"resized or converted")
        a, b = tuple(m.a.shape), tuple(m.b.shape)
        if not (m.a.dtype.floating and m.b.dtype.floating) or len(a) < 2 or len(b) < 2 or b[1] != a[0] or not a[0]:
            raise CkptError(f"{adapter.path}: {m.name}: factors A {list(a)} {m.a.dtype.name}, B {list(b)} "
                            f"{m.b.dtype.name} do not make a LoRA (B·A with B's columns A's rows)")
        if not math.isfinite(m.scale):
            raise CkptError(f"{adapter.path}: {m.name}: its scale {m.scale} is not a finite number")
    return adapter.modules


def _given(value) -> bool:
    """A field a plain LoRA leaves unset (None, False, empty) is not: anything else is more than A, B, scale."""
    return value is not None and value is not False and not (isinstance(value, (dict, list, tuple)) and not value)


def size(m: Module) -> tuple[int, int]:
    """(rows, columns) of the module's B·A: its largest possible rank is the smaller."""
    return m.b.shape[0], math.prod(m.a.shape[1:])


def check_rank(rank: int | None, energy: float | None, *, need_one: bool = True) -> None:
    """--rank R (a whole number ≥ 1) or --energy E (in (0, 1]), not both; one of them with `need_one`."""
    if rank is not None and energy is not None:
        raise UsageError("--rank and --energy are two ways of choosing the rank: give one")
    if need_one and rank is None and energy is None:
        raise UsageError("give --rank R (the rank of every module) or --energy E (per module, the smallest rank "
                         "keeping that share of ΔW's squared singular values)")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise UsageError(f"--rank {rank}: a rank must be a whole number, 1 or more")
    if energy is not None and not (isinstance(energy, (int, float)) and 0 < energy <= 1):
        raise UsageError(f"--energy {energy}: must be in (0, 1] (the share of ΔW's squared singular values kept)")


def refuse_rank_past(rank: int | None, name: str, m: Module, where: str) -> None:
    """A rank larger than a module's smaller dimension cannot be: refused, naming the module."""
    rows, cols = size(m)
    if rank is not None and rank > min(rows, cols):
        raise UsageError(f"--rank {rank}: larger than {name} allows ({where}: its B·A is {rows}×{cols}, of rank at "
                         f"most {min(rows, cols)})")


def factor_svd(b, a, name: str = "ΔW"):
    """U, S, Vh of B·A (B [out, m], A [m, in], float64) from the factors: never ΔW itself. Factors
    whose product overflows float64 (lora merge's --weights times the adapters' scales) are
    refused naming `name`, never handed to LAPACK. Run in a worker thread (`interruptible`): a
    QR of a large factor is minutes in LAPACK, and Ctrl-C or SIGTERM must not wait for it."""
    def run():
        import torch

        qb, rb = torch.linalg.qr(b)
        qa, ra = torch.linalg.qr(a.T)
        core = rb @ ra.T
        if not bool(torch.isfinite(core).all()):
            raise CkptError(f"{name}: its weighted factors overflow float64 (the weights times the adapters' "
                            f"alpha/r); use smaller weights")
        u, s, vh = torch.linalg.svd(core, full_matrices=False)
        return qb @ u, s, vh @ qa.T

    return interruptible(run)


# A view may repeat the few values its file stores (stride 0: one float "viewed" as 6144 × 6144 in
# a 1.4 KB .pth; the readers allow up to 256 MiB of such repeats per file). Its SVD costs what its
# shape says, minutes, not what the files hold, so a weight (extract-lora: of BASE and TUNED) or a
# factor (the lora group) whose elements the file stores less than half of is refused past this
# many elements (512 × 512: below it, an SVD takes a moment).
REPEATED_LIMIT = 1 << 18


def stored(t) -> int:
    """How many of `t`'s elements its file holds: all of them, or for a view whose elements
    overlap (stride 0, an expanded or broadcast tensor) the span of storage it covers."""
    if t.numel <= 1 or not t.repeated_bytes():
        return t.numel
    return 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride))


def interruptible(fn, *args, **kwargs):
    """fn(*args, **kwargs) run in a worker thread while this one waits: a long call into C (the
    SVD of a large weight, minutes in LAPACK) does not return to Python until it is done, so
    Ctrl-C and SIGTERM (SystemExit, see cli) would wait for it. Waiting here, they are raised at
    once and unwind as anywhere else (the staged folder removed); the worker, a daemon, ends
    with the process."""
    import threading

    done: dict = {}

    def run():
        try:
            done["value"] = fn(*args, **kwargs)
        except BaseException as e:  # handed to the caller, as if called here
            done["error"] = e

    worker = threading.Thread(target=run, name="ckptsurgery-svd", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(0.25)
    if "error" in done:
        raise done["error"]
    return done["value"]


def energy_rank(s, energy: float) -> int:
    """The smallest k with Σ_{i<k} s_i² ≥ energy · Σ s² (at least 1): --energy E."""
    import torch

    squares = s.double() ** 2
    total = float(squares.sum())
    if total == 0:
        return 1
    reached = torch.cumsum(squares, 0) >= energy * total * (1 - 1e-12)  # E = 1 is met despite rounding
    return int(torch.nonzero(reached)[0]) + 1 if bool(reached.any()) else len(s)


def relative_error(s, k: int) -> float:
    """‖B·A − its rank-k truncation‖ / ‖B·A‖ (Frobenius): the dropped singular values' share."""
    top = float(s[0]) if len(s) else 0.0
    if top == 0:
        return 0.0
    share = (s.double() / top) ** 2  # relative to the largest: s² cannot overflow
    return math.sqrt(float(share[k:].sum()) / float(share.sum()))


def truncated(u, s, vh, k: int, a_tail: tuple, b_tail: tuple, out_rows: int, dtype, name: str) -> tuple:
    """The rank-k factors A' = √S·Vh, B' = U·√S shaped as A [k, *a_tail], B [out, k, *b_tail], as
    TensorRefs of `dtype` (computed already: they are the output)."""
    k = max(1, min(k, len(s)))
    root = s[:k].sqrt()
    a = (root[:, None] * vh[:k]).reshape(k, *a_tail)
    b = (u[:, :k] * root[None, :]).reshape(out_rows, k, *b_tail)
    return as_ref(a, dtype, name), as_ref(b, dtype, name)


def as_ref(tensor, dtype, name: str):
    """A torch tensor as a TensorRef of `dtype` (its bytes made now: they are the output)."""
    import torch

    cast = tensor.to(getattr(torch, dtype.name)).contiguous()
    if not bool(torch.isfinite(cast).all()):  # weights near a float16's largest, scaled up
        raise CkptError(f"{name}: its new factors do not fit in {dtype.name}")
    from ...io.tensors import to_bytes

    data = to_bytes(cast)
    return computed_tensor(tuple(tensor.shape), dtype, lambda: data)


def factors(m: Module, where: str):
    """The module's B [out, r] and A [r, in] as float64 matrices (finite, or refused)."""
    import torch

    from ...io.tensors import as_torch

    for what, t in (("A", m.a), ("B", m.b)):
        held = stored(t)
        if t.numel > REPEATED_LIMIT and t.numel > 2 * held:
            raise CkptError(f"{where}: {m.name}: its {what} is a view of {held:,} stored value"
                            f"{'s' if held != 1 else ''} repeated as {list(t.shape)} ({t.numel:,} elements: stride 0 "
                            f"or overlapping strides); its SVD would cost far more than the file holds (if it is a "
                            f"real factor, store it whole first: convert the adapter's weights to .safetensors)")
    b, a = as_torch(m.b).to(torch.float64).flatten(1), as_torch(m.a).to(torch.float64).flatten(1)
    if not (bool(torch.isfinite(b).all()) and bool(torch.isfinite(a).all())):
        raise CkptError(f"{where}: {m.name}: its factors hold NaN or infinite values")
    return b, a


def output_dtype(modules: list[Module]):
    """The factors' dtype when they all share it, else float32."""
    from ...dtypes import by_name

    kinds = {t.dtype.name for m in modules for t in (m.a, m.b)}
    return by_name(kinds.pop() if len(kinds) == 1 else "float32")


def adapter_write(write: WriteOptions) -> dict[str, str]:
    """The output options an adapter output takes, checked before anything is read; returns the
    adapter file's metadata: what --metadata gives, nothing of the inputs'."""
    write.refuse(*NOT_FOR_ADAPTERS, why="cannot be used with an adapter output (an adapter folder or one "
                                        ".safetensors file, with no metadata of its inputs')")
    return core.check_metadata(dict(write.metadata) if write.metadata else {}, "metadata")


# what a PEFT output keeps of its (first) input's config: which model it is for, and for what task
KEPT_CONFIG = ("base_model_name_or_path", "task_type", "revision")


def write_adapter(modules: list[Written], fmt: Format, write: WriteOptions, metadata: dict[str, str],
                  like: dict | None = None) -> tuple[list[str], list[str] | None]:
    """The adapter in `fmt`: a PEFT folder (its config keeping KEPT_CONFIG of `like`, an input's),
    or a kohya .safetensors file; nothing with --dry-run. Returns its files, and what a dry run
    without --force found already there."""
    if fmt == Format.PEFT:
        config = {**peft_config(modules), **{k: v for k, v in (like or {}).items() if k in KEPT_CONFIG}}
        files = write_peft(modules, write, metadata, config)
        taken = write.dry_run and not write.force and os.path.lexists(write.output)
        return files, [write.output] if taken else None
    report = write_kohya(modules, write, metadata)
    return report.files, report.needs_force
