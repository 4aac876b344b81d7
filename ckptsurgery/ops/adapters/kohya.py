"""The kohya adapter format: one .safetensors file of `lora_unet_…` / `lora_te_…` (`lora_te1_`,
`lora_te2_`) or `lycoris_…` modules, as kohya's sd-scripts and LyCORIS write them — its reader,
and how its underscore module names meet a base's dotted keys. Its entry in the table of formats
is read.FORMATS. A module's parts say its kind (kind_<name>.py):

    lora_down.weight, lora_up.weight[, lora_mid.weight]   LoRA / LoCon (mid: a Tucker conv)
    hada_w1_a, _w1_b, _w2_a, _w2_b[, hada_t1, _t2]        LoHa
    lokr_w1 | lokr_w1_a, _w1_b;  lokr_w2 | _w2_a, _w2_b[, lokr_t2]   LoKr
    diff[, diff_b]                                         full (a whole difference)

each with an optional `alpha` (scale α/r; none, or 0: α = r — and a LoKr with neither side
decomposed is scaled by 1, as LyCORIS does) and an optional `dora_scale` (LyCORIS's weight
decomposition: a LoRA/LoCon module with one is DoRA, a LoHa's or LoKr's keeps its kind)."""

from __future__ import annotations

import math
import re
import struct
from typing import NoReturn

from ...errors import CkptError
from ...io import Checkpoint, TensorRef
from .kinds import Adapter, AdapterKind, Format, Layout, Module, module_parts, read_file, suffixes
from .peft import PEFT_CONFIG, PEFT_PREFIX

_PREFIX = re.compile(r"(?:lora_(?:unet|te\d?)|lycoris)_")
_KEY = re.compile(r"(?P<module>(?:lora_(?:unet|te\d?)|lycoris)_[^.]+)\.(?P<part>.+)")

