"""IA3 (peft's `peft_type: IA3`): a learned vector l multiplies the layer's outputs — each row
of a Linear's or conv's weight and its bias — or, for the modules `feedforward_modules` names,
its inputs — each column of a Linear's weight, each input channel of a conv's (for a grouped
conv, the channels of each group), the bias untouched. A transformers Conv1D weight is stored
[in, out], so there the two swap: outputs are columns, inputs rows. As peft's IA3 layers merge
(peft/tuners/ia3/layer.py): W' = W ⊙ l, b' = b ⊙ l. A vector has no scale: --lora-scale must
be 1. Its entry in read.KINDS; peft.py reads `ia3_l` into Module.factors["vector"]. A plain
float vector multiplies in numpy too (`Multiplied.rows_numpy`, the same float products), so a
fold of it needs no torch."""

from __future__ import annotations

from ...errors import CkptError, UsageError
from .kinds import AdapterKind, FoldKind, Layout, Module, Step, check_base_weight, numpy_ready, raw_rows, widen


class Ia3(FoldKind):
    name = AdapterKind.IA3
    factors = ("vector",)

    def orientation(self, module, weight):
        rows, columns = weight.shape if len(weight.shape) == 2 else (0, 0)
        n = module.factors["vector"].numel
        if rows == columns or n not in (rows, columns):
            return None
        scales_rows = n == rows  # outputs of nn.Linear, or inputs of a Conv1D
        return Layout.LINEAR if scales_rows != module.feedforward else Layout.LINEAR_T

    def check(self, where, module, key, weight, bias, square):
        v = module.factors["vector"]
        check_base_weight(where, key, weight, "IA3")
        layout = self.orientation(module, weight) or square or Layout.LINEAR
        if len(weight.shape) > 2:
            layout = Layout.CONV
        scaled = self.scaled(module, weight, layout)
        want = _shape(module, weight, layout, scaled)
        if tuple(v.shape) != want or not v.dtype.floating:
            side = "input" if module.feedforward else "output"
            raise CkptError(f"{where}: ia3_l {list(v.shape)} {v.dtype.name} does not fit the base's {key} "
                            f"{list(weight.shape)}: IA3 holds one floating value per {side} of the layer, "
                            f"shaped {list(want)}")
        if not _finite(v):
            raise CkptError(f"{where}: ia3_l holds NaN or infinite values; nothing was written")
        if bias is not None and not module.feedforward and (tuple(bias.shape) != (v.numel,) or not bias.dtype.floating):
            raise CkptError(f"{where}: ia3_l scales the base's {key[: -len('weight')]}bias too, but that is "
                            f"{list(bias.shape)} {bias.dtype.name}")
        return layout

    @staticmethod
    def scaled(module: Module, weight, layout: Layout) -> int:
        """How many values the vector holds: the layer's outputs, or its inputs (a grouped
        conv's: its groups times the inputs each sees)."""
        shape = weight.shape
        if len(shape) < 2:
            return -1
        if layout == Layout.CONV and module.feedforward:
            n = module.factors["vector"].numel
            groups = n // shape[1] if shape[1] and n % shape[1] == 0 else 0
            return n if groups and shape[0] % groups == 0 else shape[1]
        return shape[1] if (layout == Layout.LINEAR_T) != module.feedforward else shape[0]

    def steps(self, module, layout, scale, weight) -> list[tuple[str, Step]]:
        if scale != 1:
            raise UsageError(f"--lora-scale {scale:g} for an IA3 adapter ({module.name}): IA3 multiplies the "
                             f"weights by learned vectors, which have no scale; give 1 for it")
        rows = (layout == Layout.LINEAR_T) == module.feedforward  # the vector runs along W's rows
        grouped = layout == Layout.CONV and module.feedforward and module.factors["vector"].numel != weight.shape[1]
        steps = [("weight", Multiplied(module, rows, weight.shape[0] if grouped else 0))]
        if not module.feedforward:
            steps.append(("bias", Multiplied(module, rows=True)))  # when the base has one
        return steps


def _shape(module: Module, weight, layout: Layout, n: int) -> tuple[int, ...]:
    """The vector's shape as peft makes it: [n, 1] for outputs, [1, n] for inputs (a Conv1D's
    too: peft transposes it when it merges), [1, n, 1…] for a conv."""
    if layout == Layout.CONV:
        return (1, n, *[1] * (len(weight.shape) - 2))
    return (1, n) if module.feedforward else (n, 1)


class Multiplied(Step):
    """W's rows times the vector: one value per row (`rows`), per column, or — a grouped conv's
    inputs — per input channel of the row's group."""

    def __init__(self, module: Module, rows: bool, outputs: int = 0):
        self.module, self.along_rows, self.outputs = module, rows, outputs  # outputs: a grouped conv's
        self.numpy = numpy_ready(module.factors["vector"])

    def rows(self, out, lo: int, hi: int) -> None:
        import torch

        v = _values(self.module.factors["vector"]).to(out.dtype)
        if self.along_rows:
            out.mul_(v[lo:hi].view(-1, *[1] * (out.dim() - 1)))
        elif self.outputs:  # conv [out, in/groups, k…]: output channel o sees group o // (out/groups)
            groups = v.numel() // out.shape[1]
            each = v.view(groups, out.shape[1])[torch.arange(lo, hi) // (self.outputs // groups)]
            out.mul_(each.view(*each.shape, *[1] * (out.dim() - 2)))
        else:
            out.mul_(v.view(1, -1, *[1] * (out.dim() - 2)))

    def rows_numpy(self, out, lo: int, hi: int) -> None:
        import numpy as np

        t = self.module.factors["vector"]
        v = widen(raw_rows(t).reshape(-1), t.dtype.name, out.dtype.name)  # exactly, as torch's .to
        if self.along_rows:
            out *= v[lo:hi].reshape(-1, *[1] * (out.ndim - 1))
        elif self.outputs:
            groups = v.size // out.shape[1]
            each = v.reshape(groups, out.shape[1])[np.arange(lo, hi) // (self.outputs // groups)]
            out *= each.reshape(*each.shape, *[1] * (out.ndim - 2))
        else:
            out *= v.reshape(1, -1, *[1] * (out.ndim - 2))


def _finite(t) -> bool:
    """Whether every value of the vector `t` is finite (in numpy when it can: no torch)."""
    if numpy_ready(t):
        import numpy as np

        return bool(np.isfinite(widen(raw_rows(t).reshape(-1), t.dtype.name, "float64")).all())
    return bool(_values(t).isfinite().all())


def _values(t):
    from ...io.tensors import as_torch

    return as_torch(t).reshape(-1)


IA3 = Ia3()
