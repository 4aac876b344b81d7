"""LoKr (peft's `peft_type: LOKR`): W' = W + S·s·ΔW with ΔW a Kronecker product, s = α/r — peft
scales every LoKr module by α/r, whichever of its factors are decomposed (LyCORIS files have a
rule of their own) — as peft's LoKr layers merge it (peft/tuners/lokr/layer.py,
`get_delta_weight`, `make_kron`):

    ΔW = w1 ⊗ w2        w1 [a, c], or w1_a [a, r]·w1_b [r, c]
                        w2 [b, d…], or w2_a [b, r]·w2_b [r, d·k…], or with use_effective_conv2d
                        rebuild(t2 [r, r, k…], w2_a [r, b], w2_b [r, d]) = [b, d, k…]

reshaped to the base weight [a·b, c·d…] (a Linear, a Conv2d or a Conv1d). A row chunk of
ΔW is made row by row: row b·i + j of w1 ⊗ w2 is w1[i] ⊗ w2[j], from those rows of each side
alone (a file's factors cannot make a chunk cost more than its rows) — except peft's Conv1d's
whole 3-D w2, which torch.kron lays out otherwise and which is made whole for each chunk
(LyCORIS's make_kron gives w1 w2's dims first, so its Conv1d's is laid out row by row). Plain
float factors make ΔW in numpy (`delta_rows_numpy`: the same float32 products, np.kron for that
Conv1d), so that such a fold needs no torch.

LyCORIS files (kohya.py) scale a module by α/r, r the rank of its decomposed side (w1_b's, else
w2_b's first axis), and by 1 when neither side is decomposed, whatever α says (LyCORIS's
LokrModule: `if use_w1 and use_w2: alpha = lora_dim`). Its entry in read.KINDS; peft.py
reads `lokr_w1` … `lokr_t2` into Module.factors as "w1" … "t2"."""

from __future__ import annotations

import math

from ...errors import CkptError
from .kind_dora import ProductKind, delta_steps
from .kinds import AdapterKind, Module, Step, matmul_rows, raw_rows, values_numpy, widen


class Lokr(ProductKind):
    name = AdapterKind.LOKR
    label = "LoKr"
    # w1 or w1_a·w1_b; w2, w2_a·w2_b or with t2; dora_scale: LyCORIS's weight decomposition
    factors = ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2", "dora_scale")

    def complete(self, where, f):
        for form, side in zip(_forms(f), ("w1", "w2")):
            if form is None:
                held = ", ".join(f"lokr_{n}" for n in self.factors if n in f and n.startswith(side)) or "nothing"
                raise CkptError(f"{where}: its LoKr {side} is {held}; peft saves lokr_{side} or lokr_{side}_a and "
                                f"_{side}_b{' (and lokr_t2 for an effective conv)' if side == 'w2' else ''}")

    def fits(self, f, base):
        w1, w2 = (_made(f, form) for form in _forms(f))
        return w1 is not None and w2 is not None and len(w1) == 2 and _fits(w1, w2, base)

    def steps(self, module, layout, scale, weight) -> list[tuple[str, Step]]:
        return delta_steps(module, delta_rows, scale, weight, delta_rows_numpy)  # dora_scale: LyCORIS's


def _forms(f: dict) -> list[tuple[str, ...] | None]:
    """The factors that make w1 and those that make w2 (None for a side they do not make)."""
    return [_form(f, "w1", ()), _form(f, "w2", ("t2",))]


def _form(f: dict, side: str, cores: tuple[str, ...]) -> tuple[str, ...] | None:
    """Which factors make one side: (side,) whole, or (side_a, side_b[, core]) — exactly one."""
    whole, parts = side in f, (f"{side}_a" in f, f"{side}_b" in f)
    core = tuple(c for c in cores if c in f)
    if whole and not any(parts) and not core:
        return (side,)
    if not whole and all(parts):
        return (f"{side}_a", f"{side}_b", *core)
    return None


def _made(f: dict, form: tuple[str, ...]) -> tuple[int, ...] | None:
    """The shape a side's factors make, or None when they do not fit together."""
    if len(form) == 1:
        return tuple(f[form[0]].shape)
    wa, wb = tuple(f[form[0]].shape), tuple(f[form[1]].shape)
    if len(wa) != 2 or len(wb) != 2 or wa[1 if len(form) == 2 else 0] != wb[0]:
        return None
    if len(form) == 2:
        return (wa[0], wb[1])
    core = tuple(f[form[2]].shape)
    return (wa[1], wb[1], *core[2:]) if len(core) >= 3 and core[:2] == (wa[0], wb[0]) else None


