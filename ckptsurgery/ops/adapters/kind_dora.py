"""DoRA (peft's `use_dora`): LoRA's ΔW, then each output's weights rescaled to a learned
magnitude m:

    W' = m / ‖W₀ + S·s·ΔW‖ ⊙ (W + S·s·ΔW)

as peft's DoRA variants merge it (peft/tuners/lora/variants.py, dora.py). ‖·‖ is the norm of
each output's weights: a row of a Linear's or a conv's weight (over its inputs and kernel), a
column of a fan_in_fan_out weight ([in, out], transformers' Conv1D) and of an Embedding's
([vocab, dim]: one magnitude per embedding dimension). W₀ is the base weight as read, W the
weight as the adapters folded before this one left it (W₀ for the first): peft takes the norm
from the weight without its other adapters, in its merge and in its forward pass alike (they
agree), and rescales the weight with them. A row's norm is made with its row chunk; a column's
needs every row first (Step.whole). S, the user's --lora-scale, scales ΔW inside the norm, as
peft's scaling does. Its entry in read.KINDS; peft.py reads `lora_magnitude_vector` into
Module.factors["magnitude"].

LyCORIS's weight decomposition (`dora_wd`: a `dora_scale` beside a LoRA/LoCon's, a LoHa's or a
LoKr's factors in a kohya/LyCORIS file) is another rule, as its modules' forward pass applies it
(lycoris/functional/general.py `weight_decompose`) — `Decomposed` below, which the LoHa and LoKr
kinds use too:

    V = W + s·ΔW,   W' = V ⊙ (S·(m/(‖V‖ + ε) − 1) + 1)

the norm per output (dora_scale [out, 1, …], `wd_on_out`, LyCORIS's default) or per input
(`[1, in, …]`), told by its shape; ε is the float epsilon of the dtype it is computed in (float32,
float64 for a float64 weight: LyCORIS's in a float32 model, ComfyUI's); W the weight as
the adapters before left it; S, the user's --lora-scale, is LyCORIS's multiplier, which moves
the rescale and not ΔW (S = 0 leaves W + s·ΔW, as LyCORIS's forward does)."""

from __future__ import annotations

from abc import abstractmethod

from ...errors import CkptError
from .kind_lora import Lora, check_factors, delta_rows, delta_rows_numpy
from .kinds import (TRANSPOSED, Added, AdapterKind, FoldKind, Layout, Module, Step, check_base_weight, finite,
                    numpy_ready, row_norms, row_reader, row_values, square_sums, values_numpy)


class Dora(Lora):  # LoRA's factors, their check and orientation; its own steps
    name = AdapterKind.DORA
    factors = ("a", "b", "magnitude", "mid", "dora_scale")  # peft: a, b, magnitude; LyCORIS: a, b[, mid], dora_scale

    def check(self, where, module, key, weight, bias, square):
        if "dora_scale" in module.factors:  # LyCORIS's (LoRA/LoCon with dora_wd)
            if "magnitude" in module.factors:
                raise CkptError(f"{where}: both a lora_magnitude_vector and a dora_scale; a module holds one")
            layout = Lora.check(self, where, module, key, weight, bias, square)
            check_dora_scale(where, module, key, weight)
            return layout
        if "mid" in module.factors:
            raise CkptError(f"{where}: a lora_mid beside a lora_magnitude_vector, which peft never makes")
        layout = check_factors(where, module, key, weight, square)
        if module.bias is not None:
            raise CkptError(f"{where}: a LoRA bias (lora_bias) on a DoRA module, which peft never makes")
        m = module.factors["magnitude"]
        outputs = weight.shape[1] if layout in TRANSPOSED else weight.shape[0]
        axis = "column" if layout in TRANSPOSED else "row"
        if m.numel != outputs or max(m.shape, default=1) != outputs or not m.dtype.floating:
            raise CkptError(f"{where}: lora_magnitude_vector {list(m.shape)} {m.dtype.name} does not fit the base's "
                            f"{key} {list(weight.shape)}: DoRA holds one floating magnitude per output "
                            f"({outputs}, a {axis} each)")
        if not finite(m):
            raise CkptError(f"{where}: lora_magnitude_vector holds NaN or infinite values; nothing was written")
        return layout

    def steps(self, module, layout, scale, weight) -> list[tuple[str, Step]]:
        if "dora_scale" in module.factors:
            delta = lambda lo, hi, out: delta_rows(module, layout, lo, hi, out.shape, out.dtype)  # noqa: E731
            in_numpy = None
            if all(numpy_ready(t) for t in (module.a, module.b, *module.factors.values())):
                in_numpy = lambda lo, hi, out: delta_rows_numpy(module, layout, lo, hi, out.shape, out.dtype.name)  # noqa: E731
            return [("weight", Decomposed(module, delta, module.scale, scale, weight, in_numpy))]
        return [("weight", Rescaled(module, layout, scale * module.scale, weight))]


