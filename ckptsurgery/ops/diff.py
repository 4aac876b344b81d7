"""diff: two checkpoints compared key by key — keys on one side only, shape and dtype changes,
and values that differ beyond a tolerance."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack

from ..errors import UsageError
from ..io import Checkpoint, TensorRef
from ..io.model import mapped_range
from .inputs import open_inputs, with_read
from .options import READ_AS_IS, ReadOptions
from .reports import DiffReport
from .spools import Spools


class _Reads(ThreadPoolExecutor):
    """diff's second thread (B hashed while A is), and where a remote tensor read twice — its hash,
    then its values — is kept between the reads (`spools`: tempfile's folder, diff writes no
    output), closed at the end once the thread has stopped."""

    def __init__(self):
        super().__init__(1, thread_name_prefix="ckptsurgery-diff")
        self.spools = Spools()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self.spools.close()


def _same_bytes(a: TensorRef, b: TensorRef, pool) -> bool:
    """Bit for bit, and for quantized tensors the same scales and zero points too: the tensors'
    SHA-256 as `inspect --hash` prints them (ops/digest.py), both sides hashed at once, streamed."""
    from .digest import tensor_sha256

    other = pool.submit(tensor_sha256, b)
    return tensor_sha256(a) == other.result()


_VALUE_CHUNK = 1 << 20  # elements widened at a time: a few float64 copies of 8 MB each
_LOW = 0xFFFFFFFF


def _value_gap(a: TensorRef, b: TensorRef, atol: float, rtol: float) -> tuple[float | int, bool]:
    """(largest |a - b|, whether the values count as equal), chunk by chunk. The gap (of either
    part, when a side is complex) is exact where both sides hold integers — an integer dtype, or
    a chunk of integral floats facing one (float64 would round beyond 2**53, and int64
    overflows) — and in float64 otherwise. NaN facing NaN counts as equal, NaN facing a number
    as infinitely far; elements that are not numbers (bits, packed 4-bit) differ infinitely.
    Equal: every element within `atol + rtol·|b|` (`_float_close`, `_int_close`); with rtol 0,
    the largest gap within atol."""
    from ..dtypes import BOOL, COMPLEX, INT
    from ..io.tensors import as_torch, values

    fa, fb = (as_torch(t).reshape(-1) if t.dtype.kind == COMPLEX else values(t) for t in (a, b))
    if fa is None or fb is None:
        return float("inf"), False
    pairs = COMPLEX in (a.dtype.kind, b.dtype.kind)  # a real side compares as value + 0j
    integers = not pairs and (a.dtype.kind in (INT, BOOL) or b.dtype.kind in (INT, BOOL))
    worst, close = 0, True
    for start in range(0, fa.numel(), _VALUE_CHUNK):
        x, y = fa[start : start + _VALUE_CHUNK], fb[start : start + _VALUE_CHUNK]
        exact = (_integral(x), _integral(y)) if integers else (None, None)
        if None not in exact:
            gap = _int_gap(*exact)
            within = _int_close
        else:
            x, y = exact = _widen(x, pairs), _widen(y, pairs)
            gap = _float_gap(x, y)
            within = _float_close
        if rtol and close and gap > atol:  # the largest gap within atol: every element is within
            close = within(*exact, atol, rtol)
        worst = max(worst, gap)
    return worst, close if rtol else worst <= atol


def _integral(chunk):
    """The chunk as integers, or None: an integer chunk as it is, floats only when every one is a
    whole number int64 holds (then converting them is exact)."""
    import torch

    if not chunk.is_floating_point():
        return chunk
    whole = torch.isfinite(chunk) & (chunk == chunk.trunc()) & (chunk.abs() < 2.0**63)
    return chunk.to(torch.int64) if bool(whole.all()) else None


def _int_gap(x, y) -> int:
    """Exact max |x - y| of two integer (or bool) chunks of any widths, as a Python int. Each
    value is split into 32-bit halves held in int64, value = hi * 2**32 + lo, whose
    differences cannot overflow; |x - y| is the larger of x - y and y - x."""
    (hx, lx), (hy, ly) = _halves(x), _halves(y)
    hi, lo = hx - hy, lx - ly
    return max(_largest(hi, lo), _largest(-hi, -lo))


def _halves(chunk):
    """(hi, lo) int64 tensors with value = hi * 2**32 + lo and 0 <= lo < 2**32."""
    import torch

    if chunk.dtype == torch.uint64:  # the only width int64 cannot hold: its bits, high half unsigned
        v = chunk.view(torch.int64)
        return (v >> 32) & _LOW, v & _LOW
    v = chunk.to(torch.int64)
    return v >> 32, v & _LOW


def _largest(hi, lo) -> int:
    """The largest hi * 2**32 + lo, as a Python int (0 for no elements)."""
    if not hi.numel():
        return 0
    hi, lo = hi + (lo >> 32), lo & _LOW  # borrow from hi until 0 <= lo < 2**32: then (hi, lo) order as the values
    top = hi.max()
    return int(top) * 2**32 + int(lo[hi == top].max())


def _float_gap(x, y) -> float:
    """Largest |x - y| of two float64 chunks: NaN facing NaN and an infinity facing itself 0,
    NaN facing anything else infinite."""
    import torch

    gap = (x - y).abs()
    both_nan = torch.isnan(x) & torch.isnan(y)
    gap = torch.where(both_nan, torch.zeros_like(gap), gap)
    gap = torch.where(torch.isnan(gap), torch.full_like(gap, float("inf")), gap)
    same_inf = torch.isinf(x) & (x == y)
    gap = torch.where(same_inf, torch.zeros_like(gap), gap)
    return float(gap.max()) if gap.numel() else 0.0


def _float_close(x, y, atol: float, rtol: float) -> bool:
    """`torch.isclose(x, y, rtol, atol, equal_nan=True).all()` of two float64 chunks, computed as
    torch computes it: equal (an infinity only to itself), both NaN, or a finite |x - y| within
    atol + |rtol·y|. B (`y`) is the reference, as in torch.isclose and numpy.isclose."""
    import torch

    close = (x == y) | (torch.isnan(x) & torch.isnan(y))
    actual = (x - y).abs()
    close |= torch.isfinite(actual) & (actual <= atol + (rtol * y).abs())
    return bool(close.all())


def _int_close(x, y, atol: float, rtol: float) -> bool:
    """Every |x - y| <= atol + rtol·|y| for two integer chunks: the gap exact (32-bit halves, as
    in `_int_gap`), the bound in float64 (as `_float_close` has it) and floored — an integer is
    within a bound when it is within the bound's floor — then compared half by half."""
    import torch

    (hx, lx), (hy, ly) = _halves(x), _halves(y)
    hi, lo = hx - hy, lx - ly
    hi, lo = hi + (lo >> 32), lo & _LOW  # x - y = hi * 2**32 + lo, 0 <= lo < 2**32
    negative = hi < 0  # |x - y| = (-hi - 1) * 2**32 + (2**32 - lo), or -hi * 2**32 when lo is 0
    hi = torch.where(negative, -hi - (lo != 0).to(torch.int64), hi)
    lo = torch.where(negative, (-lo) & _LOW, lo)
    reference = (hy.to(torch.float64) * 2.0**32 + ly.to(torch.float64)).abs()
    bound = (atol + rtol * reference).floor().clamp(max=2.0**66)  # beyond any gap of two 64-bit integers
    bound_hi = (bound / 2.0**32).floor()
    bound_lo = (bound - bound_hi * 2.0**32).to(torch.int64)
    bound_hi = bound_hi.to(torch.int64)
    return bool(((hi < bound_hi) | ((hi == bound_hi) & (lo <= bound_lo))).all())


