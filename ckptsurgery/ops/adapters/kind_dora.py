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
Module.factors["magnitude"]."""

from __future__ import annotations

from ...errors import CkptError
from .kind_lora import Lora, check_factors, delta_rows
from .kinds import TRANSPOSED, AdapterKind, Layout, Module, Step, row_reader


class Dora(Lora):  # LoRA's factors, their check and orientation; its own steps
    name = AdapterKind.DORA
    factors = ("a", "b", "magnitude")

    def check(self, where, module, key, weight, bias, square):
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
        if not _values(m).isfinite().all():
            raise CkptError(f"{where}: lora_magnitude_vector holds NaN or infinite values; nothing was written")
        return layout

    def steps(self, module, layout, scale, weight) -> list[tuple[str, Step]]:
        return [("weight", Rescaled(module, layout, scale * module.scale, weight))]


class Rescaled(Step):
    """W's rows → m / ‖W₀ + factor·ΔW‖ ⊙ (W + factor·ΔW): the norms per row (a row is an
    output), or per column, measured over every row first."""

    def __init__(self, module: Module, layout: Layout, factor: float, weight):
        self.module, self.layout, self.factor = module, layout, factor
        self.base = row_reader(weight)  # W₀: the norms are the base's, whatever was folded before
        self.whole = layout in TRANSPOSED
        self.squares = None  # per column: Σ (W₀ + factor·ΔW)² over the rows measured (float64)

    def delta(self, out, lo: int, hi: int):
        return self.factor * delta_rows(self.module, self.layout, lo, hi, out.shape, out.dtype)

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


def _values(t):
    from ...io.tensors import as_torch

    return as_torch(t).reshape(-1)


DORA = Dora()
