"""Full (LyCORIS's `full` algorithm, a kohya/LyCORIS file's `diff` and `diff_b`): the whole
difference of a weight, and of its bias, trained or taken from two checkpoints:

    W' = W + S·diff,   b' = b + S·diff_b

as LyCORIS's FullModule applies it (its forward and merge alike: `add_scaled(W, diff, S)`); no α,
no rank, S the user's --lora-scale. A `diff_b` where the base has no bias is refused, never
dropped. Its entry in read.KINDS; kohya.py reads `diff`, `diff_b` into Module.factors."""

from __future__ import annotations

from ...errors import CkptError
from .kinds import Added, AdapterKind, FoldKind, Layout, Step, check_base_weight, row_reader


class Full(FoldKind):
    name = AdapterKind.FULL
    factors = ("diff", "diff_b")

    def check(self, where, module, key, weight, bias, square):
        f = module.factors
        if "diff" not in f:
            raise CkptError(f"{where}: a diff_b without a diff; LyCORIS's full modules hold both (or diff alone)")
        check_base_weight(where, key, weight, "a diff")
        bias_key = key[: -len("weight")] + "bias"
        for name, target, target_key in (("diff", weight, key), ("diff_b", bias, bias_key)):
            t = f.get(name)
            if t is None:
                continue
            if target is None:
                raise CkptError(f"{where}: a diff_b {list(t.shape)} but the base has no {bias_key} to add it to")
            if tuple(t.shape) != tuple(target.shape) or not t.dtype.floating or not target.dtype.floating:
                raise CkptError(f"{where}: {name} {list(t.shape)} {t.dtype.name} does not fit the base's {target_key} "
                                f"{list(target.shape)} {target.dtype.name}; is this adapter for another model?")
        return Layout.CONV if len(weight.shape) > 2 else Layout.LINEAR

    def steps(self, module, layout, scale, weight) -> list[tuple[str, Step]]:
        steps = [("weight", Added(_rows(module.factors["diff"]), scale * module.scale))]
        if "diff_b" in module.factors:
            steps.append(("bias", Added(_rows(module.factors["diff_b"]), scale * module.scale)))
        return steps


def _rows(t):
    read = row_reader(t)
    return lambda lo, hi, out: read(lo, hi).to(out.dtype).reshape(out.shape)


FULL = Full()