def _widen(chunk, pairs: bool):
    """float64 values, or with `pairs` real and imaginary parts side by side."""
    import torch

    if not chunk.is_complex():
        chunk = chunk.to(torch.float64)
    return torch.view_as_real(chunk.to(torch.complex128)).reshape(-1) if pairs else chunk


def diff_checkpoints(a: str, b: str, *, atol: float = 0.0, rtol: float = 0.0, ignore: list[str] | None = None,
                     root: str | None = None, by_layer: bool = False, base: str | None = None,
                     layer_pattern: str | None = None, read: ReadOptions = READ_AS_IS) -> DiffReport:
    """Keys only in A or B, shape and dtype changes, and values that differ beyond the tolerance:
    equal when every element is within `atol + rtol·|b|` (torch.isclose with equal_nan, B the
    reference; `_float_close`). With atol and rtol 0 (bit-exact) a dtype change is a difference
    in itself; with a tolerance a tensor whose dtype changed is judged on its values. The keys
    the `ignore` patterns select (core.select, on either side; each must select one) are
    compared on neither side and listed as `ignored`. A name only one side lists, which that
    side ties to a name both hold (or the other side's metadata records as tied to one of its
    names), and whose tensor is equal there, is `tied`, not a difference (`_ties`). `identical`
    is the verdict the exit code follows.

    `by_layer` adds `layers`, per layer index (`layer_pattern`, else recipes' `layer_scheme`
    rule) and one row for the tensors outside the layers: ‖A‖, ‖B−A‖ and ‖B−A‖/‖A‖ over the
    floating tensors of one shape and dtype on both sides, measured in the same pass that
    compares them (`_measure`: each tensor's bytes read once, chunk by chunk, in float64). With
    `base`, each row also holds the task vectors ‖A−BASE‖, ‖B−BASE‖ and their cosine. The names
    left out of the norms are listed in `left_out`. The verdict is the plain diff's. `read`: how
    every side is read (ops/inputs.py: `dequantize`, scaled FP8 weights compared dequantized in bfloat16; `names`)."""
    _check_options(atol, rtol, by_layer, base, layer_pattern)
    tol = (atol, rtol)
    with ExitStack() as stack:
        opened, done = open_inputs(stack, [a, b, *([base] if base is not None else [])], root, read, None)
        ca, cb, cz = opened[0], opened[1], opened[2] if base is not None else None
        pool = stack.enter_context(_Reads())
        ca, cb, ignored = _without_ignored(ca, cb, ignore)
        layers = _Layers.of(ca, cb, cz, set(ignored), layer_pattern, [a, b, *([base] if base else [])]) \
            if by_layer else None
        only_a = [k for k in ca.tensors if k not in cb.tensors]
        only_b = [k for k in cb.tensors if k not in ca.tensors]
        ties = {"a": _ties(ca, cb, only_a), "b": _ties(cb, ca, only_b)}
        partners = {partner for found in ties.values() for partner, by in found.values() if by == BY_STORAGE}
        changes: dict[str, list] = {"shape": [], "dtype": [], "value": []}
        equal, equal_partners = 0, set()
        for name, ta in ca.tensors.items():
            tb = cb.tensors.get(name)
            if tb is not None and (_compare(name, ta, tb, tol, pool, changes) if layers is None
                                   else layers.compare(name, ta, tb, tol, pool, changes)):
                equal += 1
                if name in partners:
                    equal_partners.add(name)
        tied = _tied(ca, cb, ties, equal_partners, tol, pool, changes)
    only_a = [k for k in only_a if k not in tied["a"]]
    only_b = [k for k in only_b if k not in tied["b"]]
    shape_changed, dtype_changed, value_changed = changes["shape"], changes["dtype"], changes["value"]
    exact = not (atol or rtol)
    identical = not (only_a or only_b or shape_changed or value_changed or (dtype_changed and exact))
    measured = layers.report(only_a, only_b, changes, tied, base) if layers is not None else {}
    return with_read(DiffReport(a=a, b=b, atol=atol, rtol=rtol, identical=identical, equal=equal, only_in_a=only_a,
                      only_in_b=only_b, shape_changed=shape_changed, dtype_changed=dtype_changed,
                      value_changed=value_changed, ignored=ignored,
                      tied=[{"name": name, "side": side, "tied_to": partner, "by": by}
                            for side in ("a", "b") for name, (partner, by) in tied[side].items()], **measured), done)


