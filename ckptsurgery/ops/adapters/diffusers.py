"""The diffusers LoRA format: one .safetensors (or .bin) file without an adapter_config.json, as
diffusers' `save_lora_weights` writes it (`pytorch_lora_weights.safetensors`) — its reader; its
names meet a base's keys as a PEFT adapter's do (peft.PeftResolver). Its entry in the table of
formats is read.FORMATS, before kohya's catch-all. Keys, each under its component (`unet.`,
`transformer.`, `text_encoder.`, `text_encoder_2.`, `text_encoder_3.`, `prior.`):

    <module>.lora_A.weight, .lora_B.weight (.lora_B.bias)    peft's layout, diffusers ≥ 0.22
    <module>.lora.down.weight, .lora.up.weight                LoRACompatibleLinear/Conv
    <attn>.processor.to_q_lora.down.weight …                  attention processors: to_q, to_k,
                                                              to_v, to_out.0 (a text encoder's
                                                              q_proj, k_proj, v_proj, out_proj)
    <module>.lora_linear_layer.down.weight …                  a text encoder's, older
    <module>.alpha                                            optional

— mapped as diffusers' own loader maps them (utils/state_dict_utils.py: UNET_TO_DIFFUSERS,
DIFFUSERS_OLD_TO_PEFT, `.processor.` dropped). The scale of a module is α/r with its `alpha`, and
1 without one: diffusers loads a file without alphas with lora_alpha = r (peft_utils
`get_peft_kwargs`). A file diffusers saved with its LoraConfig in the safetensors metadata
(`lora_adapter_metadata`: `unet.r`, `unet.lora_alpha`, rank_pattern, …) is scaled by that config,
as a PEFT folder's (peft.py). The module names keep their component: `unet.down_blocks.0…` meets a
UNet checkpoint's `down_blocks.0…` by the prefix rule, the text encoder's modules are unmatched
there (--allow-unmatched folds the UNet's alone)."""

from __future__ import annotations

import json
import os
import re
from typing import NoReturn

from ...errors import CkptError
from ...io import Checkpoint, TensorRef, open_checkpoint
from .kinds import Adapter, Format, Layout, Module, module_parts, read_file
from .patterns import ConfigPatterns

_COMPONENT = re.compile(r"(?P<component>unet|transformer|prior|text_encoder(?:_[23])?)\.(?P<rest>.+)")
# (pattern, what each part is): tried in order on a key without its component
_FORMS = (
    (re.compile(r"(?P<module>.+)\.lora_(?P<ab>[AB])\.(?P<param>weight|bias)"), "peft"),
    (re.compile(r"(?P<module>.+)\.lora_linear_layer\.(?P<ud>up|down)\.weight"), "linear_layer"),
    (re.compile(r"(?P<module>.+)_lora\.(?P<ud>up|down)\.weight"), "processor"),
    (re.compile(r"(?P<module>.+)\.lora\.(?P<ud>up|down)\.weight"), "compatible"),
    (re.compile(r"(?P<module>.+?)(?P<old>_lora)?\.alpha"), "alpha"),
)
_PROCESSOR = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
_TEXT_PROCESSOR = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}
METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
METADATA_LIMIT = 16 * 1024 * 1024


def recognises(path: str) -> bool:
    """A file (not a folder) whose keys are a diffusers LoRA's: any key under a component with a
    LoRA factor's name (its header read, no tensor data)."""
    if os.path.isdir(path) or not os.path.isfile(path):
        return False
    try:
        ckpt = open_checkpoint(path)
    except CkptError:
        return False  # kohya's reader, last, says what the file is
    try:
        return any(_part(key) is not None for key in ckpt.tensors)
    finally:
        ckpt.close()