def _fits(w1: tuple[int, ...], w2: tuple[int, ...], base: tuple[int, ...]) -> bool:
    """peft reshapes w1 ⊗ w2 to the base weight: [a·b, c·(what w2 holds per row)], or with a 4-D
    w2 [b, d, k, l] the conv [a·b, c·d, k, l] ([a·b, c·d, k] for a Conv1d's, l = 1)."""
    if len(w2) < 2 or not base or base[0] != w1[0] * w2[0]:
        return False
    if len(w2) == 4:
        made = (w1[0] * w2[0], w1[1] * w2[1], *w2[2:])
        return made == base or (made[-1] == 1 and made[:-1] == base)
    if len(w2) == 3:
        return base == (w1[0] * w2[0], w1[1] * w2[1], w2[2])
    return len(w2) == 2 and len(base) >= 2 and w1[1] * w2[1] == math.prod(base[1:])


def _side(module: Module, side: str, wide, rows=None):
    """One side of the product, w1 or w2 — only its `rows` (a tensor of row indices) when given, so
    that a chunk of ΔW costs no more than its own rows, however the factors are shaped."""
    import torch

    from ...io.tensors import as_torch

    f = module.factors
    if side in f:
        whole = as_torch(f[side])
        return (whole if rows is None else whole[rows]).to(wide)
    wa, wb = as_torch(f[f"{side}_a"]), as_torch(f[f"{side}_b"]).to(wide)
    if side == "w2" and "t2" in f:  # peft's make_weight_cp: [b, d, k…] = Σ t[i, j, k…] wa[i, p] wb[j, r]
        wa = (wa if rows is None else wa[:, rows]).to(wide)
        return torch.einsum("ij...,ip,jr->pr...", as_torch(f["t2"]).to(wide), wa, wb)
    return (wa if rows is None else wa[rows]).to(wide) @ wb


def delta_rows(module: Module, lo: int, hi: int, out):
    """Rows [lo, hi) of w1 ⊗ w2 (without its scale), shaped and typed as `out`."""
    import torch

    f = module.factors
    w2_rows = f["w2"].shape[0] if "w2" in f else f["w2_a"].shape[1 if "t2" in f else 0]
    if "w2" in f and len(f["w2"].shape) == 3 and not module.lycoris:  # peft's Conv1d whole w2 [b, d, k]:
        # torch.kron takes w1 as [1, a, c], so peft's ΔW is kron(w1, w2) [b, a·d, c·k] laid out again
        w1, w2 = _side(module, "w1", out.dtype), _side(module, "w2", out.dtype)  # as [a·b, c·d, k], made whole
        row = out[0].numel()
        return torch.kron(w1, w2).reshape(-1)[lo * row:hi * row].reshape(out.shape)
    rows = torch.arange(lo, hi)
    left = _side(module, "w1", out.dtype, rows // w2_rows)  # [rows, c]
    right = _side(module, "w2", out.dtype, rows % w2_rows)  # [rows, d…]
    product = left.view(*left.shape, *[1] * (right.dim() - 1)) * right.unsqueeze(1)  # [rows, c, d…]
    return product.reshape(hi - lo, left.shape[1] * right.shape[1], *right.shape[2:]).reshape(out.shape)


def _side_numpy(module: Module, side: str, wide: str, rows=None):
    """`_side` in numpy for plain float factors (`rows` a numpy array of row indices)."""
    import numpy as np

    f = module.factors

    def raw(name: str):
        return raw_rows(f[name]).reshape(f[name].shape)

    if side in f:
        whole = raw(side)
        return widen(whole if rows is None else whole[rows], f[side].dtype.name, wide)
    a, b = f"{side}_a", f"{side}_b"
    wb = values_numpy(f[b], wide)
    if side == "w2" and "t2" in f:  # [b, d, k…] = Σ t[i, j, k…] wa[i, p] wb[j, r]
        wa = widen(raw(a) if rows is None else raw(a)[:, rows], f[a].dtype.name, wide)
        return np.einsum("ij...,ip,jr->pr...", values_numpy(f["t2"], wide), wa, wb, optimize=True)
    return matmul_rows(widen(raw(a) if rows is None else raw(a)[rows], f[a].dtype.name, wide), wb)


def delta_rows_numpy(module: Module, lo: int, hi: int, out):
    """`delta_rows` in numpy for plain float factors: a new array shaped and typed as `out`."""
    import numpy as np

    f, wide = module.factors, out.dtype.name
    w2_rows = f["w2"].shape[0] if "w2" in f else f["w2_a"].shape[1 if "t2" in f else 0]
    if "w2" in f and len(f["w2"].shape) == 3 and not module.lycoris:  # peft's Conv1d whole w2: as torch.kron
        row = math.prod(out.shape[1:])
        whole = np.kron(_side_numpy(module, "w1", wide), _side_numpy(module, "w2", wide))
        return whole.reshape(-1)[lo * row:hi * row].reshape(out.shape).copy()
    rows = np.arange(lo, hi)
    left = _side_numpy(module, "w1", wide, rows // w2_rows)  # [rows, c]
    right = _side_numpy(module, "w2", wide, rows % w2_rows)  # [rows, d…]
    product = left.reshape(*left.shape, *[1] * (right.ndim - 1)) * right[:, None]  # [rows, c, d…]
    return product.reshape(hi - lo, left.shape[1] * right.shape[1], *right.shape[2:]).reshape(out.shape)


LOKR = Lokr()