def _check_options(atol: float, rtol: float, by_layer: bool, base: str | None, layer_pattern: str | None) -> None:
    for option, value in (("--atol", atol), ("--rtol", rtol)):
        if type(value) not in (int, float) or not (math.isfinite(value) and value >= 0):
            raise UsageError(f"{option} must be a finite number >= 0, not {value}")
    for option, value in (("--base", base), ("--layer-pattern", layer_pattern)):
        if value is not None and not by_layer:
            raise UsageError(f"{option} goes with --by-layer (the norms per layer); add --by-layer or leave it out")


def _without_ignored(ca: Checkpoint, cb: Checkpoint, patterns: list[str] | None):
    """(A, B, the keys `patterns` select): A and B without those keys (copies that share the
    readers' tensors; the originals stay open and are closed as before). The patterns select
    among the keys of both sides, A's first; one that selects no key on either side is an error,
    as a pattern is everywhere."""
    if not patterns:
        return ca, cb, []
    from dataclasses import replace

    from .. import core

    ignored = core.select([*ca.tensors, *(k for k in cb.tensors if k not in ca.tensors)], patterns)
    skip = set(ignored)
    kept = [replace(c, tensors={k: t for k, t in c.tensors.items() if k not in skip}) for c in (ca, cb)]
    return *kept, ignored


