"""The PEFT adapter format: a folder holding adapter_config.json and adapter_model.safetensors
(or .bin), as peft's save_pretrained writes it — its reader (LoRA, DoRA, IA3, LoHa and LoKr
modules: see kind_<name>.py), and how its module names meet a base's keys. Its entry in the table of formats
is read.FORMATS; extract.py writes this format."""

from __future__ import annotations

import math
import os
import re
from collections import OrderedDict

from ...errors import CkptError
from ...io import Checkpoint, TensorRef, open_checkpoint
from .kinds import Adapter, AdapterKind, Format, Layout, Module, suffixes
from .patterns import ConfigPatterns

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
PEFT_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the user's model
# an adapter_config.json is a few KB (rank_pattern for every module of a large model: a few hundred);
# read whole only up to this, as a shard index is (io/sharded.py)
CONFIG_LIMIT = 16 * 1024 * 1024

# peft config fields whose adapters a plain W + scale·B·A does not reproduce: refused, never folded
# wrongly. Each is checked only when set (not null, false, empty).
UNSUPPORTED = {
    "use_qalora": "QALoRA (use_qalora) pools its inputs",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) applies only after its tokens",
    "target_parameters": "LoRA on bare parameters (target_parameters)",
    "layer_replication": "layer_replication adds layers the base does not have",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
    "arrow_config": "Arrow routing (arrow_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
    "kasa_config": "KaSA (kasa_config)",
}
# initialisations that change the base weights themselves: the adapter fits a residual base
RESIDUAL_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")

_LINEAR = re.compile(r"(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?\.(?P<param>weight|bias)")
_EMBEDDING = re.compile(r"(?P<module>.+)\.lora_embedding_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?")
_IA3 = re.compile(r"(?P<module>.+)\.ia3_l(?:\.(?P<adapter>[^.]+))?")
# DoRA's magnitudes: peft saves `<module>.lora_magnitude_vector` (a `.weight` and the adapter's name
# in a state dict of its own)
_MAGNITUDE = re.compile(r"(?P<module>.+)\.lora_magnitude_vector(?:\.(?P<adapter>(?!weight$)[^.]+))?(?:\.weight)?")


def recognises(path: str) -> bool:
    """A folder, or a file named adapter_model… with adapter_config.json beside it."""
    return os.path.isdir(path) or (os.path.basename(path).startswith("adapter_model") and
                                   os.path.isfile(os.path.join(os.path.dirname(path) or ".", PEFT_CONFIG)))


def read(path: str) -> Adapter:
    """The adapter of a PEFT folder (or of the adapter_model file named in one), its weights
    file open. The config is checked first: a LoRA whose fold W + scale·B·A would be wrong is
    refused."""
    folder = path if os.path.isdir(path) else os.path.dirname(path) or "."
    config_path = os.path.join(folder, PEFT_CONFIG)
    if not os.path.isfile(config_path):
        raise CkptError(f"{path}: no {PEFT_CONFIG} in this folder; a PEFT adapter folder holds it beside "
                        f"adapter_model.safetensors (or give a kohya-style .safetensors file)")
    config = _read_json(config_path)
    check_kind(config, config_path)
    ckpt = open_checkpoint(_weights_file(folder, path))
    try:
        read_kind = {"IA3": _ia3_adapter, "LOHA": _lycoris_adapter, "LOKR": _lycoris_adapter}
        adapter = read_kind.get(config["peft_type"], _adapter)(ckpt, config, config_path)
        adapter.path = path  # the folder (or file) the user named
        return adapter
    except BaseException:
        ckpt.close()
        raise


def _read_json(path: str) -> dict:
    """The config, read whole only up to CONFIG_LIMIT: a real one is a few KB."""
    from ...io.small_files import parse_json, read_small  # here: only a PEFT folder's reader needs them

    raw = read_small(path, CONFIG_LIMIT, f"an adapter config larger than {CONFIG_LIMIT >> 20} MiB; not a PEFT "
                     f"{PEFT_CONFIG}", missing=f"no such file; a PEFT adapter folder holds {PEFT_CONFIG} and "
                                           f"adapter_model.safetensors (save it with save_pretrained)")
    doc = parse_json(path, raw, "not readable JSON")
    if not isinstance(doc, dict):
        raise CkptError(f"{path}: expected a JSON object")
    return doc


