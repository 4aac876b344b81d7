"""LoRA: W' = W + S·s·ΔW, ΔW = B·A laid out by the module's `Layout` — what peft's
`get_delta_weight` computes for Linear, Embedding and ConvNd (its conv form, conv(Aᵀ, B)ᵀ, is the
same sum over r) and kohya's lora_up·lora_down. s = α/r (α/√r with rsLoRA), S the user's
--lora-scale; a peft `lora_bias` adds S·s·bias_B to the base's bias. A LyCORIS LoCon with a Tucker
core (`lora_mid`, a conv's use_tucker) is LoRA with a core between its factors, as LyCORIS's
locon `diff_weight` rebuilds it:

    ΔW[o, i, k…] = Σ up[o, p]·mid[p, q, k…]·down[q, i]     up [out, r, 1…], mid [r, r, k…], down [r, in, 1…]

(`Module.factors["mid"]`). Its entry in read.KINDS."""

from __future__ import annotations

import math

from ...errors import CkptError
from ...io import TensorRef
from .kinds import (FLAT, TRANSPOSED, Added, AdapterKind, FoldKind, Layout, Module, Step, check_base_weight,
                    matmul_rows, numpy_ready, raw_rows, values_numpy, widen)


def delta_rows(module: Module, layout: Layout, lo: int, hi: int, shape: tuple[int, ...], wide):
    """Rows [lo, hi) of ΔW (without its scale) for a base weight of `shape`, in dtype `wide`:
    a stored row of W is an output of a linear or conv weight, an input of a linear-t one, a
    token of an embedding."""
    from ...io.tensors import as_torch

    a = as_torch(module.a)
    b = as_torch(module.b)
    if "mid" in module.factors:  # LoCon's Tucker core: Σ up[o, p] mid[p, q, k…] down[q, i]
        import torch

        mid = as_torch(module.factors["mid"]).to(wide)
        return torch.einsum("pq...,op,qi->oi...", mid, b[lo:hi].flatten(1).to(wide), a.flatten(1).to(wide))
    if layout in TRANSPOSED:  # ΔW = (B·A)ᵀ: its rows are A's columns
        return a[:, lo:hi].to(wide).T @ b.to(wide).T
    if layout == Layout.CONV or a.dim() != 2 or b.dim() != 2:
        return (b[lo:hi].flatten(1).to(wide) @ a.flatten(1).to(wide)).reshape(hi - lo, *shape[1:])
    return b[lo:hi].to(wide) @ a.to(wide)


def delta_rows_numpy(module: Module, layout: Layout, lo: int, hi: int, shape: tuple[int, ...], wide: str):
    """`delta_rows` in numpy (a new `wide` array, float32 or float64) for a module whose factors
    are numpy_ready: the same products, made a block of rows at a time (kinds.matmul_rows: one
    thin product left whole is split across BLAS threads at a cost), a LoCon's Tucker core too."""
    import numpy as np

    a, b = raw_rows(module.a).reshape(module.a.shape), raw_rows(module.b).reshape(module.b.shape)
    da, db = module.a.dtype.name, module.b.dtype.name
    if "mid" in module.factors:  # Σ up[o, p] mid[p, q, k…] down[q, i]
        mid = values_numpy(module.factors["mid"], wide)
        up, down = widen(b[lo:hi].reshape(hi - lo, -1), db, wide), values_numpy(module.a, wide).reshape(a.shape[0], -1)
        return np.einsum("pq...,op,qi->oi...", mid, up, down, optimize=True)
    if layout in TRANSPOSED:  # ΔW = (B·A)ᵀ: its rows are A's columns
        return matmul_rows(widen(a[:, lo:hi], da, wide).T, widen(b, db, wide).T)
    flat_b, flat_a = b[lo:hi].reshape(hi - lo, -1), a.reshape(a.shape[0], -1)
    return matmul_rows(widen(flat_b, db, wide), widen(flat_a, da, wide)).reshape(hi - lo, *shape[1:])