def _compare(name: str, ta: TensorRef, tb: TensorRef, tol: tuple[float, float], pool,
             changes: dict[str, list]) -> bool:
    """One name's tensors compared within `tol` (atol, rtol): what differs appended to `changes`
    ("shape", "dtype", "value"); True when they count as equal."""
    if ta.shape != tb.shape:
        changes["shape"].append({"name": name, "a": list(ta.shape), "b": list(tb.shape)})
        return False
    exact = not any(tol)
    if ta.dtype is not tb.dtype:
        change = {"name": name, "a": ta.dtype.name, "b": tb.dtype.name}
        changes["dtype"].append(change)
        if exact:  # bit-exact: the dtype change alone differs; values are not read
            return False
        worst, close = _value_gap(ta, tb, *tol)
        change["max_abs_diff"] = worst
    else:
        same, worst, close = _hashed_then_gap(ta, tb, tol, pool)
        if same:
            return True
    if exact or not close:
        changes["value"].append({"name": name, "max_abs_diff": worst})
        return False
    return True


def _hashed_then_gap(ta: TensorRef, tb: TensorRef, tol: tuple[float, float], pool):
    """(same bytes, largest gap, within `tol`) of two tensors of one dtype: hashed, and only when
    the hashes differ read again for their values — a remote tensor fetched once for both reads
    (held by `pool.spools`: in memory when small, else a temporary file), a local one read twice
    where it lies."""
    other = pool.submit(pool.spools.hold, tb)
    held = [pool.spools.hold(ta)]
    try:
        held.append(other.result())
        if _same_bytes(*held, pool):
            return True, 0, True
        return False, *_value_gap(*held, *tol)
    finally:
        if len(held) < 2 and other.exception() is None:
            held.append(other.result())
        for t in held:
            pool.spools.release(t)


BY_STORAGE, BY_METADATA = "storage", "metadata"


