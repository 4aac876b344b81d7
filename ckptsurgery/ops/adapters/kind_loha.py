"""LoHa (peft's `peft_type: LOHA`): W' = W + S·s·ΔW with ΔW the Hadamard product of two
low-rank products, s = α/r, as peft's LoHa layers merge it (peft/tuners/loha/layer.py,
`get_delta_weight`) and LyCORIS's LohaModule's forward does (a kohya/LyCORIS file's `hada_*`; with a
`dora_scale`, kind_dora.Decomposed):

    ΔW = (w1_a·w1_b) ⊙ (w2_a·w2_b)                 w1_a, w2_a [out, r], w1_b, w2_b [r, in·k…]
    ΔW = rebuild(t1, w1_a, w1_b) ⊙ rebuild(t2, …)  a conv with use_effective_conv2d: t [r, r, k…],
                                                   w_a [r, out], w_b [r, in], rebuild = Σ t·w_b·w_a

reshaped to the base weight (a Linear, a Conv2d or a Conv1d). Plain float factors make ΔW in
numpy (`delta_rows_numpy`: the same float32 products), so that such a fold needs no torch. Its
entry in read.KINDS; peft.py reads `hada_w1_a` … `hada_t2` into Module.factors as "w1_a" … "t2"."""

from __future__ import annotations

import math

from ...errors import CkptError
from .kind_dora import ProductKind, delta_steps
from .kinds import AdapterKind, Module, Step, matmul_rows, raw_rows, values_numpy, widen

PAIRS = (("w1_a", "w1_b", "t1"), ("w2_a", "w2_b", "t2"))


class Loha(ProductKind):
    name = AdapterKind.LOHA
    label = "LoHa"
    # t1, t2: a conv's, with use_effective_conv2d only; dora_scale: LyCORIS's weight decomposition
    factors = ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2", "dora_scale")

    def complete(self, where, f):
        cores = ("t1", "t2") if f.keys() & {"t1", "t2"} else ()  # both or neither
        missing = [n for n in (*self.factors[:4], *cores) if n not in f]  # dora_scale: its own check
        if missing:
            raise CkptError(f"{where}: a LoHa module without hada_{missing[0]}; peft saves hada_w1_a, _w1_b, _w2_a "
                            f"and _w2_b (and hada_t1, _t2 for an effective conv)")

    def fits(self, f, base):
        made = [_made(f, *pair) for pair in PAIRS]
        return made[0] is not None and made[0] == made[1] and _fits(made[0], base, "t1" in f)

    def steps(self, module, layout, scale, weight) -> list[tuple[str, Step]]:
        return delta_steps(module, delta_rows, scale, weight, delta_rows_numpy)  # dora_scale: LyCORIS's


def _made(f: dict, a: str, b: str, t: str) -> tuple[int, ...] | None:
    """The shape one pair of factors makes: (out, in·k…) or, with its Tucker core t, (out, in, k…)."""
    wa, wb = tuple(f[a].shape), tuple(f[b].shape)
    if len(wa) != 2 or len(wb) != 2:
        return None
    if t not in f:
        return (wa[0], wb[1]) if wa[1] == wb[0] else None
    core = tuple(f[t].shape)
    if len(core) < 3 or core[:2] != (wa[0], wb[0]):
        return None
    return (wa[1], wb[1], *core[2:])


def _fits(made: tuple[int, ...], base: tuple[int, ...], tucker: bool) -> bool:
    """peft reshapes ΔW to the base weight: a Linear's [out, in], a conv's [out, in, k…] from
    [out, in·k…] — or, with a core, [out, in, k, 1] for a Conv1d's [out, in, k]."""
    if not base or made[0] != base[0]:
        return False
    if tucker:
        return made == base or (made[-1] == 1 and made[:-1] == base)
    return len(base) >= 2 and made[1] == math.prod(base[1:])


def delta_rows(module: Module, lo: int, hi: int, out):
    """Rows [lo, hi) of ΔW (without its scale), shaped and typed as `out`."""
    import torch

    from ...io.tensors import as_torch

    f, wide = module.factors, out.dtype
    halves = []
    for a, b, t in PAIRS:
        wa, wb = as_torch(f[a]).to(wide), as_torch(f[b]).to(wide)
        if t in f:  # peft's make_weight_cp: rebuild[p, r, k…] = Σ t[i, j, k…] wb[j, r] wa[i, p]
            halves.append(torch.einsum("ij...,jr,ip->pr...", as_torch(f[t]).to(wide), wb, wa[:, lo:hi]))
        else:
            halves.append(wa[lo:hi] @ wb)
    return (halves[0] * halves[1]).reshape(out.shape)


def delta_rows_numpy(module: Module, lo: int, hi: int, out):
    """`delta_rows` in numpy for plain float factors: a new array shaped and typed as `out`."""
    import numpy as np

    f, wide = module.factors, out.dtype.name
    if "t1" not in f:  # (w1_a·w1_b) ⊙ (w2_a·w2_b), a block of rows at a time
        rows = [(widen(raw_rows(f[a])[lo:hi], f[a].dtype.name, wide), values_numpy(f[b], wide)) for a, b, _ in PAIRS]
        return matmul_rows(*rows[0], times=rows[1]).reshape(out.shape)
    halves = []
    for a, b, t in PAIRS:  # rebuild[p, r, k…] = Σ t[i, j, k…] wb[j, r] wa[i, p]
        wa = widen(raw_rows(f[a]).reshape(f[a].shape)[:, lo:hi], f[a].dtype.name, wide)
        halves.append(np.einsum("ij...,jr,ip->pr...", values_numpy(f[t], wide), values_numpy(f[b], wide), wa,
                                optimize=True))
    product = np.multiply(halves[0], halves[1], out=halves[0])  # a new array of ours: no third chunk
    return product.reshape(out.shape)


LOHA = Loha()