def check_factors(where: str, module: Module, key: str, base: TensorRef, square: Layout | None) -> Layout:
    """A and B must make exactly the base weight's shape, checked before anything is written.
    Returns the layout that makes it (linear or linear-t decided by the shape where it can)."""
    a, b = tuple(module.a.shape), tuple(module.b.shape)
    if not (module.a.dtype.floating and module.b.dtype.floating):
        raise CkptError(f"{where}: LoRA factors of dtype {module.a.dtype.name}/{module.b.dtype.name}; "
                        f"expected floating point")
    check_base_weight(where, key, base, "a LoRA")
    if len(a) < 2 or len(b) < 2 or b[1] != a[0]:
        grouped = " (a grouped conv? peft cannot merge those either)" if len(b) > 2 else ""
        raise CkptError(f"{where}: lora_B {list(b)} does not follow lora_A {list(a)}{grouped}")
    made, layout = None, module.layout
    if layout in FLAT and len(a) == len(b) == 2:
        # peft transposes for transformers' Conv1D ([in, out]) and never for nn.Linear, whatever
        # fan_in_fan_out says: the base's shape tells which, except for a square weight
        if a[1] != b[0]:
            layout = Layout.LINEAR_T if tuple(base.shape) == (a[1], b[0]) else Layout.LINEAR
        elif square:
            layout = square
    if layout in TRANSPOSED:
        made = (a[1], b[0]) if len(a) == len(b) == 2 else None
    elif len(a) == len(b) == 2:
        made = (b[0], a[1])
    elif all(s == 1 for s in b[2:]):  # conv: B [out, r, 1…], A [r, in, k…]
        made = (b[0], *a[1:])
        # kohya's 1×1 conv factors on a linear weight, or linear factors on a 1×1 conv
        if made != tuple(base.shape) and base.shape and base.shape[0] == b[0] and math.prod(made) == base.numel \
                and all(s == 1 for s in (*made[2:], *base.shape[2:])):
            made = tuple(base.shape)
    if made != tuple(base.shape):
        raise CkptError(f"{where}: factors A {list(a)}, B {list(b)} do not make the base's {key} "
                        f"{list(base.shape)}; is this adapter for another model?")
    return layout


def check_tucker(where: str, module: Module, key: str, base: TensorRef) -> Layout:
    """A LoCon's down [r, in, 1…], mid [r, r, k…] and up [out, r, 1…] must make the base conv
    weight [out, in, k…]."""
    a, b, mid = (module.a, module.b, module.factors["mid"])
    if not all(t.dtype.floating for t in (a, b, mid)):
        raise CkptError(f"{where}: LoCon factors of dtype {a.dtype.name}/{mid.dtype.name}/{b.dtype.name}; "
                        f"expected floating point")
    check_base_weight(where, key, base, "a LoRA")
    sa, sb, sm = tuple(a.shape), tuple(b.shape), tuple(mid.shape)
    made = None
    if len(sa) == len(sb) == len(sm) >= 3 and all(s == 1 for s in (*sa[2:], *sb[2:])) and sm[:2] == (sb[1], sa[0]):
        made = (sb[0], sa[1], *sm[2:])
    if made != tuple(base.shape):
        raise CkptError(f"{where}: factors lora_down {list(sa)}, lora_mid {list(sm)}, lora_up {list(sb)} do not "
                        f"make the base's {key} {list(base.shape)}; is this adapter for another model?")
    return Layout.CONV


class Lora(FoldKind):
    name = AdapterKind.LORA
    factors = ("a", "b", "mid")  # mid: a LyCORIS LoCon's Tucker core

    def check(self, where, module, key, weight, bias, square):
        if "mid" in module.factors:
            return check_tucker(where, module, key, weight)
        layout = check_factors(where, module, key, weight, square)
        if module.bias is not None and (bias is None or bias.shape != module.bias.shape
                                        or not bias.dtype.floating):
            raise CkptError(f"{where} has a LoRA bias (lora_bias) but the base has no matching floating "
                            f"{key[: -len('weight')]}bias")
        return layout

    def orientation(self, module, weight):
        a, b = module.a.shape, module.b.shape
        if module.layout not in FLAT or len(a) != 2 or len(b) != 2 or a[1] == b[0]:
            return None
        return {(b[0], a[1]): Layout.LINEAR, (a[1], b[0]): Layout.LINEAR_T}.get(tuple(weight.shape))

    def steps(self, module, layout, scale, weight) -> list[tuple[str, Step]]:
        factor = scale * module.scale
        numpy = all(numpy_ready(t) for t in (module.a, module.b, *module.factors.values()))
        steps = [("weight", Added(lambda lo, hi, out: delta_rows(module, layout, lo, hi, out.shape, out.dtype),
                                  factor, (lambda lo, hi, out: delta_rows_numpy(module, layout, lo, hi, out.shape,
                                                                                out.dtype.name)) if numpy else None))]
        if module.bias is not None:
            bias = module.bias
            steps.append(("bias", Added(lambda lo, hi, out: _rows(bias, lo, hi).to(out.dtype), factor,
                                        (lambda lo, hi, out: widen(raw_rows(bias)[lo:hi], bias.dtype.name,
                                                                   out.dtype.name).copy())
                                        if numpy_ready(bias) else None)))
        return steps


def _rows(t: TensorRef, lo: int, hi: int):
    from ...io.tensors import as_torch

    return as_torch(t)[lo:hi]


LORA = Lora()