def _ties(ours: Checkpoint, theirs: Checkpoint, only: list[str]) -> dict[str, tuple[str, str]]:
    """For the names only `ours` lists, the name `theirs` holds the same tensor under, when a tie
    says so: `ours` stores the name as the same view of the same bytes as a name both hold
    (`state_dict()` of a tied model; BY_STORAGE), or `theirs` records `{name: kept}` in its
    metadata, as safetensors' `save_model` does for the tied names it drops (BY_METADATA).
    (transformers' `save_pretrained` drops them and records nothing: the side that has them
    shows the tie.) Linear in the tensors: only views of a shared storage are looked at."""
    if not only:
        return {}
    shared = {id(ours.tensors[name].storage) for name, owner in ours.shares_with().items() if owner is not None}
    held: dict[tuple, str] = {}  # a view of a shared storage -> the first of its names `theirs` holds
    if shared:
        for name, t in ours.tensors.items():
            if id(t.storage) in shared and name in theirs.tensors:
                held.setdefault(t.view_key(), name)
    found: dict[str, tuple[str, str]] = {}
    for name in only:
        t = ours.tensors[name]
        partner = held.get(t.view_key()) if id(t.storage) in shared else None
        recorded = theirs.metadata.get(name)
        if partner is not None:
            found[name] = (partner, BY_STORAGE)
        elif type(recorded) is str and recorded in theirs.tensors:
            found[name] = (recorded, BY_METADATA)
    return found


def _tied(ca: Checkpoint, cb: Checkpoint, ties: dict, equal_partners: set[str], tol: tuple[float, float], pool,
          changes: dict[str, list]) -> dict:
    """Of the `_ties` of each side, those whose tensors are equal: a view's partner compared
    equal under its own name; a name the other side's metadata ties is compared here with the
    tensor that side holds (a dtype change within the tolerance reported under the name)."""
    tied: dict[str, dict[str, tuple[str, str]]] = {"a": {}, "b": {}}
    for side, ours, theirs in (("a", ca, cb), ("b", cb, ca)):
        for name, (partner, by) in ties[side].items():
            if by == BY_STORAGE:
                equal = partner in equal_partners
            else:
                pair = (ours.tensors[name], theirs.tensors[partner])
                scratch: dict[str, list] = {"shape": [], "dtype": [], "value": []}
                equal = _compare(name, *(pair if side == "a" else pair[::-1]), tol, pool, scratch)
                if equal:
                    changes["dtype"] += scratch["dtype"]
            if equal:
                tied[side][name] = (partner, by)
    return tied


# ---- --by-layer: norms per layer, measured in the pass that compares ---------------------------

# a row's sums: tensors counted, names left out, then ‖A‖², ‖B−A‖², ‖BASE‖², ‖A−BASE‖², ‖B−BASE‖², ⟨A−BASE, B−BASE⟩
_COUNT, _LEFT, _A2, _D2, _Z2, _TA2, _TB2, _TAB = range(8)
# names left out of the norms, by why (`left_out`'s `why`)
ONLY_A, ONLY_B, SHAPE, DTYPE, NOT_IN_BASE, BASE_SHAPE = ("only in A", "only in B", "shape", "dtype", "not in BASE",
                                                         "shape in BASE")