class Rescaled(Step):
    """W's rows → m / ‖W₀ + factor·ΔW‖ ⊙ (W + factor·ΔW): the norms per row (a row is an
    output), or per column, measured over every row first. In numpy (`rows_numpy`) when the
    base, the factors and m are plain floats: the same float32 (float64) products, the norms'
    squares summed in float64 — numpy's float32 norm sums in another order than torch's, so a
    norm may differ from torch's by an ulp and a bfloat16/float16 output by one step of it."""

    def __init__(self, module: Module, layout: Layout, factor: float, weight):
        self.module, self.layout, self.factor, self.weight = module, layout, factor, weight
        self.reader = None  # W₀'s rows (torch), made at the first torch rows: a numpy fold has no torch
        self.reader_numpy = None  # the same, numpy
        self.whole = layout in TRANSPOSED
        self.squares = None  # per column: Σ (W₀ + factor·ΔW)² over the rows measured (float64)
        self.numpy = all(numpy_ready(t) for t in (weight, module.a, module.b, module.factors["magnitude"]))

    def base(self, lo: int, hi: int):
        """W₀'s rows: the norms are the base's, whatever was folded before."""
        if self.reader is None:
            self.reader = row_reader(self.weight)
        return self.reader(lo, hi)

    def base_numpy(self, lo: int, hi: int, wide: str):
        if self.reader_numpy is None:
            self.reader_numpy = row_values(self.weight, wide)
        return self.reader_numpy(lo, hi)

    def delta(self, out, lo: int, hi: int):
        return self.factor * delta_rows(self.module, self.layout, lo, hi, out.shape, out.dtype)

    def delta_numpy(self, out, lo: int, hi: int):
        delta = delta_rows_numpy(self.module, self.layout, lo, hi, out.shape, out.dtype.name)
        delta *= out.dtype.type(self.factor)
        return delta

    def measure_numpy(self, out, lo: int, hi: int) -> None:
        v = self.base_numpy(lo, hi, out.dtype.name)
        v += self.delta_numpy(out, lo, hi)
        squares = square_sums(v, 1)  # per column of a 2-D weight
        self.squares = squares if self.squares is None else self.squares + squares

    def rows_numpy(self, out, lo: int, hi: int) -> None:
        import numpy as np

        wide = out.dtype.name
        delta = self.delta_numpy(out, lo, hi)
        m = values_numpy(self.module.factors["magnitude"], wide).reshape(-1)
        if self.whole:
            norms = np.sqrt(self.squares).astype(wide)
        else:
            v = self.base_numpy(lo, hi, wide)
            v += delta
            each = (-1, *[1] * (v.ndim - 1))  # one value per row
            m, norms = m[lo:hi].reshape(each), row_norms(v, wide).reshape(each)
        if not norms.all():
            raise CkptError(f"{self.module.name}: a {'column' if self.whole else 'row'} of W + s·ΔW is all zeros: "
                            f"DoRA's m/‖W + s·ΔW‖ has no value there")
        out += delta
        out *= m / norms

    def measure(self, out, lo: int, hi: int) -> None:
        import torch

        v = self.base(lo, hi).to(out.dtype) + self.delta(out, lo, hi)
        squares = v.to(torch.float64).square().sum(0)
        self.squares = squares if self.squares is None else self.squares + squares

    def rows(self, out, lo: int, hi: int) -> None:
        delta = self.delta(out, lo, hi)
        m = _values(self.module.factors["magnitude"]).to(out.dtype)
        if self.whole:
            norms = self.squares.sqrt().to(out.dtype)
        else:
            v = self.base(lo, hi).to(out.dtype) + delta
            norms = v.flatten(1).norm(dim=1) if v.numel() else v.new_zeros(hi - lo)
            each = (-1, *[1] * (v.dim() - 1))  # one value per row
            m, norms = m[lo:hi].view(each), norms.view(each)
        if not norms.all():
            raise CkptError(f"{self.module.name}: a {'column' if self.whole else 'row'} of W + s·ΔW is all zeros: "
                            f"DoRA's m/‖W + s·ΔW‖ has no value there")
        out.add_(delta).mul_(m / norms)


