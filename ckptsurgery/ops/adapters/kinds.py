"""The types the adapter package shares: the adapter formats (`Format`: how a file is read, and
`AdapterFormat`, what a format brings — how it is recognised, its reader, how its module names
resolve against a base's keys), the adapter kinds (`AdapterKind`: what a module's factors are
and how they change a base weight, and `FoldKind`, what a kind declares), the layouts of a
LoRA's factors (`Layout`), `Module`, `Adapter` and `Step`. The two tables are `read.FORMATS`
and `read.KINDS`.

A new format (LyCORIS, diffusers) is one module holding its reader and resolver, a `Format`
member and one entry in `read.FORMATS`; a new kind is one module `kind_<name>.py` declaring a
`FoldKind`, an `AdapterKind` member and one entry in `read.KINDS`."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from collections import OrderedDict
from typing import Callable, NoReturn, Protocol

from ...errors import CkptError
from ...io import Checkpoint, TensorRef, open_checkpoint
from ...io.model import mapped_range
from ...kinds import Kind


class Layout(Kind):
    """How a LoRA module's factors A, B make ΔW (kind_lora.delta), and which axis of the base
    weight is its output (DoRA's norms, IA3's vectors); extract-lora's report gives it as `kind`."""

    LINEAR = "linear"  # ΔW = B·A                         A [r, in], B [out, r]
    LINEAR_T = "linear-t"  # ΔW = (B·A)ᵀ: the weight is stored [in, out] (peft's fan_in_fan_out, GPT-2's Conv1D)
    CONV = "conv"  # ΔW = (B.flatten(1)·A.flatten(1)).view(W.shape)   A [r, in, k…], B [out, r, 1…]
    EMBEDDING = "embedding"  # ΔW = (B·A)ᵀ                 lora_embedding_A [r, vocab], _B [dim, r]


TRANSPOSED = (Layout.EMBEDDING, Layout.LINEAR_T)  # ΔW = (B·A)ᵀ
FLAT = (Layout.LINEAR, Layout.LINEAR_T)  # 2-D factors whose orientation the base's shape may tell


class Format(Kind):
    """An adapter format; the value is the report's `format`. Each has one entry in read.FORMATS."""

    PEFT = "peft"  # a peft adapter folder: adapter_config.json + adapter_model.safetensors (or .bin)
    KOHYA = "kohya"  # one .safetensors file of lora_unet_…/lora_te…_/lycoris_… keys (LoRA, LoCon, LoHa, LoKr, full)
    DIFFUSERS = "diffusers"  # one file of unet./transformer./text_encoder. keys with lora_A/lora_B (lora.down/up)


class AdapterKind(Kind):
    """What a module's factors are and how they change the base weight; the value is the
    report's. Each has one module kind_<name>.py and one entry in read.KINDS."""

    LORA = "lora"  # W + s·ΔW, ΔW = B·A (by Layout)
    DORA = "dora"  # m ⊙ (W + s·ΔW)/‖W + s·ΔW‖, the norm per output
    IA3 = "ia3"  # W ⊙ l: each output (or, feed-forward, each input) times a learned value
    LOHA = "loha"  # W + s·(w1_a·w1_b) ⊙ (w2_a·w2_b)
    LOKR = "lokr"  # W + s·w1 ⊗ w2
    FULL = "full"  # W + diff, b + diff_b: a whole difference (LyCORIS `full`)


@dataclass
class Module:
    """One adapted weight of an adapter: its factors, scale and layout. `a`, `b` are a LoRA's
    (and DoRA's) low-rank factors; a kind's other factors are in `factors`, by the names its
    FoldKind declares."""

    name: str  # as the adapter names it: a module name (peft) or the underscore name (kohya)
    a: TensorRef | None
    b: TensorRef | None
    scale: float  # α/r (α/√r): the user's --lora-scale is applied on top
    layout: Layout
    bias: TensorRef | None = None  # peft lora_bias: B's bias, added (× scale) to the base bias
    kind: AdapterKind = AdapterKind.LORA
    factors: dict[str, TensorRef] = field(default_factory=dict)
    feedforward: bool = False  # IA3: its vector scales the layer's inputs (peft's feedforward_modules), not outputs
    lycoris: bool = False  # LoKr read from a LyCORIS/kohya file: w1 ⊗ w2 laid out as LyCORIS's make_kron does