class _Layers:
    """--by-layer's sums per layer (None: outside the layers). A name both sides hold with one
    shape and one floating dtype (float16, bfloat16, float32, float64) is compared by `_measure`,
    which adds its norms to its layer's row in the same pass; any other pair by `_compare`, and
    stays out of the norms. A name both sides store as the same view as an earlier name (tied
    on both sides) is that name's tensor: its outcome is reused and counted once."""

    def __init__(self, scheme, base: Checkpoint | None, outside: bool):
        self.scheme, self.base = scheme, base
        self.sums: dict[int | None, list] = {i: [0, 0] + [0.0] * 6 for i in range(scheme.count)}
        if outside or not scheme.count:
            self.sums[None] = [0, 0] + [0.0] * 6
        self.seen: dict[tuple, tuple[bool, float]] = {}  # (A's view, B's view) -> (equal, max |A-B|)
        self.left_out: list[dict] = []

    @classmethod
    def of(cls, ca: Checkpoint, cb: Checkpoint, cz: Checkpoint | None, ignored: set[str], pattern: str | None,
           paths: list[str]) -> "_Layers":
        """The layers of the keys of A, B (and BASE, without the `ignored`), by `pattern` or the
        recipes' rule (ops/recipes/layers.py): an ambiguous model is refused naming --layer-pattern."""
        from .recipes.layers import layer_scheme

        if cz is not None and ignored:
            from dataclasses import replace

            cz = replace(cz, tensors={k: t for k, t in cz.tensors.items() if k not in ignored})
        keys = dict.fromkeys([*ca.tensors, *cb.tensors, *(cz.tensors if cz is not None else ())])
        scheme = layer_scheme(keys, " and ".join(paths), pattern)
        return cls(scheme, cz, any(scheme.layer_of(k) is None for k in keys))

    def compare(self, name: str, ta: TensorRef, tb: TensorRef, tol: tuple[float, float], pool,
                changes: dict[str, list]) -> bool:
        """`_compare`'s answer for one name, its norms added to its layer's row when it counts."""
        if ta.shape != tb.shape or ta.dtype is not tb.dtype or not ta.dtype.floating:
            return _compare(name, ta, tb, tol, pool, changes)
        views = (ta.view_key(), tb.view_key())
        known = self.seen.get(views)
        if known is None:
            tz, why = self._base_of(name, ta)
            same, worst, close, sums = _measure(ta, tb, tz, tol)
            equal = same or (any(tol) and close)
            self.seen[views] = known = (equal, worst)
            row = self.sums[self.scheme.layer_of(name)]
            if why is None:
                row[_COUNT] += 1
                for i, value in enumerate(sums, _A2):
                    row[i] += value
            else:
                self.left_out.append({"name": name, "why": why})
        if not known[0]:
            changes["value"].append({"name": name, "max_abs_diff": known[1]})
        return known[0]

    def _base_of(self, name: str, ta: TensorRef) -> tuple[TensorRef | None, str | None]:
        """(BASE's tensor to measure the task vectors from, why the name is left out or None)."""
        if self.base is None:
            return None, None
        tz = self.base.tensors.get(name)
        if tz is None or not tz.dtype.floating:
            return None, NOT_IN_BASE
        if tz.shape != ta.shape:
            return None, BASE_SHAPE
        return tz, None

    def report(self, only_a: list[str], only_b: list[str], changes: dict[str, list], tied: dict,
               base: str | None) -> dict:
        """DiffReport's --by-layer fields: `layers` (one row per layer, then the outside row),
        `layer_container`, `base` and `left_out` (with each row's count of them)."""
        skip = {name for side in tied.values() for name in side}
        whys = [*((n, ONLY_A) for n in only_a), *((n, ONLY_B) for n in only_b),
                *((c["name"], SHAPE) for c in changes["shape"]), *((c["name"], DTYPE) for c in changes["dtype"])]
        left = [{"name": n, "why": why} for n, why in whys if n not in skip] + self.left_out
        for entry in left:
            self.sums[self.scheme.layer_of(entry["name"])][_LEFT] += 1
        rows = [_row(layer, sums, base is not None) for layer, sums in self.sums.items()]
        return {"base": base, "layer_container": self.scheme.container, "layers": rows, "left_out": left}


def _row(layer: int | None, sums: list, with_base: bool) -> dict:
    """One layer's row of `layers`: the norms from the sums of squares."""
    a, d = math.sqrt(sums[_A2]), math.sqrt(sums[_D2])
    row = {"layer": layer, "tensors": sums[_COUNT], "left_out": sums[_LEFT], "a_norm": a, "diff_norm": d,
           "relative": d / a if a != 0 else None}
    if with_base:
        z, ta, tb = (math.sqrt(sums[i]) for i in (_Z2, _TA2, _TB2))
        product = sums[_TA2] * sums[_TB2]  # √(‖a‖²‖b‖²): exactly ‖a‖² when a = b (not always ‖a‖·‖a‖)
        cosine = None if ta == 0 or tb == 0 else \
            sums[_TAB] / math.sqrt(product) if 0 < product < math.inf else sums[_TAB] / (ta * tb)
        row.update(base_norm=z, a_delta=ta, b_delta=tb, a_relative=ta / z if z != 0 else None,
                   b_relative=tb / z if z != 0 else None,
                   cosine=max(-1.0, min(1.0, cosine)) if cosine is not None and math.isfinite(cosine) else cosine)
    return row


