"""The kohya adapter format: one .safetensors file of `lora_unet_…` / `lora_te_…` (`lora_te1_`,
`lora_te2_`) modules, each with lora_down.weight, lora_up.weight and an optional alpha, as
kohya's sd-scripts write them for Stable Diffusion — its reader, and how its underscore module
names meet a base's dotted keys. Its entry in the table of formats is read.FORMATS."""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from typing import NoReturn

from ...errors import CkptError
from ...io import Checkpoint, TensorRef, open_checkpoint
from .kinds import Adapter, Format, Layout, Module, suffixes
from .peft import PEFT_CONFIG, PEFT_PREFIX

_PREFIX = re.compile(r"lora_(?:unet|te\d?)_")
_KEY = re.compile(r"(?P<module>lora_(?:unet|te\d?)_[^.]+)\.(?P<part>lora_down\.weight|lora_up\.weight|alpha)")


def recognises(path: str) -> bool:
    """Any file: the last entry of the table, whose reader says what a file is when it is not
    a kohya LoRA (a PEFT adapter's weights, LyCORIS keys, something else)."""
    return True


def read(path: str) -> Adapter:
    ckpt = open_checkpoint(path)
    try:
        return _adapter(ckpt)
    except BaseException:
        ckpt.close()
        raise


def _adapter(ckpt: Checkpoint) -> Adapter:
    where = ckpt.path
    parts: dict[str, dict[str, TensorRef]] = OrderedDict()
    for key, t in ckpt.tensors.items():
        m = _KEY.fullmatch(key)
        if m is None:
            _refuse_key(where, key)
        parts.setdefault(m["module"], {})[m["part"]] = t
    if not parts:
        raise CkptError(f"{where}: holds no LoRA weights")
    return Adapter(ckpt.path, Format.KOHYA, [_module(where, name, found) for name, found in parts.items()],
                   checkpoints=[ckpt])


def _refuse_key(where: str, key: str) -> NoReturn:
    """Why a key of the file is not a kohya LoRA's (raised)."""
    if key.startswith(PEFT_PREFIX) and ".lora_" in key:
        raise CkptError(f"{where}: a PEFT adapter's weights (key {key}); give the folder holding them and "
                        f"its {PEFT_CONFIG}")
    if key.startswith(("lora_unet_", "lora_te")):
        raise CkptError(f"{where}: {key}: a kind of weight not supported here (LyCORIS LoHa/LoKr, "
                        f"lora_mid, DoRA scales); only lora_down/lora_up/alpha fold")
    raise CkptError(f"{where}: key {key} is neither a kohya-style LoRA key (lora_unet_…/lora_te_… with "
                    f"lora_down/lora_up/alpha) nor part of a PEFT adapter folder")


def _module(where: str, name: str, found: dict[str, TensorRef]) -> Module:
    if "lora_down.weight" not in found or "lora_up.weight" not in found:
        missing = "lora_down" if "lora_down.weight" not in found else "lora_up"
        raise CkptError(f"{where}: {name} has no {missing}.weight")
    a, b = found["lora_down.weight"], found["lora_up.weight"]
    rank = a.shape[0] if a.shape else 0
    if rank == 0:
        raise CkptError(f"{where}: {name}.lora_down.weight has rank 0")
    alpha = float(rank)
    if "alpha" in found:  # kohya's own loader takes an alpha of 0 as "no alpha": α = rank
        alpha = _scalar(found["alpha"], f"{where}: {name}.alpha") or float(rank)
    return Module(name, a, b, alpha / rank, Layout.CONV if len(a.shape) > 2 else Layout.LINEAR)


def _scalar(t: TensorRef, where: str) -> float:
    from ...io.tensors import values

    if t.numel != 1 or not t.dtype.floating and t.dtype.kind != "int":
        raise CkptError(f"{where}: expected one number, found a {t.dtype.name} tensor of shape {list(t.shape)}")
    value = float(values(t)[0])
    if not math.isfinite(value):
        raise CkptError(f"{where}: {value} is not a finite number")
    return value


class KohyaResolver:
    """`lora_unet_down_blocks_0_proj_in` onto the base module whose name, dots made underscores,
    is `down_blocks_0_proj_in` — the whole name, else a dotted tail of it (a full checkpoint's
    `model.diffusion_model.` or `cond_stage_model.transformer.` in front)."""

    def __init__(self, keys: list[str]):
        self.whole: dict[str, list[str]] = {}
        self.tail: dict[str, list[str]] = {}
        for key in keys:
            if not key.endswith(".weight"):
                continue
            module = key[: -len(".weight")]
            self.whole.setdefault(module.replace(".", "_"), []).append(module)
            for tail in suffixes(module):
                self.tail.setdefault(tail.replace(".", "_"), []).append(module)

    def module_key(self, name: str) -> str | None:
        return self(name)

    def __call__(self, name: str) -> str | None:
        body = name[_PREFIX.match(name).end():]  # every kohya module name starts so (_KEY)
        found = self.whole.get(body) or self.tail.get(body, [])
        if len(found) > 1:
            raise CkptError(f"{name} could be any of the base's modules {', '.join(sorted(found)[:8])}"
                            f"{' …' if len(found) > 8 else ''}; fold into a base that holds one of them only "
                            f"(e.g. the component's own checkpoint), or rename the base")
        return f"{found[0]}.weight" if found else None

    def check(self, where: str) -> dict | None:
        """Nothing to check: kohya names meet the base's without a prefix rule."""
        return None