def check_dora_scale(where: str, module: Module, key: str, weight) -> None:
    """A LyCORIS dora_scale: one finite floating magnitude per output ([out, 1, …]) or per input
    ([1, in, …]) of the base weight."""
    m, shape = module.factors["dora_scale"], tuple(weight.shape)
    fits = len(shape) >= 2 and tuple(m.shape) in _axes(shape)
    if not fits or not m.dtype.floating:
        shown = " or ".join(str(list(s)) for s in _axes(shape)) if len(shape) >= 2 else "none"
        raise CkptError(f"{where}: dora_scale {list(m.shape)} {m.dtype.name} does not fit the base's {key} "
                        f"{list(shape)}: LyCORIS holds one floating magnitude per output or per input, {shown}")
    if not finite(m):
        raise CkptError(f"{where}: dora_scale holds NaN or infinite values; nothing was written")


def _axes(shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """dora_scale's two shapes for a weight of `shape`: per output (wd_on_out), per input."""
    ones = (1,) * (len(shape) - 2)
    return (shape[0], 1, *ones), (1, shape[1], *ones)


class Decomposed(Step):
    """LyCORIS's weight decomposition of W + s·ΔW (module docstring): `delta(lo, hi, out)` gives
    ΔW's rows without s; the norms per row (dora_scale [out, 1, …]) made with each chunk, or per
    input (dora_scale [1, in, …]) measured over every row first. `delta_numpy` (optional): the
    same rows as a new numpy array, for `rows_numpy` (the norms' squares summed in float64)."""

    def __init__(self, module: Module, delta, factor: float, multiplier: float, weight, delta_numpy=None):
        m = module.factors["dora_scale"]
        self.module, self.delta, self.factor, self.multiplier = module, delta, factor, multiplier
        self.delta_numpy = delta_numpy
        self.numpy = delta_numpy is not None and numpy_ready(m)
        self.whole = tuple(m.shape) != _axes(tuple(weight.shape))[0]
        self.squares = None  # per input: Σ V² over every other axis (float64)

    def measure_numpy(self, out, lo: int, hi: int) -> None:
        v = self.delta_numpy(lo, hi, out)
        v *= out.dtype.type(self.factor)
        v += out
        squares = square_sums(v, 1)  # per input
        self.squares = squares if self.squares is None else self.squares + squares

    def rows_numpy(self, out, lo: int, hi: int) -> None:
        import numpy as np

        wide = out.dtype.name
        delta = self.delta_numpy(lo, hi, out)
        delta *= out.dtype.type(self.factor)
        out += delta
        m = values_numpy(self.module.factors["dora_scale"], wide).reshape(-1)
        ones = [1] * (out.ndim - 2)
        if self.whole:
            norms = np.sqrt(self.squares).astype(wide).reshape(1, -1, *ones)
            m = m.reshape(1, -1, *ones)
        else:
            norms = row_norms(out, wide).reshape(-1, 1, *ones)
            m = m[lo:hi].reshape(-1, 1, *ones)
        scale = m / (norms + np.finfo(wide).eps)
        if self.multiplier != 1:
            scale = out.dtype.type(self.multiplier) * (scale - 1) + 1
        out *= scale

    def measure(self, out, lo: int, hi: int) -> None:
        import torch

        v = out + self.factor * self.delta(lo, hi, out)
        squares = v.to(torch.float64).square().transpose(0, 1).flatten(1).sum(1)
        self.squares = squares if self.squares is None else self.squares + squares

    def rows(self, out, lo: int, hi: int) -> None:
        import torch

        out.add_(self.delta(lo, hi, out), alpha=self.factor)
        m = _values(self.module.factors["dora_scale"]).to(out.dtype)
        ones = [1] * (out.dim() - 2)
        if self.whole:
            norms = self.squares.sqrt().to(out.dtype).view(1, -1, *ones)
            m = m.view(1, -1, *ones)
        else:
            norms = (out.flatten(1).norm(dim=1) if out.numel() else out.new_zeros(hi - lo)).view(-1, 1, *ones)
            m = m[lo:hi].view(-1, 1, *ones)
        scale = m / (norms + torch.finfo(out.dtype).eps)
        if self.multiplier != 1:
            scale = self.multiplier * (scale - 1) + 1
        out.mul_(scale)


def _values(t):
    from ...io.tensors import as_torch

    return as_torch(t).reshape(-1)


DORA = Dora()


def delta_steps(module: Module, rows, scale: float, weight, rows_numpy=None) -> list[tuple[str, Step]]:
    """The weight's step for a kind whose ΔW rows `rows(module, lo, hi, out)` makes (LoHa, LoKr):
    added, × its scale and the user's; or, with LyCORIS's `dora_scale`, decomposed (Decomposed).
    `rows_numpy`: the same in numpy, taken when every factor is a plain float (numpy_ready)."""
    delta = lambda lo, hi, out: rows(module, lo, hi, out)  # noqa: E731
    in_numpy = None
    if rows_numpy is not None and all(numpy_ready(t) for t in module.factors.values()):
        in_numpy = lambda lo, hi, out: rows_numpy(module, lo, hi, out)  # noqa: E731
    if "dora_scale" in module.factors:
        return [("weight", Decomposed(module, delta, module.scale, scale, weight, in_numpy))]
    return [("weight", Added(delta, scale * module.scale, in_numpy))]


class ProductKind(FoldKind):
    """A kind whose factors make ΔW as a product (LoHa's Hadamard, LoKr's Kronecker), with
    LyCORIS's `dora_scale` beside them or not: the check they share, around the kind's own —
    `complete` refuses a module without the factors it needs, `fits` says whether they make the
    base weight's shape."""

    label: str  # the kind in messages: "LoHa"

    @abstractmethod
    def complete(self, where: str, factors: dict) -> None:
        """Refuse a module that lacks a factor its kind needs."""

    @abstractmethod
    def fits(self, factors: dict, base: tuple[int, ...]) -> bool:
        """Whether the factors make a ΔW of the base weight's shape."""

    def check(self, where, module, key, weight, bias, square):
        f = module.factors
        self.complete(where, f)
        made_of = [n for n in self.factors if n != "dora_scale" and n in f]  # dora_scale: its own check
        if not all(f[n].dtype.floating for n in made_of):
            raise CkptError(f"{where}: {self.label} factors of dtype "
                            f"{', '.join(sorted({t.dtype.name for t in f.values()}))}; expected floating point")
        check_base_weight(where, key, weight, self.label)
        base = tuple(weight.shape)
        if not self.fits(f, base):
            shapes = ", ".join(f"{n} {list(f[n].shape)}" for n in made_of)
            raise CkptError(f"{where}: {self.label} factors {shapes} do not make the base's {key} {list(base)}; is "
                            f"this adapter for another model?")
        if "dora_scale" in f:
            check_dora_scale(where, module, key, weight)
        return Layout.CONV if len(base) > 2 else Layout.LINEAR
