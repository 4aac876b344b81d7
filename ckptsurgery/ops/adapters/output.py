"""Writing adapters: a PEFT folder (adapter_config.json + adapter_model.safetensors, staged and
renamed into place whole) and a kohya .safetensors file (lora_down/lora_up/alpha). `extract-lora`
and the `lora` group write through here; the formats themselves are read by peft.py and kohya.py.

A module written is a `Written`: its name as the format names it, its factors (TensorRefs,
usually computed), its rank, alpha and layout."""

from __future__ import annotations

import json
import os
import re
from collections import Counter, OrderedDict
from dataclasses import dataclass, replace

from ...errors import CkptError
from ...io import TensorRef
from ..options import WriteOptions
from ..reports import WriteReport
from ..write import write_checkpoint
from .kinds import Layout
from .patterns import Budget, PatternKeys
from .peft import PEFT_CONFIG, PEFT_PREFIX, PEFT_WEIGHTS


@dataclass
class Written:
    """One module of an adapter to write: ΔW = (alpha/rank)·B·A, shaped by its layout."""

    name: str
    a: TensorRef
    b: TensorRef
    rank: int
    alpha: float
    layout: Layout


def peft_tensors(modules: list[Written]) -> OrderedDict:
    """The factors by peft's names (`lora_embedding_A`/`_B` for embeddings, `lora_A/B.weight` else)."""
    out = OrderedDict()
    for m in modules:
        prefix = f"{PEFT_PREFIX}{m.name}."
        if m.layout == Layout.EMBEDDING:
            out[f"{prefix}lora_embedding_A"], out[f"{prefix}lora_embedding_B"] = m.a, m.b
        else:
            out[f"{prefix}lora_A.weight"], out[f"{prefix}lora_B.weight"] = m.a, m.b
    return out


def peft_config(modules: list[Written], r: int | None = None, alpha: float | None = None) -> dict:
    """adapter_config.json of a plain LoRA: r and lora_alpha as given (by default the most common
    rank and alpha), each module's own in rank_pattern/alpha_pattern where it differs."""
    names = [m.name for m in modules]
    ranks = {m.name: m.rank for m in modules}
    alphas = {m.name: m.alpha for m in modules}
    if r is None:
        r = Counter(ranks.values()).most_common(1)[0][0] if modules else 8
    if alpha is None:
        alpha = Counter(alphas.values()).most_common(1)[0][0] if modules else r
    rank_keys, alpha_keys = _peft_pattern_keys(names, ranks, r), _peft_pattern_keys(names, alphas, alpha)
    return {
        "alpha_pattern": {alpha_keys[n]: _number(alphas[n]) for n in names if alphas[n] != alpha},
        "base_model_name_or_path": None, "bias": "none",
        # peft sets it per module from the module's class anyway; saved true only when every
        # linear weight is stored [in, out], so that peft has nothing to warn about
        "fan_in_fan_out": any(m.layout == Layout.LINEAR_T for m in modules)
                          and not any(m.layout == Layout.LINEAR for m in modules),
        "inference_mode": True, "init_lora_weights": True, "lora_alpha": _number(alpha),
        "lora_dropout": 0.0, "modules_to_save": None, "peft_type": "LORA", "r": r,
        "rank_pattern": {rank_keys[n]: ranks[n] for n in names if ranks[n] != r},
        "target_modules": names, "task_type": None, "use_dora": False, "use_rslora": False,
    }


def _number(value: float) -> int | float:
    """An alpha as JSON shows it: 16, not 16.0, when it is whole."""
    return int(value) if float(value).is_integer() else float(value)