_NUMPY = {"float64": "<f8", "float32": "<f4", "float16": "<f2"}  # bfloat16: the upper half of a float32


def _measure(ta: TensorRef, tb: TensorRef, tz: TensorRef | None, tol: tuple[float, float]):
    """(same bytes, largest |A − B|, every element within the tolerance, the sums) of two
    floating tensors of one shape and dtype, and BASE's (`tz`, any floating dtype, that shape),
    in one pass: each tensor's bytes read once, `_VALUE_CHUNK` elements at a time, widened to
    float64 with numpy. The sums are ‖A‖², ‖B−A‖², and with BASE ‖BASE‖², ‖A−BASE‖², ‖B−BASE‖²,
    ⟨A−BASE, B−BASE⟩. The gap and closeness are `_value_gap`'s (`_float_gap`, `_float_close`),
    computed only where a chunk's bytes differ (elsewhere the gap is 0)."""
    import numpy as np

    atol, rtol = tol
    sums = [0.0] * 6
    same, worst, close = True, 0.0, True
    tensors = (ta, tb) if tz is None else (ta, tb, tz)
    for raws in zip(*map(_raw_chunks, tensors)):
        x, y, *z = (_decode(raw, t.dtype.name) for raw, t in zip(raws, tensors))
        with np.errstate(invalid="ignore", over="ignore"):  # NaN and infinities: norms NaN or inf, said so
            d = y - x
            sums[0] += float(np.dot(x, x))
            sums[1] += float(np.dot(d, d))
            if z:
                da, db = x - z[0], y - z[0]
                sums[2] += float(np.dot(z[0], z[0]))
                sums[3] += float(np.dot(da, da))
                sums[4] += float(np.dot(db, db))
                sums[5] += float(np.dot(da, db))
            if np.array_equal(np.frombuffer(raws[0], np.uint8), np.frombuffer(raws[1], np.uint8)):
                continue
            same = False
            gap = _np_float_gap(x, y)
            if rtol and close and gap > atol:
                close = _np_float_close(x, y, atol, rtol)
        worst = max(worst, gap)
    return same, worst, (close if rtol else worst <= atol), sums


def _raw_chunks(t: TensorRef):
    """The tensor's row-major bytes, `_VALUE_CHUNK` elements at a time: views of the mapped file
    when they lie there in order, else of one copy of the whole tensor."""
    size, numel = t.dtype.itemsize, t.numel
    in_order = mapped_range(t)
    if in_order is not None:
        source, first = in_order
        for start in range(0, numel, _VALUE_CHUNK):
            yield source.view(first + start * size, min(_VALUE_CHUNK, numel - start) * size)
        return
    data = memoryview(t.data()).cast("B")
    for start in range(0, numel, _VALUE_CHUNK):
        yield data[start * size:(start + _VALUE_CHUNK) * size]


def _decode(raw, dtype: str):
    """float64 values of a chunk of float16, bfloat16, float32 or float64 bytes."""
    import numpy as np

    if dtype == "bfloat16":
        return (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return np.frombuffer(raw, _NUMPY[dtype]).astype(np.float64)


def _np_float_gap(x, y) -> float:
    """`_float_gap` in numpy: largest |x − y|, NaN facing NaN and an infinity facing itself 0,
    NaN facing anything else infinite."""
    import numpy as np

    gap = np.abs(x - y)
    gap[np.isnan(x) & np.isnan(y)] = 0.0
    gap[np.isnan(gap)] = np.inf
    gap[np.isinf(x) & (x == y)] = 0.0
    return float(gap.max()) if gap.size else 0.0


def _np_float_close(x, y, atol: float, rtol: float) -> bool:
    """`_float_close` in numpy: equal, both NaN, or a finite |x − y| within atol + |rtol·y|."""
    import numpy as np

    actual = np.abs(x - y)
    close = (x == y) | (np.isnan(x) & np.isnan(y)) | (np.isfinite(actual) & (actual <= atol + np.abs(rtol * y)))
    return bool(close.all())