def check_kind(config: dict, config_path: str) -> None:
    """A kind that folds: peft_type IA3, LOHA, LOKR, or LORA (DoRA too) without the UNSUPPORTED
    variants or a residual initialisation."""
    peft_type = config.get("peft_type")
    if peft_type not in ("LORA", "IA3", "LOHA", "LOKR"):
        raise CkptError(f"{config_path}: peft_type {str(peft_type)[:40]!r} is not supported; LORA (and DoRA), IA3, "
                        f"LOHA and LOKR adapters fold into the base weights here")
    for key, what in UNSUPPORTED.items():
        if config.get(key):
            raise CkptError(f"{config_path}: {what}, which folding as W + scale·B·A would get wrong; "
                            f"not supported (merge it with peft's merge_and_unload)")
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(RESIDUAL_INITS):
        raise CkptError(f"{config_path}: init_lora_weights {init!r} changes the base weights at the start of "
                        f"training; convert the adapter with peft's save_pretrained(..., "
                        f"path_initial_model_for_weight_conversion=...) first")


def _weights_file(folder: str, given: str) -> str:
    if not os.path.isdir(given):  # a file named: exactly that one (open_checkpoint says if it is missing)
        return given
    weights = [os.path.join(folder, name) for name in PEFT_WEIGHTS if os.path.isfile(os.path.join(folder, name))]
    if not weights:
        raise CkptError(f"{folder}: holds {PEFT_CONFIG} but neither {' nor '.join(PEFT_WEIGHTS)}")
    return weights[0]


def number(config: dict, key: str, where: str, default=None) -> float:
    value = config.get(key, default)
    # an int beyond a float's range (JSON allows 1e400 written out) is no rank or alpha either
    if isinstance(value, bool) or not isinstance(value, (int, float)) or abs(value) > 1e300 \
            or not math.isfinite(value) or value <= 0:
        raise CkptError(f"{where}: {key} {str(value)[:40]} is not a positive number")
    return value


def _adapter(ckpt: Checkpoint, config: dict, config_path: str) -> Adapter:
    defaults = (number(config, "r", config_path, 8), number(config, "lora_alpha", config_path, 8))
    parts, magnitudes, replaced = _parts(ckpt)
    patterns = ConfigPatterns(config, config_path, len(parts))
    modules = [_dora(ckpt.path, lora_module(ckpt.path, name, layout, found, config, config_path, defaults, patterns),
                     magnitudes.pop(name, None), bool(config.get("use_dora")))
               for (name, layout), found in parts.items()]
    if magnitudes:
        raise CkptError(f"{ckpt.path}: module {next(iter(magnitudes))} has a lora_magnitude_vector but no lora_A and "
                        f"lora_B weights")
    return Adapter(ckpt.path, Format.PEFT, modules, replaced, config, [ckpt])


def _dora(where: str, module: Module, magnitude: TensorRef | None, use_dora: bool) -> Module:
    """A module of a DoRA adapter (the config's use_dora): LoRA's factors and a magnitude per output."""
    if magnitude is None:
        if use_dora:
            raise CkptError(f"{where}: module {module.name} has no lora_magnitude_vector, which a DoRA adapter "
                            f"(use_dora) holds for every module")
        return module
    if not use_dora:
        raise CkptError(f"{where}: module {module.name} has a lora_magnitude_vector but its config does not set "
                        f"use_dora; the file and its config disagree")
    module.kind, module.factors = AdapterKind.DORA, {"magnitude": magnitude}
    return module