def _peft_pattern_keys(modules: list[str], values: dict, default) -> dict[str, str]:
    """Module -> its rank_pattern (alpha_pattern) key: its own name where peft's tail matching then
    gives every module its value, else (a name that is a dotted tail of another's) the name
    anchored and escaped, which selects that module only."""
    # a name with characters a regular expression reads otherwise is anchored and escaped too
    keys = {m: m if re.escape(m).replace("\\.", ".") == m else "^" + re.escape(m) for m in modules
            if values[m] != default}

    def values_peft_gives(keys: dict[str, str]) -> list:
        value_of = {k: values[module] for module, k in keys.items()}
        first = PatternKeys(list(value_of), None, Budget(None)).first
        return [value_of.get(first(m), default) for m in modules]

    if values_peft_gives(keys) != [values[m] for m in modules]:
        keys = {m: "^" + re.escape(m) for m in keys}
    return keys


def write_peft(modules: list[Written], write: WriteOptions, metadata: dict[str, str], config: dict | None = None) -> list[str]:
    """The PEFT folder at `write.output`, staged and renamed into place whole (nothing with
    `write.dry_run`). `metadata`: adapter_model.safetensors' metadata; `config`: its
    adapter_config.json (by default `peft_config(modules)`). Returns its two files."""
    from ...io.write import StagedOutputs, check_parent

    check_folder(write.output, write.force or write.dry_run)  # a dry run says it would need --force
    files = [os.path.join(write.output, PEFT_CONFIG), os.path.join(write.output, PEFT_WEIGHTS[0])]
    if write.dry_run:
        return files
    config = config or peft_config(modules)
    check_parent(write.output)
    with StagedOutputs() as outputs:
        folder = outputs.stage_folder(write.output)
        write_checkpoint(peft_tensors(modules), replace(write, output=os.path.join(folder, PEFT_WEIGHTS[0]),
                                                       force=False, dry_run=False, metadata=metadata), source=None)
        with open(os.path.join(folder, PEFT_CONFIG), "w", encoding="utf-8") as f:
            f.write(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return files


def kohya_tensors(modules: list[Written]) -> OrderedDict:
    """`<name>.lora_down.weight`, `.lora_up.weight` and `.alpha` (a float32 scalar) per module."""
    from ...dtypes import by_name
    from ...io.model import computed_tensor

    out = OrderedDict()
    for m in modules:
        out[f"{m.name}.lora_down.weight"], out[f"{m.name}.lora_up.weight"] = m.a, m.b
        alpha = float(m.alpha)
        out[f"{m.name}.alpha"] = computed_tensor((), by_name("float32"), lambda alpha=alpha: _float32(alpha))
    return out


def _float32(value: float) -> bytes:
    import struct

    return struct.pack("<f", value)


def write_kohya(modules: list[Written], write: WriteOptions, metadata: dict[str, str]) -> WriteReport:
    """The kohya .safetensors file at `write.output` (written whole or not at all)."""
    if not write.output.endswith(".safetensors"):
        raise CkptError(f"{write.output}: a kohya adapter is one .safetensors file; name the output so")
    return write_checkpoint(kohya_tensors(modules), replace(write, metadata=metadata), source=None)


def check_folder(output: str, force: bool) -> None:
    """An adapter output is a folder: refuse to replace anything there without --force, and even
    with it anything but an earlier adapter folder (or an empty one)."""
    if os.path.lexists(output):
        if not force:
            raise CkptError(f"{output}: already exists; pass --force to overwrite it")
        if not os.path.isdir(output) or os.path.islink(output):
            raise CkptError(f"{output}: exists and is not a folder; an adapter is written as a folder")
        if os.listdir(output) and not os.path.isfile(os.path.join(output, PEFT_CONFIG)):
            raise CkptError(f"{output}: a folder that is not an adapter (no {PEFT_CONFIG}); not replacing it, "
                            f"even with --force")
        others = sorted(set(os.listdir(output)) - {PEFT_CONFIG, *PEFT_WEIGHTS, "README.md"})
        if others:  # a trainer's output folder: its checkpoints and tokenizer are not ours to delete
            raise CkptError(f"{output}: holds more than an adapter ({', '.join(others[:5])}"
                            f"{' …' if len(others) > 5 else ''}); not replacing it, even with --force: "
                            f"write the adapter to a folder of its own")