@dataclass
class Adapter:
    """An adapter read by its format's reader, open until `close` (its tensors are read lazily)."""

    path: str
    format: Format
    modules: list[Module]
    replaced: dict[str, TensorRef] = field(default_factory=dict)  # peft modules_to_save, trained biases
    config: dict = field(default_factory=dict)
    checkpoints: list[Checkpoint] = field(default_factory=list)

    def close(self) -> None:
        for ckpt in self.checkpoints:
            ckpt.close()


class Step(ABC):
    """One change to one base tensor, made a chunk of its rows at a time: fold.py runs a
    tensor's steps in order on each chunk, so no more than a chunk of W is ever widened. A step
    whose `numpy` is True also has `rows_numpy(out, lo, hi)` (and, with `whole`,
    `measure_numpy`): `rows` on a widened numpy array (float32, float64 for a float64 W), so that
    the fold needs no torch."""

    whole = False  # True: `measure` must see every row (as the steps before left it) first
    numpy = False  # True: the step has `rows_numpy`

    @abstractmethod
    def rows(self, out, lo: int, hi: int) -> None:
        """Change `out`, rows [lo, hi) of the tensor as the steps before left them (widened
        torch), in place."""

    def measure(self, out, lo: int, hi: int) -> None:
        """With `whole`: see rows [lo, hi) (each row once, in order) before any `rows` call."""

    def measure_numpy(self, out, lo: int, hi: int) -> None:
        """With `numpy` and `whole`: `measure` on a numpy array."""


class Added(Step):
    """rows += factor · make(lo, hi, out): an additive kind's ΔW (or a bias), rows [lo, hi) of it
    shaped and typed as `out`; `make_numpy` (optional) the same as a new numpy array, which the
    step may change."""

    def __init__(self, make, factor: float, make_numpy=None):
        self.make, self.factor, self.make_numpy = make, factor, make_numpy
        self.numpy = make_numpy is not None

    def rows(self, out, lo: int, hi: int) -> None:
        out.add_(self.make(lo, hi, out), alpha=self.factor)

    def rows_numpy(self, out, lo: int, hi: int) -> None:
        delta = self.make_numpy(lo, hi, out)
        delta *= out.dtype.type(self.factor)
        out += delta


NUMPY_DTYPES = {"float16": "<f2", "bfloat16": "<u2", "float32": "<f4", "float64": "<f8"}  # bfloat16: its bits


def numpy_ready(t: TensorRef) -> bool:
    """Whether `t` is read in numpy (`raw_rows`, `row_values`): a plain float of NUMPY_DTYPES,
    its bytes in row-major order."""
    return t.dtype.name in NUMPY_DTYPES and t.is_plain and t.is_contiguous


def raw_rows(t: TensorRef):
    """A numpy_ready `t` as a read-only numpy view of its bytes, shaped [rows, …] (a 0-d tensor
    one row), in its raw dtype (bfloat16 as its uint16 bits): `widen` makes values of a slice."""
    import numpy as np

    return np.frombuffer(t.data(), NUMPY_DTYPES[t.dtype.name]).reshape(t.shape[0] if t.shape else 1, *t.shape[1:])


def widen(raw, dtype: str, wide: str):
    """`raw` (of raw_rows, any slice) as float values of numpy dtype `wide` (float32, float64),
    exactly; a new array unless `raw` already has that dtype (then `raw` itself)."""
    import numpy as np

    if dtype == "bfloat16":  # the upper half of a float32
        bits = raw.astype(np.uint32)
        bits <<= 16
        values = bits.view(np.float32)
        return values if wide == "float32" else values.astype(wide)
    return raw.astype(wide, copy=False)


def values_numpy(t: TensorRef, wide: str):
    """A numpy_ready `t` whole, shaped as it is, as `wide` values: read-only (a view of its
    bytes when they are already `wide`), for products that make arrays of their own."""
    return widen(raw_rows(t).reshape(t.shape), t.dtype.name, wide)


def finite(t: TensorRef) -> bool:
    """Whether every value of a floating `t` is finite: in numpy when it can (no torch)."""
    if numpy_ready(t):
        import numpy as np

        return bool(np.isfinite(widen(raw_rows(t).reshape(-1), t.dtype.name, "float64")).all())
    from ...io.tensors import as_torch

    return bool(as_torch(t).isfinite().all())


PRODUCT_BLOCK = 1 << 18  # rows·r·columns of one block of matmul_rows: OpenBLAS runs a product this small on
# one thread, and on a busy machine a large one split across threads costs far more than it gains
# (1024 × 16 @ 16 × 1024 on the project's 2 shared cores: 9-20 ms whole, 0.6 ms in blocks of 16 rows)