# each part a module may hold: (the kind whose factor it is, the factor's name) — kind None: a part
# of any kind; lora_* parts are LoRA/LoCon's (DoRA with a dora_scale)
_PARTS = {
    "lora_down.weight": (AdapterKind.LORA, "a"), "lora_up.weight": (AdapterKind.LORA, "b"),
    "lora_mid.weight": (AdapterKind.LORA, "mid"),
    **{f"hada_{n}": (AdapterKind.LOHA, n) for n in ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2")},
    **{f"lokr_{n}": (AdapterKind.LOKR, n) for n in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2")},
    "diff": (AdapterKind.FULL, "diff"), "diff_b": (AdapterKind.FULL, "diff_b"),
    "alpha": (None, "alpha"), "dora_scale": (None, "dora_scale"),
}


def recognises(path: str) -> bool:
    """Any file: the last entry of the table, whose reader says what a file is when it is not
    a kohya/LyCORIS adapter (a PEFT adapter's weights, another algorithm's keys, something else)."""
    return True


def read(path: str) -> Adapter:
    return read_file(path, _adapter)


def _adapter(ckpt: Checkpoint) -> Adapter:
    where = ckpt.path
    parts = module_parts(ckpt, _part, lambda key: _refuse_key(where, key))
    if not parts:
        raise CkptError(f"{where}: holds no LoRA weights")
    return Adapter(ckpt.path, Format.KOHYA, [_module(where, name, found) for name, found in parts.items()],
                   checkpoints=[ckpt])


def _part(key: str) -> tuple[str, str] | None:
    """(module, part) of a key, or None."""
    m = _KEY.fullmatch(key)
    return (m["module"], m["part"]) if m is not None and m["part"] in _PARTS else None


def _refuse_key(where: str, key: str) -> NoReturn:
    """Why a key of the file is not a kohya/LyCORIS adapter's (raised)."""
    if key.startswith(PEFT_PREFIX) and ".lora_" in key:
        raise CkptError(f"{where}: a PEFT adapter's weights (key {key}); give the folder holding them and "
                        f"its {PEFT_CONFIG}")
    if _PREFIX.match(key):
        raise CkptError(f"{where}: {key}: a kind of weight not supported here (LyCORIS's OFT, BOFT, IA3, GLoRA, "
                        f"norms …); lora_down/_up/_mid, hada_*, lokr_*, diff/diff_b, alpha and dora_scale fold")
    raise CkptError(f"{where}: key {key} is neither a kohya/LyCORIS adapter key (lora_unet_…/lora_te_…/lycoris_… "
                    f"with lora_down/lora_up/alpha, hada_*, lokr_*, diff) nor part of a PEFT adapter folder")


def _module(where: str, name: str, found: dict[str, TensorRef]) -> Module:
    """One module: its kind from its parts (one kind's alone), its factors, its scale α/r."""
    kinds = {_PARTS[p][0] for p in found} - {None}
    if len(kinds) != 1:
        held = ", ".join(sorted(found))
        raise CkptError(f"{where}: {name} holds {held}: " + ("no factors to fold" if not kinds else
                        f"the factors of several kinds ({', '.join(sorted(k.value for k in kinds))})"))
    kind = kinds.pop()
    factors = {_PARTS[p][1]: t for p, t in found.items() if p != "alpha"}
    if kind == AdapterKind.FULL:  # LyCORIS's full: no rank, no α
        if "alpha" in found or "dora_scale" in found:
            raise CkptError(f"{where}: {name}: {'alpha' if 'alpha' in found else 'dora_scale'} beside diff, which "
                            f"LyCORIS's full modules never hold")
        return Module(name, None, None, 1.0, Layout.LINEAR, kind=kind, factors=factors)
    if kind == AdapterKind.LORA:
        return _lora(where, name, found, factors)
    rank = _rank(where, name, kind, factors)
    scale = 1.0
    if rank:  # LoHa always; LoKr with a side decomposed (LyCORIS: α = rank when neither is, scale 1)
        scale = _alpha(where, name, found, rank) / rank
    return Module(name, None, None, scale, Layout.LINEAR, kind=kind, factors=factors,
                  lycoris=kind == AdapterKind.LOKR)


def _rank(where: str, name: str, kind: AdapterKind, factors: dict[str, TensorRef]) -> int:
    """The rank α divides: LoHa's w1_b's first axis; LoKr's decomposed sides' (0: none is)."""
    held = ["w1_b"] if kind == AdapterKind.LOHA else [n for n in ("w1_b", "w2_b") if n in factors]
    ranks = {factors[n].shape[0] if factors[n].shape else 0 for n in held if n in factors}
    if kind == AdapterKind.LOHA and not ranks:
        return 1  # kind_loha's check names what is missing
    if 0 in ranks or len(ranks) > 1:
        shown = ", ".join(f"{n} {list(factors[n].shape)}" for n in held if n in factors)
        raise CkptError(f"{where}: {name}: its ranks ({shown}) are " + ("0" if 0 in ranks else "not one rank"))
    return ranks.pop() if ranks else 0


def _alpha(where: str, name: str, found: dict[str, TensorRef], rank: int) -> float:
    """α: kohya's and LyCORIS's loaders take no alpha, and an alpha of 0, as α = rank."""
    if "alpha" not in found:
        return float(rank)
    return scalar(found["alpha"], f"{where}: {name}.alpha") or float(rank)


def _lora(where: str, name: str, found: dict[str, TensorRef], factors: dict[str, TensorRef]) -> Module:
    """A LoRA/LoCon module (with lora_mid, a Tucker conv; with dora_scale, DoRA)."""
    if "lora_down.weight" not in found or "lora_up.weight" not in found:
        missing = "lora_down" if "lora_down.weight" not in found else "lora_up"
        raise CkptError(f"{where}: {name} has no {missing}.weight")
    a, b = factors.pop("a"), factors.pop("b")
    rank = a.shape[0] if a.shape else 0
    if rank == 0:
        raise CkptError(f"{where}: {name}.lora_down.weight has rank 0")
    kind = AdapterKind.DORA if "dora_scale" in factors else AdapterKind.LORA
    return Module(name, a, b, _alpha(where, name, found, rank) / rank,
                  Layout.CONV if len(a.shape) > 2 else Layout.LINEAR, kind=kind, factors=factors)


# one element's bytes -> its value, without torch (a fold that runs in numpy must not import it for an alpha)
_SCALAR = {"float64": "<d", "float32": "<f", "float16": "<e", "int64": "<q", "int32": "<i", "int16": "<h",
           "int8": "<b", "uint8": "<B", "uint16": "<H", "uint32": "<I", "uint64": "<Q"}


def scalar(t: TensorRef, where: str) -> float:
    """The one number a one-element floating or integer tensor holds (an `alpha`), finite."""
    if t.numel != 1 or not t.dtype.floating and t.dtype.kind != "int":
        raise CkptError(f"{where}: expected one number, found a {t.dtype.name} tensor of shape {list(t.shape)}")
    raw = bytes(t.data())
    if t.dtype.name == "bfloat16":  # the upper half of a float32
        value = struct.unpack("<f", b"\0\0" + raw)[0]
    else:
        value = float(struct.unpack(_SCALAR[t.dtype.name], raw)[0])
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
