"""DoRA (peft's `use_dora`): LoRA's ΔW, then each output's row of the weight rescaled to a
learned magnitude m:

    W' = m ⊙ V / ‖V‖,   V = W + S·s·ΔW,   ‖V‖ the norm of each output's weights

as peft's DoRA variants merge it (peft/tuners/lora/variants.py, dora.py): an output is a row of
a Linear's or a conv's weight (the norm over its inputs and kernel), a column of a
fan_in_fan_out weight ([in, out], transformers' Conv1D) and of an Embedding's ([vocab, dim]: one
magnitude per embedding dimension). A row's norm is made with that row chunk; a column's needs
every row first (Step.whole). S, the user's --lora-scale, scales ΔW inside the norm, as peft's
scaling does. Its entry in read.KINDS; peft.py reads `lora_magnitude_vector` into
Module.factors["magnitude"]."""

from __future__ import annotations

from ...errors import CkptError
from .kind_lora import Lora, check_factors, delta_rows
from .kinds import TRANSPOSED, AdapterKind, Layout, Module, Step


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
        return [("weight", Rescaled(module, layout, scale * module.scale))]


class Rescaled(Step):
    """W's rows → m ⊙ V / ‖V‖, V = W + factor·ΔW: per row (a row is an output), or per column
    with the columns' norms measured over every row first."""

    def __init__(self, module: Module, layout: Layout, factor: float):
        self.module, self.layout, self.factor = module, layout, factor
        self.whole = layout in TRANSPOSED
        self.squares = None  # per column: Σ V² over the rows measured (float64)

    def updated(self, out, lo: int, hi: int):
        return out + self.factor * delta_rows(self.module, self.layout, lo, hi, out.shape, out.dtype)

    def measure(self, out, lo: int, hi: int) -> None:
        import torch

        squares = self.updated(out, lo, hi).to(torch.float64).square().sum(0)
        self.squares = squares if self.squares is None else self.squares + squares

    def rows(self, out, lo: int, hi: int) -> None:
        v = self.updated(out, lo, hi)
        m = _values(self.module.factors["magnitude"]).to(out.dtype)
        if self.whole:
            norms = self.squares.sqrt().to(out.dtype)
        else:
            m = m[lo:hi]
            norms = v.flatten(1).norm(dim=1) if v.numel() else v.new_zeros(hi - lo)
            each = (-1, *[1] * (v.dim() - 1))  # one value per row
            m, norms = m.view(each), norms.view(each)
        if not norms.all():
            raise CkptError(f"{self.module.name}: a {'column' if self.whole else 'row'} of W + s·ΔW is all zeros: "
                            f"DoRA's m/‖W + s·ΔW‖ has no value there")
        out.copy_(v * (m / norms))


def _values(t):
    from ...io.tensors import as_torch

    return as_torch(t).reshape(-1)


DORA = Dora()