def matmul_rows(left, right, times=None):
    """`left @ right` ([n, r] @ [r, m], numpy) as a new array, a block of rows at a time; with
    `times` = (left2, right2), each block multiplied by the same rows of left2 @ right2 (a
    Hadamard product of two low-rank products, made without a second [n, m] array)."""
    import numpy as np

    rank = max(left.shape[1], times[0].shape[1] if times else 0, 1)
    result = np.empty((left.shape[0], right.shape[1]), np.result_type(left, right))
    step = max(1, PRODUCT_BLOCK // (rank * max(right.shape[1], 1)))
    for lo in range(0, left.shape[0], step):
        block = result[lo:lo + step]
        np.matmul(left[lo:lo + step], right, out=block)
        if times is not None:
            block *= times[0][lo:lo + step] @ times[1]
    return result


SQUARES_BLOCK = 1 << 16  # elements of numpy `v` widened to float64 at a time by square_sums


def square_sums(v, axis: int):
    """Σ v² of numpy `v` [rows, n, …] in float64, per index of `axis` (0: per row, 1: per
    index of the second axis) over every other axis; a few rows widened at a time, so that
    summing a chunk's squares holds no float64 copy of it."""
    import numpy as np

    rows = v.shape[0]
    if axis == 0:
        flat = v.reshape(rows, -1) if v.size else np.zeros((rows, 0))
    else:
        flat = v.reshape(rows, v.shape[1], -1) if v.size else np.zeros((rows, v.shape[1], 0))
    per_row = math.prod(flat.shape[1:])
    step = max(1, SQUARES_BLOCK // max(per_row, 1))
    sums = np.zeros(flat.shape[0] if axis == 0 else flat.shape[1])
    for lo in range(0, rows, step):
        block = flat[lo:lo + step].astype(np.float64)
        np.square(block, out=block)
        if axis == 0:
            sums[lo:lo + step] = block.sum(axis=1)
        else:
            sums += block.sum(axis=(0, 2))
    return sums


def row_norms(v, wide: str):
    """The Euclidean norm of each row of numpy `v` (over every axis but the first), its squares
    summed in float64, given in `wide`."""
    import numpy as np

    return np.sqrt(square_sums(v, 0)).astype(wide)


def row_values(t: TensorRef, wide: str):
    """(lo, hi) -> rows [lo, hi) of a numpy_ready `t` as a new `wide` numpy array (the caller's to
    change): read from the file where its bytes lie in order there, else from one copy of them
    made at the first rows and dropped after the last."""
    import numpy as np

    tail = tuple(t.shape[1:])
    count = t.shape[0] if t.shape else 1
    row = t.nbytes // count if count else 0
    name, code = t.dtype.name, NUMPY_DTYPES[t.dtype.name]
    in_order = mapped_range(t)
    held: list = []

    def read(lo: int, hi: int):
        if in_order is not None:
            source, first = in_order
            raw = source.view(first + lo * row, (hi - lo) * row)
        else:
            if not held:
                held.append(memoryview(t.data()).cast("B"))
            raw = held[0][lo * row:hi * row]
            if hi == count:
                held.clear()
        values = widen(np.frombuffer(raw, code), name, wide)
        if name == wide:  # a view of the file: copied
            values = values.copy()
        return values.reshape(hi - lo, *tail)

    return read


def row_reader(t: TensorRef):
    """(lo, hi) -> rows [lo, hi) of `t` as torch, in its dtype: a view of the file where its bytes
    lie in order there, else of one copy made at the first rows and dropped after the last."""
    from ...io.tensors import as_torch, flat_view

    tail = t.shape[1:]
    count = t.shape[0] if t.shape else 1
    row = t.nbytes // count if count else 0
    in_order = mapped_range(t)
    if in_order is not None:
        source, first = in_order
        return lambda lo, hi: flat_view(source.view(first + lo * row, (hi - lo) * row),
                                        t.dtype.view_name).view(hi - lo, *tail)
    held: list = []

    def read(lo: int, hi: int):
        if not held:
            held.append(as_torch(t).reshape(count, *tail))
        rows = held[0][lo:hi]
        if hi == count:
            held.clear()
        return rows

    return read


def check_base_weight(where: str, key: str, weight: TensorRef, kind: str) -> None:
    """Every kind folds into a floating-point weight whose bytes lie as they are (not quantized,
    packed or computed); `kind` names it in the refusal ("a LoRA", "LoHa", ...)."""
    if not weight.dtype.floating or not weight.is_plain:
        raise CkptError(f"{where}: the base's {key} is {weight.dtype.name}; {kind} folds into floating-point "
                        f"weights only")


class FoldKind(ABC):
    """What an adapter kind declares, in its module kind_<name>.py: its name, the factors a
    module of it holds, the check of them against the base weight (a one-line refusal naming
    the module and the factor), and how they change that weight — as Steps, on the weight's
    and, for some kinds, its bias's rows."""

    name: AdapterKind
    factors: tuple[str, ...]  # "a", "b" are Module.a/.b; the others are keys of Module.factors

    @abstractmethod
    def check(self, where: str, module: Module, key: str, weight: TensorRef, bias: TensorRef | None,
              square: Layout | None) -> Layout:
        """Refuse what does not fit the base's `weight` (named `key`; `bias` its bias, if any);
        return the layout the module folds with (`square`: the layout of a square linear weight,
        which its shape cannot tell, as the adapter's other weights show it)."""

    def orientation(self, module: Module, weight: TensorRef) -> Layout | None:
        """linear or linear-t where the factors and a 2-D weight's shape tell (it is not square),
        else None; what the adapter's square weights are told by (fold._square_layouts)."""
        return None

    @abstractmethod
    def steps(self, module: Module, layout: Layout, scale: float, weight: TensorRef) -> list[tuple[str, Step]]:
        """The changes, in order, as (what: "weight" or "bias", step) — a bias step only where
        the base has that bias; `scale` is the user's --lora-scale for this adapter, `weight` the
        base weight `check` passed."""


class Resolver(Protocol):
    """An adapter's names onto a base's keys (made from the base's keys, one per adapter)."""

    def module_key(self, name: str) -> str | None:
        """The base key a module's ΔW folds into (None: the base has none)."""

    def __call__(self, name: str) -> str | None:
        """The base key a whole tensor of the adapter (`Adapter.replaced`) replaces."""

    def check(self, where: str) -> dict | None:
        """Once every name is resolved: refuse what does not hold together; the prefix read
        past (`{"added"|"removed": prefix, "keys": n}`, the report's `prefix`) or None."""


@dataclass(frozen=True)
class AdapterFormat:
    """One adapter format: its entry in read.FORMATS.

    Args:
        name: the Format member (the report's `format`).
        recognises: whether a path given to `--lora` is of this format, from the path (and,
            for a file without a config, its key names: no tensor data); the table is tried in
            order and its last entry takes whatever is left.
        read: path -> Adapter, its checkpoints open until Adapter.close (a reader that raises
            closes what it opened).
        resolver: the base's keys -> a Resolver for one adapter.
    """

    name: Format
    recognises: Callable[[str], bool]
    read: Callable[[str], Adapter]
    resolver: Callable[[list[str]], Resolver]


MAX_PREFIX_DEPTH = 64  # tails of a name below this many levels only: real module names have ~15


def suffixes(name: str) -> list[str]:
    """`a.b.c` -> [`b.c`, `c`]: the dotted tails of a name, those at most MAX_PREFIX_DEPTH dots
    deep (so that a hostile name of 40 000 dots is not 40 000 copies of itself)."""
    if name.count(".") > MAX_PREFIX_DEPTH:
        return []
    return [name[i + 1:] for i, c in enumerate(name) if c == "."]


def read_file(path: str, adapter: Callable[[Checkpoint], Adapter]) -> Adapter:
    """A single-file adapter format's reader: the file opened, `adapter(ckpt)` made of it, the
    file closed again if that fails (an Adapter holds its checkpoint open until `close`)."""
    ckpt = open_checkpoint(path)
    try:
        return adapter(ckpt)
    except BaseException:
        ckpt.close()
        raise


def module_parts(ckpt: Checkpoint, part: Callable[[str], tuple[str, str] | None], refuse: Callable[[str], NoReturn],
                 layouts: str = "two keys") -> dict[str, dict[str, TensorRef]]:
    """A single-file adapter's tensors by module, in the file's order: module -> {part -> tensor},
    `part(key)` naming a key's module and part, None for a key that is no adapter weight of the
    format (`refuse(key)` raises). A part held twice (under two `layouts`) is refused."""
    parts: dict[str, dict[str, TensorRef]] = OrderedDict()
    for key, t in ckpt.tensors.items():
        found = part(key)
        if found is None:
            refuse(key)
        module, slot = found
        held = parts.setdefault(module, {})
        if slot in held:
            raise CkptError(f"{ckpt.path}: module {module} has two {slot} weights (in {layouts}); which one folds "
                            f"is a guess")
        held[slot] = t
    return parts