def _part(key: str) -> tuple[str, str] | None:
    """(module name with its component, slot: A, B, B-bias, alpha) of a key, or None."""
    m = _COMPONENT.fullmatch(key)
    if m is None:
        return None
    component, rest = m["component"], m["rest"].replace(".processor.", ".")
    for pattern, form in _FORMS:
        p = pattern.fullmatch(rest)
        if p is None:
            continue
        module = p["module"]
        if form == "alpha" and p["old"] or form == "processor":
            head, _, leaf = module.rpartition(".")
            names = _TEXT_PROCESSOR if component.startswith("text_encoder") else _PROCESSOR
            if leaf not in names:
                return None
            module = f"{head}.{names[leaf]}" if head else names[leaf]
        if form == "alpha":
            slot = "alpha"
        elif form == "peft":
            slot = p["ab"] if p["param"] == "weight" else f"{p['ab']}-bias"
        else:
            slot = "A" if p["ud"] == "down" else "B"
        return f"{component}.{module}", slot
    return None


def read(path: str) -> Adapter:
    return read_file(path, _adapter)


def _adapter(ckpt: Checkpoint) -> Adapter:
    where = ckpt.path

    def refuse(key: str) -> NoReturn:
        raise CkptError(f"{where}: {key} is not a diffusers LoRA key (<component>.<module>.lora_A/lora_B.weight, "
                        f".lora.down/.up.weight, .alpha); DoRA, LoKr and other kinds in this layout are not "
                        f"supported here")

    parts = module_parts(ckpt, _part, refuse, layouts="two of diffusers' layouts")
    configs = _configs(ckpt)
    if configs and any("alpha" in p for p in parts.values()):
        raise CkptError(f"{where}: holds both alpha tensors and a LoraConfig in its metadata ({METADATA_KEY}), "
                        f"which diffusers refuses too")
    # a module's name starts with its component (`unet.`, `text_encoder_2.`), whose config it takes
    modules = [_module(where, name, found, configs.get(name.partition(".")[0])) for name, found in parts.items()]
    return Adapter(ckpt.path, Format.DIFFUSERS, modules, checkpoints=[ckpt])


def _configs(ckpt: Checkpoint) -> dict[str, dict]:
    """component -> its LoraConfig from the file's `lora_adapter_metadata` (none: {})."""
    raw = (getattr(ckpt, "metadata", None) or {}).get(METADATA_KEY)
    if not raw:
        return {}
    try:
        if len(raw) > METADATA_LIMIT:
            raise ValueError("too large")
        doc = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise CkptError(f"{ckpt.path}: its {METADATA_KEY} metadata is not readable JSON ({e})") from None
    if not isinstance(doc, dict):
        raise CkptError(f"{ckpt.path}: its {METADATA_KEY} metadata is not a JSON object")
    configs: dict[str, dict] = {}
    for key, value in doc.items():
        component, dot, field = str(key).partition(".")
        if dot:
            configs.setdefault(component, {})[field] = value
    return configs


def _module(where: str, name: str, found: dict[str, TensorRef], config: dict | None) -> Module:
    from . import peft

    if "A" not in found or "B" not in found:
        raise CkptError(f"{where}: module {name} has no {'lora_A (down)' if 'A' not in found else 'lora_B (up)'} "
                        f"weight")
    if "A-bias" in found:
        raise CkptError(f"{where}: module {name}: lora_A has a bias, which diffusers never makes")
    a = found["A"]
    if not a.shape or not a.shape[0]:
        raise CkptError(f"{where}: module {name}: lora_A has rank 0")
    if config is not None:  # the component's LoraConfig: peft's rules, its names without the component
        config = {"peft_type": "LORA", **config}
        label = f"{where} ({METADATA_KEY})"
        peft.check_kind(config, label)
        if config.get("use_dora"):
            raise CkptError(f"{label}: use_dora; DoRA in diffusers' layout is not supported here")
        local = name.partition(".")[2]
        patterns = ConfigPatterns(config, label, 1)
        defaults = (peft.number(config, "r", label, 8), peft.number(config, "lora_alpha", label, 8))
        module = peft.lora_module(where, local, Layout.LINEAR, found, config, label, defaults, patterns)
        module.name = name
        return module
    rank = a.shape[0]
    alpha = float(rank)
    if "alpha" in found:
        from .kohya import scalar

        alpha = scalar(found["alpha"], f"{where}: {name}.alpha")
        if alpha <= 0:
            raise CkptError(f"{where}: {name}.alpha is {alpha:g}; expected a positive number")
    return Module(name, a, found["B"], alpha / rank, Layout.CONV if len(a.shape) > 2 else Layout.LINEAR,
                  bias=found.get("B-bias"))