def _parts(ckpt: Checkpoint) -> tuple[dict, dict, OrderedDict]:
    """The file's keys sorted out: (module, layout) -> {"A", "B", "A-bias", "B-bias"} factors,
    module -> its DoRA magnitude, and the tensors that replace the base's whole (name -> tensor)."""
    where = ckpt.path
    parts: dict[tuple[str, Layout], dict[str, TensorRef]] = {}
    magnitudes: dict[str, TensorRef] = {}

    def match(short: str) -> re.Match | None:
        return _MAGNITUDE.fullmatch(short) or _LINEAR.fullmatch(short) or _EMBEDDING.fullmatch(short)

    def take(m: re.Match, t: TensorRef) -> None:
        if m.re is _MAGNITUDE:
            if m["module"] in magnitudes:
                raise CkptError(f"{where}: module {m['module']} has two lora_magnitude_vector weights (with and "
                                f"without an adapter name); save one adapter per file")
            magnitudes[m["module"]] = t
            return
        layout = Layout.EMBEDDING if m.re is _EMBEDDING else Layout.LINEAR
        slot = m["ab"] if m.groupdict().get("param", "weight") == "weight" else f"{m['ab']}-bias"
        found = parts.setdefault((m["module"], layout), {})
        if slot in found:  # `lin.lora_A.weight` beside `lin.lora_A.default.weight`: which one?
            raise CkptError(f"{where}: module {m['module']} has two {slot.replace('-', ' ')} weights (with and "
                            f"without an adapter name); save one adapter per file")
        found[slot] = t

    return parts, magnitudes, _sort_keys(ckpt, "LORA", match, take)


def _sort_keys(ckpt: Checkpoint, peft_type: str, match, take) -> OrderedDict:
    """The file's keys, each without peft's prefix, in order: an adapter weight of `peft_type`
    (`match(short)`, a re.Match with an `adapter` group) is given to `take(match, tensor)`; any
    other key is a whole tensor that replaces the base's — modules_to_save, trained biases, and
    the base layer peft saves beside an adapted embedding or lm_head (`save_embedding_layers`) —
    returned by the base's name (name -> tensor), unless it is another kind's adapter weight
    (refused). A file holding several adapters (by name) is refused."""
    where = ckpt.path
    adapter_names, replaced = set(), OrderedDict()
    for key, t in ckpt.tensors.items():
        short = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        m = match(short)
        if m is None:
            _refuse_foreign(where, key, short, peft_type)
            replaced[_replaced_name(short)] = t
            continue
        take(m, t)
        adapter_names.update([m["adapter"]] if m["adapter"] else [])
    if len(adapter_names) > 1:
        raise CkptError(f"{where}: holds several adapters ({', '.join(sorted(adapter_names))}); save each on "
                        f"its own and give one --lora per adapter")
    return replaced


# what marks a key as an adapter's weight, of any kind peft saves: one the reader of the config's
# peft_type did not take is refused, never taken for a whole tensor that replaces the base's
_ADAPTER_MARKS = ("lora_", "ia3_", "hada_", "lokr_", "trainable_tokens", "vera_", "oft_", "boft_", "fourierft_")


def _refuse_foreign(where: str, key: str, short: str, peft_type: str) -> None:
    """Refuse a key that is some adapter's weight (a name of it starts with a mark) but not one a
    `peft_type` module holds as this tool reads it."""
    parts = short.split(".")
    mark = next((m for m in _ADAPTER_MARKS if any(part.startswith(m) for part in parts)), None)
    if mark is not None:
        raise CkptError(f"{where}: {key}: a {mark.rstrip('_')} weight, which {peft_type} adapters (its config's "
                        f"peft_type) do not hold as this tool reads them; nothing was written")


def _replaced_name(short: str) -> str:
    """The base tensor a saved whole tensor replaces: modules_to_save, trained biases, the base
    layer peft saves beside an adapted embedding or lm_head (`save_embedding_layers`); older
    files keep modules_to_save under `<module>.modules_to_save.<adapter>.`."""
    return re.sub(r"\.modules_to_save\.[^.]+\.", ".", short.replace(".base_layer.", "."))


def _ia3_adapter(ckpt: Checkpoint, config: dict, config_path: str) -> Adapter:
    """An IA3 adapter: one vector `ia3_l` per module, scaling its inputs when the config's
    feedforward_modules names it, else its outputs (kind_ia3.py)."""
    where = ckpt.path
    vectors: dict[str, TensorRef] = OrderedDict()

    def take(m: re.Match, t: TensorRef) -> None:
        if m["module"] in vectors:
            raise CkptError(f"{where}: module {m['module']} has two ia3_l weights (with and without an adapter "
                            f"name); save one adapter per file")
        vectors[m["module"]] = t

    replaced = _sort_keys(ckpt, "IA3", _IA3.fullmatch, take)
    patterns = ConfigPatterns(config, config_path, len(vectors))
    modules = []
    for name, t in vectors.items():
        if patterns.targets(name) is False:
            raise CkptError(f"{where}: holds weights for {name}, which target_modules in {config_path} does not "
                            f"select (peft would ignore them); fix the config or the file")
        modules.append(Module(name, None, None, 1.0, Layout.LINEAR, kind=AdapterKind.IA3, factors={"vector": t},
                              feedforward=patterns.feedforward(name)))
    return Adapter(ckpt.path, Format.PEFT, modules, replaced, config, [ckpt])


# peft's LyCORIS kinds: peft_type -> (kind, the prefix of its keys)
_LYCORIS = {"LOHA": (AdapterKind.LOHA, "hada_"), "LOKR": (AdapterKind.LOKR, "lokr_")}
_LYCORIS_KEY = re.compile(r"(?P<module>.+)\.(?P<prefix>hada_|lokr_)(?P<factor>[^.]+)(?:\.(?P<adapter>[^.]+))?")


def _lycoris_adapter(ckpt: Checkpoint, config: dict, config_path: str) -> Adapter:
    """A LoHa or LoKr adapter: each module's factors (`hada_w1_a` …, `lokr_w1` …) under their names
    without the prefix, and its scale α/r (`alpha`, `r`, rank_pattern and alpha_pattern)."""
    where = ckpt.path
    kind, prefix = _LYCORIS[config["peft_type"]]
    found: dict[str, dict[str, TensorRef]] = OrderedDict()

    def match(short: str) -> re.Match | None:
        m = _LYCORIS_KEY.fullmatch(short)
        return m if m is not None and m["prefix"] == prefix else None

    def take(m: re.Match, t: TensorRef) -> None:
        factors = found.setdefault(m["module"], {})
        if m["factor"] in factors:
            raise CkptError(f"{where}: module {m['module']} has two {prefix}{m['factor']} weights (with and without "
                            f"an adapter name); save one adapter per file")
        factors[m["factor"]] = t

    replaced = _sort_keys(ckpt, config["peft_type"], match, take)
    defaults = (number(config, "r", config_path, 8), number(config, "alpha", config_path, 8))
    patterns = ConfigPatterns(config, config_path, len(found))
    return Adapter(ckpt.path, Format.PEFT, [_lycoris_module(where, name, kind, prefix, factors, config, config_path,
                                                            defaults, patterns) for name, factors in found.items()],
                   replaced, config, [ckpt])


def _lycoris_module(where: str, name: str, kind: AdapterKind, prefix: str, factors: dict[str, TensorRef],
                    config: dict, config_path: str, defaults: tuple[float, float], patterns: ConfigPatterns) -> Module:
    """One LoHa or LoKr module: its rank (the first axis of its `_b` factors) held to the config's."""
    if patterns.targets(name) is False:
        raise CkptError(f"{where}: holds weights for {name}, which target_modules in {config_path} does not "
                        f"select (peft would ignore them); fix the config or the file")
    r_key, a_key = patterns.rank.first(name), patterns.alpha.first(name)
    r = number(config.get("rank_pattern") or {}, r_key, config_path) if r_key is not None else defaults[0]
    alpha = number(config.get("alpha_pattern") or {}, a_key, config_path) if a_key is not None else defaults[1]
    for factor in ("w1_b", "w2_b"):  # [r, …] in both kinds, whenever a side is decomposed
        t = factors.get(factor)
        if t is not None and (not t.shape or t.shape[0] != r):
            raise CkptError(f"{where}: module {name}: {prefix}{factor} has rank {t.shape[0] if t.shape else 0} but "
                            f"{config_path} gives r={r:g} (rank_pattern); the file and its config disagree")
    if not math.isfinite(alpha / r):  # a whole w1 and w2 leave r unchecked: alpha 1e300 over r 1e-300
        raise CkptError(f"{where}: module {name}: its scale alpha/r ({alpha:g}/{r:g}) is not a finite number "
                        f"({config_path})")
    return Module(name, None, None, alpha / r, Layout.LINEAR, kind=kind, factors=factors)


def lora_module(where: str, name: str, layout: Layout, found: dict[str, TensorRef], config: dict, config_path: str,
            defaults: tuple[float, float], patterns: ConfigPatterns) -> Module:
    """One module: its factors checked against the config, its rank and alpha (rank_pattern,
    alpha_pattern, rsLoRA), its layout (conv by A's shape, linear-t with fan_in_fan_out)."""
    if "A" not in found or "B" not in found:
        missing = "lora_A" if "A" not in found else "lora_B"
        raise CkptError(f"{where}: module {name} has no {missing.replace('lora_', 'lora_embedding_') if layout == Layout.EMBEDDING else missing} weight")
    if "A-bias" in found:
        raise CkptError(f"{where}: module {name}: lora_A has a bias, which peft never makes")
    if patterns.targets(name) is False:
        raise CkptError(f"{where}: holds weights for {name}, which target_modules in {config_path} does not "
                        f"select (peft would ignore them); fix the config or the file")
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    r_key, a_key = patterns.rank.first(name), patterns.alpha.first(name)
    r = number(rank_pattern, r_key, config_path) if r_key is not None else defaults[0]
    alpha = number(alpha_pattern, a_key, config_path) if a_key is not None else defaults[1]
    a, b = found["A"], found["B"]
    if layout == Layout.LINEAR and len(a.shape) > 2:
        layout = Layout.CONV
    elif layout == Layout.LINEAR and config.get("fan_in_fan_out"):
        layout = Layout.LINEAR_T
    if not a.shape or a.shape[0] != r:
        raise CkptError(f"{where}: module {name}: lora_A has rank {a.shape[0] if a.shape else 0} but {config_path} gives r={r:g} "
                        f"(rank_pattern); the file and its config disagree")
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    return Module(name, a, b, scale, layout, bias=found.get("B-bias"))


class PeftResolver:
    """A peft module's `<module>.weight` onto the base's keys: exactly; else the base's keys have
    a prefix the adapter's lack (`model.` of a wrapper) or lack one it has — one such prefix for
    the whole adapter. A name two base keys could be is an error naming both."""

    def __init__(self, keys: list[str]):
        self.keys = set(keys)
        self._tails: dict[str, list[str]] | None = None
        self.rewrites: dict[tuple[str, str], list[str]] = {}  # (added|removed, prefix) -> names

    def tails(self) -> dict[str, list[str]]:
        if self._tails is None:
            self._tails = {}
            for key in self.keys:
                for tail in suffixes(key):
                    self._tails.setdefault(tail, []).append(key)
        return self._tails

    def module_key(self, name: str) -> str | None:
        return self(f"{name}.weight")

    def __call__(self, wanted: str) -> str | None:
        if wanted in self.keys:
            return wanted
        found = [(k, ("added", k[: -len(wanted)])) for k in sorted(self.tails().get(wanted, []))]
        found += [(t, ("removed", wanted[: -len(t)])) for t in suffixes(wanted) if t in self.keys]
        if len(found) > 1:
            raise CkptError(f"{wanted} could be any of the base's {', '.join(k for k, _ in found)}; rename the "
                            f"base (or the adapter) so that the names agree")
        if not found:
            return None
        key, rewrite = found[0]
        self.rewrites.setdefault(rewrite, []).append(wanted)
        return key

    def check(self, where: str) -> dict | None:
        if len(self.rewrites) > 1:
            shown = "; ".join(f"{kind} {prefix!r} for {names[0]}" for (kind, prefix), names in self.rewrites.items())
            raise CkptError(f"{where}: its names meet the base's only with different prefixes ({shown}); "
                            f"rename the base so that one prefix fits all")
        if self.rewrites:
            (kind, prefix), names = next(iter(self.rewrites.items()))
            return {kind: prefix, "keys": len(names)}
        return None
