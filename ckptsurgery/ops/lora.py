"""LoRA without the model's code: fold adapters into a base checkpoint (`merge --lora`) and
extract an adapter from the difference between two checkpoints (`extract-lora`).

Folding, per base weight W (computed in float32, float64 for a float64 W, written in W's dtype):

    W' = W + Σ_adapters S · scale · ΔW        scale = α/r (α/√r with rsLoRA; kohya: alpha/rank)
    ΔW = B·A                                  linear layers (A: [r, in], B: [out, r])
    ΔW = (B·A)ᵀ                               linear with fan_in_fan_out (GPT-2's Conv1D), and
                                              embeddings (lora_embedding_A: [r, vocab], _B: [dim, r])
    ΔW = (B.flatten(1) · A.flatten(1)).view(W.shape)   conv (A: [r, in, k…], B: [out, r, 1…])

which is what peft's `get_delta_weight` computes for Linear, Embedding and ConvNd (its conv form,
conv(Aᵀ, B)ᵀ, is the same sum over r). Extraction is the truncated SVD of ΔW = TUNED − BASE:
A = √S·Vh, B = U·√S with lora_alpha = r, so that folding it back gives the best rank-r
approximation of ΔW (Eckart–Young), with relative error √(Σ dropped s²) / √(Σ s²).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

from .. import core
from ..errors import CkptError, UsageError
from ..io import Checkpoint, TensorRef, open_checkpoint
from ..io.model import computed_tensor
from .digest import tensor_sha256
from .write import ProgressFactory, write_checkpoint

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
PEFT_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the user's model

# peft config fields whose adapters a plain W + scale·B·A does not reproduce: refused, never folded
# wrongly. Each is checked only when set (not null, false, empty).
UNSUPPORTED = {
    "use_dora": "DoRA (use_dora) rescales each column by a learned magnitude",
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

_PEFT_LINEAR = re.compile(r"(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?\.(?P<param>weight|bias)")
_PEFT_EMBEDDING = re.compile(r"(?P<module>.+)\.lora_embedding_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?")
_KOHYA_PREFIX = re.compile(r"lora_(?:unet|te\d?)_")
_KOHYA_KEY = re.compile(r"(?P<module>lora_(?:unet|te\d?)_[^.]+)\.(?P<part>lora_down\.weight|lora_up\.weight|alpha)")


# ---- reading adapters --------------------------------------------------------------------------

@dataclass
class Module:
    """One adapted weight of an adapter: its low-rank factors, scale and layout."""

    name: str  # as the adapter names it: a module name (peft) or the underscore name (kohya)
    a: TensorRef
    b: TensorRef
    scale: float  # α/r (α/√r): the user's --lora-scale is applied on top
    layout: str  # linear, linear-t (fan_in_fan_out), embedding, conv
    bias: TensorRef | None = None  # peft lora_bias: B's bias, added (× scale) to the base bias


@dataclass
class Adapter:
    path: str
    format: str  # peft or kohya
    modules: list[Module]
    replaced: dict[str, TensorRef] = field(default_factory=dict)  # peft modules_to_save, trained biases
    config: dict = field(default_factory=dict)
    checkpoints: list[Checkpoint] = field(default_factory=list)

    def close(self) -> None:
        for ckpt in self.checkpoints:
            ckpt.close()


@contextmanager
def read_adapter(path: str) -> Iterator[Adapter]:
    """A PEFT adapter folder (or its adapter_model file) or a kohya-style .safetensors file,
    open until the block ends (its tensors are read lazily, when the output is written)."""
    path = os.fspath(path)
    folder = None
    if os.path.isdir(path):
        folder = path
    elif os.path.basename(path).startswith("adapter_model") and \
            os.path.isfile(os.path.join(os.path.dirname(path) or ".", PEFT_CONFIG)):
        folder = os.path.dirname(path) or "."
    adapter = _read_peft(folder, path) if folder is not None else _read_kohya(path)
    try:
        yield adapter
    finally:
        adapter.close()


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except FileNotFoundError:
        raise CkptError(f"{path}: no such file; a PEFT adapter folder holds {PEFT_CONFIG} and "
                        f"adapter_model.safetensors (save it with save_pretrained)") from None
    except (OSError, ValueError) as e:
        raise CkptError(f"{path}: not readable JSON ({e})") from None
    except RecursionError:
        raise CkptError(f"{path}: not readable JSON (nested too deep)") from None
    if not isinstance(doc, dict):
        raise CkptError(f"{path}: expected a JSON object")
    return doc


def check_file_pattern(pattern: object, where: str) -> str:
    """A regular expression read from an adapter's config, refused unless it is text, compiles,
    and has no shape that can backtrack exponentially: a repetition inside a repetition, an
    alternation or back-reference inside one, more than two unbounded repetitions. (peft's
    rank_pattern and target_modules are module names, or simple expressions like
    `.*\\.(q|v)_proj`.)"""
    if not isinstance(pattern, str):
        raise CkptError(f"{where}: pattern {str(pattern)[:40]!r} is a {type(pattern).__name__}, not text")
    try:
        parsed = _sre_parse(pattern)
    except (re.error, RecursionError, OverflowError) as e:
        raise CkptError(f"{where}: pattern {pattern[:60]!r} is not a valid regular expression ({e})") from None
    unbounded = 0

    def walk(items, in_repeat: bool) -> None:
        nonlocal unbounded
        for op, av in items:
            name = str(op)
            if name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
                low, high, sub = av
                if in_repeat:
                    raise CkptError(f"{where}: pattern {pattern[:60]!r} repeats a repetition, which can take "
                                    f"exponential time to match; not run")
                unbounded += high == _MAXREPEAT
                walk(sub, high > 1)  # `(x.*)?` repeats nothing
            elif name == "BRANCH":
                if in_repeat:
                    raise CkptError(f"{where}: pattern {pattern[:60]!r} repeats an alternation, which can take "
                                    f"exponential time to match; not run")
                for branch in av[1]:
                    walk(branch, in_repeat)
            elif name in ("GROUPREF", "GROUPREF_EXISTS"):
                raise CkptError(f"{where}: pattern {pattern[:60]!r} has a back-reference; not run")
            elif name == "SUBPATTERN":
                walk(av[-1], in_repeat)
            elif name in ("ASSERT", "ASSERT_NOT"):
                walk(av[1], in_repeat)

    walk(parsed, False)
    if unbounded > 2:
        raise CkptError(f"{where}: pattern {pattern[:60]!r} has {unbounded} unbounded repetitions, which can "
                        f"take a long time to match; not run")
    return pattern


def _sre_parse(pattern: str):
    try:
        from re import _parser as parser  # Python 3.11+
    except ImportError:  # pragma: no cover - Python 3.10
        import sre_parse as parser
    return parser.parse(pattern)


try:
    from re import _constants as _re_constants
except ImportError:  # pragma: no cover - Python 3.10
    import sre_constants as _re_constants
_MAXREPEAT = _re_constants.MAXREPEAT


def pattern_key(patterns, name: str) -> str | None:
    """The first of `patterns` (rank_pattern / alpha_pattern keys) that selects module `name`,
    as peft matches them: the pattern is a regular expression that must match the whole name
    or a dotted tail of it (`(.*\\.)?(pattern)$`)."""
    for key in patterns:
        try:
            if re.match(rf"(.*\.)?({key})$", name):
                return key
        except re.error as e:
            raise CkptError(f"rank/alpha pattern {key!r}: not a valid regular expression ({e})") from None
    return None


def _targets(config: dict, name: str) -> bool | None:
    """Whether target_modules selects module `name`, as peft decides; None when it cannot say
    (`all-linear`, or none given)."""
    targets = config.get("target_modules")
    if isinstance(targets, str):
        if targets == "all-linear":
            return None
        return re.fullmatch(targets, name) is not None  # checked by _check_config
    if isinstance(targets, list) and targets:
        return any(name == t or name.endswith("." + t) for t in targets)
    return None


def _check_config(config: dict, where: str) -> None:
    """The fields folding reads, of the types peft writes; patterns safe to run."""
    targets = config.get("target_modules")
    if isinstance(targets, str):
        if targets != "all-linear":
            check_file_pattern(targets, f"{where}: target_modules")
    elif isinstance(targets, list):
        if not all(isinstance(t, str) for t in targets):
            raise CkptError(f"{where}: target_modules must list module names (text)")
    elif targets is not None:
        raise CkptError(f"{where}: target_modules must be a list of module names or one pattern")
    for field_name in ("rank_pattern", "alpha_pattern"):
        patterns = config.get(field_name) or {}
        if not isinstance(patterns, dict):
            raise CkptError(f"{where}: {field_name} must be an object")
        for key in patterns:
            check_file_pattern(key, f"{where}: {field_name}")


def _number(config: dict, key: str, where: str, default=None) -> float:
    value = config.get(key, default)
    # an int beyond a float's range (JSON allows 1e400 written out) is no rank or alpha either
    if isinstance(value, bool) or not isinstance(value, (int, float)) or abs(value) > 1e300 \
            or not math.isfinite(value) or value <= 0:
        raise CkptError(f"{where}: {key} {str(value)[:40]} is not a positive number")
    return value


def _read_peft(folder: str, given: str) -> Adapter:
    config_path = os.path.join(folder, PEFT_CONFIG)
    if not os.path.isfile(config_path):
        raise CkptError(f"{given}: no {PEFT_CONFIG} in this folder; a PEFT adapter folder holds it beside "
                        f"adapter_model.safetensors (or give a kohya-style .safetensors file)")
    config = _read_json(config_path)
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise CkptError(f"{config_path}: peft_type {peft_type!r} is not supported; only LORA adapters fold "
                        f"into the base weights here")
    for key, what in UNSUPPORTED.items():
        if config.get(key):
            raise CkptError(f"{config_path}: {what}, which folding as W + scale·B·A would get wrong; "
                            f"not supported (merge it with peft's merge_and_unload)")
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(RESIDUAL_INITS):
        raise CkptError(f"{config_path}: init_lora_weights {init!r} changes the base weights at the start of "
                        f"training; convert the adapter with peft's save_pretrained(..., "
                        f"path_initial_model_for_weight_conversion=...) first")
    if not os.path.isdir(given):  # a file named: exactly that one (open_checkpoint says if it is missing)
        weights = [given]
    else:
        weights = [os.path.join(folder, name) for name in PEFT_WEIGHTS if os.path.isfile(os.path.join(folder, name))]
    if not weights:
        raise CkptError(f"{folder}: holds {PEFT_CONFIG} but neither {' nor '.join(PEFT_WEIGHTS)}")
    ckpt = open_checkpoint(weights[0])
    try:
        adapter = _peft_modules(ckpt, config, config_path)
        adapter.path = given  # the folder (or file) the user named
        return adapter
    except BaseException:
        ckpt.close()
        raise


def _peft_modules(ckpt: Checkpoint, config: dict, config_path: str) -> Adapter:
    where = ckpt.path
    r_default = _number(config, "r", config_path, 8)
    alpha_default = _number(config, "lora_alpha", config_path, 8)
    _check_config(config, config_path)
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    rslora = bool(config.get("use_rslora"))
    fan_in_fan_out = bool(config.get("fan_in_fan_out"))
    parts: dict[tuple[str, str], dict[str, TensorRef]] = {}  # (module, layout) -> {"A", "B", "bias"}
    adapter_names, replaced = set(), OrderedDict()
    for key, t in ckpt.tensors.items():
        short = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        m = _PEFT_LINEAR.fullmatch(short)
        layout = "linear"
        if m is None:
            m = _PEFT_EMBEDDING.fullmatch(short)
            layout = "embedding"
        if m is None:
            if "lora_" in short or "trainable_tokens" in short:
                raise CkptError(f"{where}: {key}: a kind of adapter weight not supported here (DoRA magnitudes, "
                                f"LoRA variants, trainable tokens); nothing was written")
            # modules_to_save, trained biases, and the base layer peft saves beside an adapted
            # embedding or lm_head (`save_embedding_layers`): they replace the base's tensor
            # (older files keep modules_to_save under `<module>.modules_to_save.<adapter>.`)
            replaced[re.sub(r"\.modules_to_save\.[^.]+\.", ".", short.replace(".base_layer.", "."))] = t
            continue
        if m["adapter"]:
            adapter_names.add(m["adapter"])
        slot = m["ab"] if m.groupdict().get("param", "weight") == "weight" else f"{m['ab']}-bias"
        found = parts.setdefault((m["module"], layout), {})
        if slot in found:  # `lin.lora_A.weight` beside `lin.lora_A.default.weight`: which one?
            raise CkptError(f"{where}: module {m['module']} has two {slot.replace('-', ' ')} weights (with and "
                            f"without an adapter name); save one adapter per file")
        found[slot] = t
    if len(adapter_names) > 1:
        raise CkptError(f"{where}: holds several adapters ({', '.join(sorted(adapter_names))}); save each on "
                        f"its own and give one --lora per adapter")
    modules = []
    for (name, layout), found in parts.items():
        if "A" not in found or "B" not in found:
            missing = "lora_A" if "A" not in found else "lora_B"
            raise CkptError(f"{where}: module {name} has no {missing.replace('lora_', 'lora_embedding_') if layout == 'embedding' else missing} weight")
        if "A-bias" in found:
            raise CkptError(f"{where}: module {name}: lora_A has a bias, which peft never makes")
        if _targets(config, name) is False:
            raise CkptError(f"{where}: holds weights for {name}, which target_modules in {config_path} does not "
                            f"select (peft would ignore them); fix the config or the file")
        r_key = pattern_key(rank_pattern, name)
        a_key = pattern_key(alpha_pattern, name)
        r = _number(rank_pattern, r_key, config_path) if r_key is not None else r_default
        alpha = _number(alpha_pattern, a_key, config_path) if a_key is not None else alpha_default
        a, b = found["A"], found["B"]
        if layout == "linear" and len(a.shape) > 2:
            layout = "conv"
        elif layout == "linear" and fan_in_fan_out:
            layout = "linear-t"
        if not a.shape or a.shape[0] != r:
            raise CkptError(f"{where}: module {name}: lora_A has rank {a.shape[0] if a.shape else 0} but {config_path} gives r={r:g} "
                            f"(rank_pattern); the file and its config disagree")
        scale = alpha / math.sqrt(r) if rslora else alpha / r
        modules.append(Module(name, a, b, scale, layout, bias=found.get("B-bias")))
    return Adapter(ckpt.path, "peft", modules, replaced, config, [ckpt])


def _read_kohya(path: str) -> Adapter:
    ckpt = open_checkpoint(path)
    try:
        return _kohya_modules(ckpt)
    except BaseException:
        ckpt.close()
        raise


def _kohya_modules(ckpt: Checkpoint) -> Adapter:
    where = ckpt.path
    parts: dict[str, dict[str, TensorRef]] = OrderedDict()
    for key, t in ckpt.tensors.items():
        m = _KOHYA_KEY.fullmatch(key)
        if m is None:
            if key.startswith(PEFT_PREFIX) and ".lora_" in key:
                raise CkptError(f"{where}: a PEFT adapter's weights (key {key}); give the folder holding them and "
                                f"its {PEFT_CONFIG}")
            if key.startswith(("lora_unet_", "lora_te")):
                raise CkptError(f"{where}: {key}: a kind of weight not supported here (LyCORIS LoHa/LoKr, "
                                f"lora_mid, DoRA scales); only lora_down/lora_up/alpha fold")
            raise CkptError(f"{where}: key {key} is neither a kohya-style LoRA key (lora_unet_…/lora_te_… with "
                            f"lora_down/lora_up/alpha) nor part of a PEFT adapter folder")
        parts.setdefault(m["module"], {})[m["part"]] = t
    if not parts:
        raise CkptError(f"{where}: holds no LoRA weights")
    modules = []
    for name, found in parts.items():
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
        modules.append(Module(name, a, b, alpha / rank, "conv" if len(a.shape) > 2 else "linear"))
    return Adapter(ckpt.path, "kohya", modules, checkpoints=[ckpt])


def _scalar(t: TensorRef, where: str) -> float:
    from ..io.tensors import values

    if t.numel != 1 or not t.dtype.floating and t.dtype.kind != "int":
        raise CkptError(f"{where}: expected one number, found a {t.dtype.name} tensor of shape {list(t.shape)}")
    value = float(values(t)[0])
    if not math.isfinite(value):
        raise CkptError(f"{where}: {value} is not a finite number")
    return value


# ---- matching adapter modules with base keys ---------------------------------------------------

MAX_PREFIX_DEPTH = 64  # tails of a name below this many levels only: real module names have ~15


def _suffixes(name: str) -> list[str]:
    """`a.b.c` -> [`b.c`, `c`]: the dotted tails of a name, those at most MAX_PREFIX_DEPTH dots
    deep (so that a hostile name of 40 000 dots is not 40 000 copies of itself)."""
    if name.count(".") > MAX_PREFIX_DEPTH:
        return []
    return [name[i + 1:] for i, c in enumerate(name) if c == "."]


class _PeftResolver:
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
                for tail in _suffixes(key):
                    self._tails.setdefault(tail, []).append(key)
        return self._tails

    def __call__(self, wanted: str) -> str | None:
        if wanted in self.keys:
            return wanted
        found = [(k, ("added", k[: -len(wanted)])) for k in sorted(self.tails().get(wanted, []))]
        found += [(t, ("removed", wanted[: -len(t)])) for t in _suffixes(wanted) if t in self.keys]
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


class _KohyaResolver:
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
            for tail in _suffixes(module):
                self.tail.setdefault(tail.replace(".", "_"), []).append(module)

    def __call__(self, name: str) -> str | None:
        body = name[_KOHYA_PREFIX.match(name).end():]  # every kohya module name starts so (_KOHYA_KEY)
        found = self.whole.get(body) or self.tail.get(body, [])
        if len(found) > 1:
            raise CkptError(f"{name} could be any of the base's modules {', '.join(sorted(found)[:8])}"
                            f"{' …' if len(found) > 8 else ''}; fold into a base that holds one of them only "
                            f"(e.g. the component's own checkpoint), or rename the base")
        return f"{found[0]}.weight" if found else None


# ---- folding -----------------------------------------------------------------------------------

def delta(module: Module, shape: tuple[int, ...], wide, layout: str | None = None):
    """ΔW of one module (without its scale), in dtype `wide`, shaped like the base weight."""
    from ..io.tensors import as_torch

    layout = layout or module.layout
    a = as_torch(module.a).to(wide)
    b = as_torch(module.b).to(wide)
    if layout in ("embedding", "linear-t"):
        return (b @ a).T
    if layout == "conv" or a.dim() != 2 or b.dim() != 2:
        return (b.flatten(1) @ a.flatten(1)).reshape(shape)
    return b @ a


def _orientation(module: Module, base: TensorRef) -> str | None:
    """linear or linear-t where a 2-D weight's shape tells (it is not square), else None."""
    a, b = module.a.shape, module.b.shape
    if module.layout not in ("linear", "linear-t") or len(a) != 2 or len(b) != 2 or a[1] == b[0]:
        return None
    return {(b[0], a[1]): "linear", (a[1], b[0]): "linear-t"}.get(tuple(base.shape))


def _square_layouts(modules: list[tuple[Module, TensorRef]], config_says: bool) -> dict[str, str]:
    """The layout of each square linear weight, which its shape cannot tell. peft decides by the
    module's class — transformers' Conv1D transposed, nn.Linear not — and rewrites the config's
    fan_in_fan_out as it goes (the saved value is the last module's). So: what the adapter's
    other weights show (its siblings under the same parent first, then those of the same name,
    then all of them; see `_evidence`) when they agree; the config where no weight shows
    anything; nn.Linear's where the nearest evidence disagrees."""
    seen: dict[tuple, set[str]] = {}
    for module, base in modules:
        layout = _orientation(module, base)
        if layout:
            for evidence in _evidence(module.name):
                seen.setdefault(evidence, set()).add(layout)
    out = {}
    for module, base in modules:
        a, b = module.a.shape, module.b.shape
        if module.layout not in ("linear", "linear-t") or len(a) != 2 or len(b) != 2 or a[1] != b[0]:
            continue
        same = next((seen[e] for e in _evidence(module.name) if e in seen), None)
        if not same:
            out[module.name] = "linear-t" if config_says else "linear"
        else:
            out[module.name] = next(iter(same)) if len(same) == 1 else "linear"
    return out


def _evidence(name: str) -> list[tuple]:
    """Where a module's class shows, nearest first: its siblings (GPT-2's attn.c_attn for
    attn.c_proj), modules of its own name elsewhere (mlp.c_proj), then every module."""
    parent, _, leaf = name.rpartition(".")
    return [("parent", parent), ("name", leaf), ("all",)]


def _check_shapes(adapter: Adapter, module: Module, key: str, base: TensorRef, square: str | None = None) -> str:
    """The factors must make exactly the base weight's shape, checked before anything is written.
    Returns the layout that makes it (linear or linear-t decided by the shape where it can)."""
    a, b = tuple(module.a.shape), tuple(module.b.shape)
    where = f"{adapter.path}: {module.name}"
    if not (module.a.dtype.floating and module.b.dtype.floating):
        raise CkptError(f"{where}: LoRA factors of dtype {module.a.dtype.name}/{module.b.dtype.name}; "
                        f"expected floating point")
    if not base.dtype.floating or not base.is_plain:
        raise CkptError(f"{where}: the base's {key} is {base.dtype.name}; a LoRA folds into floating-point "
                        f"weights only")
    if len(a) < 2 or len(b) < 2 or b[1] != a[0]:
        grouped = " (a grouped conv? peft cannot merge those either)" if len(b) > 2 else ""
        raise CkptError(f"{where}: lora_B {list(b)} does not follow lora_A {list(a)}{grouped}")
    made, layout = None, module.layout
    if layout in ("linear", "linear-t") and len(a) == len(b) == 2:
        # peft transposes for transformers' Conv1D ([in, out]) and never for nn.Linear, whatever
        # fan_in_fan_out says: the base's shape tells which, except for a square weight
        if a[1] != b[0]:
            layout = "linear-t" if tuple(base.shape) == (a[1], b[0]) else "linear"
        elif square:
            layout = square
    if layout in ("embedding", "linear-t"):
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


def _folded(base: TensorRef, steps: list[tuple], dtype) -> TensorRef:
    """`base` with `steps` applied in order: ("delta", module, factor) adds factor·ΔW, ("bias",
    vector, factor) adds factor·vector, ("replace", tensor) takes the tensor's values."""

    def make():
        import torch

        from ..io.tensors import as_torch, to_bytes

        wide = torch.float64 if base.dtype.name == "float64" else torch.float32
        out = as_torch(base).to(wide, copy=True)
        for step in steps:
            if step[0] == "replace":
                out = as_torch(step[1]).to(wide, copy=True)
            elif step[0] == "bias":
                out.add_(as_torch(step[1]).to(wide), alpha=step[2])
            else:
                out.add_(delta(step[1], base.shape, wide, step[3]), alpha=step[2])
        return to_bytes(out.to(getattr(torch, dtype.name)))  # rounded once, to what is written

    return computed_tensor(base.shape, dtype, make)


def fold(base: Checkpoint, adapters: list[tuple[Adapter, float]], *,
         allow_unmatched: bool = False, cast=None) -> tuple[OrderedDict, dict]:
    """The base's state dict with every adapter folded in, in the given order, each with its
    scale S (W' = W + S·scale·ΔW). Untouched tensors are the base's own (no copy). Names tied in
    the base (one storage) get the sum of the deltas aimed at any of them and stay tied — as
    peft's in-place merge into a shared parameter does. `cast`: the dtype a folded tensor is
    written in (default its own), so it is rounded once. Returns (tensors, report details)."""
    tensors = base.tensors
    groups: dict[tuple, list[str]] = {}  # tied names: one view of one storage
    for name, t in tensors.items():
        groups.setdefault(t.view_key(), []).append(name)
    steps: dict[str, list[tuple]] = OrderedDict()  # first name of a tie group -> its steps
    owner = {name: names[0] for names in groups.values() for name in names}
    reports = []
    all_unmatched: list[str] = []
    for adapter, scale in adapters:
        resolve = _PeftResolver(list(tensors)) if adapter.format == "peft" else _KohyaResolver(list(tensors))
        folded, unmatched, found = set(), [], []
        claimed: dict[str, str] = {}  # base key -> the adapter's module folded into it
        for module in adapter.modules:
            key = resolve(f"{module.name}.weight") if adapter.format == "peft" else resolve(module.name)
            if key is None:
                unmatched.append(module.name)
                continue
            if key in claimed:  # lora_te1_x and lora_te2_x on one text encoder: twice the delta
                raise CkptError(f"{adapter.path}: {claimed[key]} and {module.name} both fold into the base's "
                                f"{key}; fold into the component each was made for")
            claimed[key] = module.name
            found.append((module, key))
        square = _square_layouts([(m, tensors[k]) for m, k in found], bool(adapter.config.get("fan_in_fan_out")))
        for module, key in found:
            layout = _check_shapes(adapter, module, key, tensors[key], square.get(module.name))
            steps.setdefault(owner[key], []).append(("delta", module, scale * module.scale, layout))
            folded.add(key)
            if module.bias is not None:
                bias_key = key[: -len("weight")] + "bias"
                target = tensors.get(bias_key)
                if target is None or target.shape != module.bias.shape or not target.dtype.floating:
                    raise CkptError(f"{adapter.path}: {module.name} has a LoRA bias (lora_bias) but the base has no "
                                    f"matching floating {bias_key}")
                steps.setdefault(owner[bias_key], []).append(("bias", module.bias, scale * module.scale))
                folded.add(bias_key)
        replaced = []
        for name, t in adapter.replaced.items():
            key = resolve(name)
            if key is None:
                unmatched.append(name)
                continue
            target = tensors[key]
            if t.shape != target.shape or not (t.dtype.floating and target.dtype.floating):
                raise CkptError(f"{adapter.path}: {name} {list(t.shape)} {t.dtype.name} cannot replace the base's "
                                f"{key} {list(target.shape)} {target.dtype.name}")
            if t.dtype is target.dtype and tensor_sha256(t) == tensor_sha256(target):
                continue  # the base's own values (peft saves the base embedding layer as it was)
            steps.setdefault(owner[key], []).append(("replace", t))
            replaced.append(key)
        prefix = resolve.check(adapter.path) if adapter.format == "peft" else None
        if unmatched and not allow_unmatched:
            shown = ", ".join(unmatched[:8]) + (f" … (+{len(unmatched) - 8})" if len(unmatched) > 8 else "")
            raise CkptError(f"{adapter.path}: {len(unmatched)} LoRA weight(s) match no weight of {base.path}: "
                            f"{shown} (is it the right base? --allow-unmatched folds the rest)")
        all_unmatched += unmatched
        reports.append({"path": adapter.path, "format": adapter.format, "scale": scale,
                        "modules": len(adapter.modules), "folded": len(folded), "replaced": replaced,
                        "unmatched": unmatched, **({"prefix": prefix} if prefix else {})})
    out: OrderedDict[str, TensorRef] = OrderedDict()
    made: dict[str, TensorRef] = {}
    for name, t in tensors.items():
        first = owner[name]
        if first in steps:
            if first not in made:
                made[first] = _folded(tensors[first], steps[first], cast or tensors[first].dtype)
            out[name] = made[first]
        else:
            out[name] = t
    changed = [name for name in tensors if owner[name] in steps]
    return out, {"adapters": reports, "folded": len(changed), "changed": changed, "unmatched": all_unmatched}


def parse_scales(scales: list[float] | None, count: int) -> list[float]:
    """--lora-scale: none (1 each), one (for every --lora), or one per --lora in order."""
    if not scales:
        return [1.0] * count
    if count == 0:
        raise UsageError("--lora-scale applies to --lora only")
    values = [float(s) for s in scales]
    if not all(math.isfinite(v) for v in values):
        raise UsageError("--lora-scale must be a finite number")
    if len(values) == 1:
        return values * count
    if len(values) != count:
        raise UsageError(f"--lora-scale given {len(values)} times for {count} --lora: give it once (for all) "
                         f"or once per --lora, in the same order")
    return values


# ---- extracting --------------------------------------------------------------------------------

# Module names (the last part) of embedding tables: a 2-D weight whose rows are looked up, not a
# matrix applied to inputs; peft adapts them with lora_embedding_A/B.
EMBEDDING_NAMES = frozenset({
    "embed_tokens", "wte", "wpe", "word_embeddings", "position_embeddings", "token_type_embeddings",
    "embeddings", "embedding", "shared", "embed_in", "tok_embeddings", "embed_positions", "embed", "emb",
    "tok_emb", "pos_emb", "word_emb", "token_embedding", "position_embedding", "relative_attention_bias",
})


def is_embedding(module: str) -> bool:
    return module.rsplit(".", 1)[-1] in EMBEDDING_NAMES


def parse_ranks(ranks: list[str] | list | int | None) -> tuple[int, list[tuple[str, int]]]:
    """`--rank 16 --rank 'attn*=32'` -> (16, [("attn*", 32)]): one default and any number of
    PATTERN=R; a weight takes the rank of the last pattern that selects its key."""
    if isinstance(ranks, int) and not isinstance(ranks, bool):
        ranks = [str(ranks)]
    default, patterns = None, []
    for text in ranks or []:
        text = str(text)
        pattern, sep, value = text.rpartition("=")
        try:
            rank = int(value)
        except ValueError:
            raise UsageError(f"--rank {text!r}: expected R or PATTERN=R with R a whole number") from None
        if rank < 1:
            raise UsageError(f"--rank {text!r}: a rank must be 1 or more")
        if sep:
            if not pattern:
                raise UsageError(f"--rank {text!r}: an empty pattern selects nothing")
            core.compile_pattern(pattern)
            patterns.append((pattern, rank))
        elif default is not None:
            raise UsageError(f"--rank given twice without a pattern ({default} and {rank}): give one default")
        else:
            default = rank
    if default is None:
        raise UsageError("--rank R is required (the default rank; PATTERN=R overrides it for some weights)")
    return default, patterns


def _differs(a: TensorRef, b: TensorRef) -> bool:
    if a.dtype is b.dtype and a.is_contiguous and b.is_contiguous:
        return a.data() != b.data()
    import torch

    from ..io.tensors import as_torch

    x, y = as_torch(a), as_torch(b)
    common = torch.promote_types(x.dtype, y.dtype)  # never through float: complex stays complex
    return not torch.equal(x.to(common), y.to(common))


def _peft_pattern_keys(modules: list[str], ranks: dict[str, int], default: int) -> dict[str, str]:
    """Module -> its rank_pattern key: its own name where peft's tail matching then gives every
    module its rank, else (a name that is a dotted tail of another's) the name anchored and
    escaped, which selects that module only."""
    # a name with characters a regular expression reads otherwise is anchored and escaped too
    keys = {m: m if re.escape(m).replace("\\.", ".") == m else "^" + re.escape(m) for m in modules if ranks[m] != default}

    def rank_peft_gives(m: str, keys: dict[str, str]) -> int:
        rank_of = {k: ranks[module] for module, k in keys.items()}
        key = pattern_key(rank_of, m)
        return default if key is None else rank_of[key]

    if any(rank_peft_gives(m, keys) != ranks[m] for m in modules):
        keys = {m: "^" + re.escape(m) for m in keys}
    return keys


def extract_lora(base: str, tuned: str, output: str, *, rank: list[str] | int = 8, embeddings: bool = False,
                 fan_in_fan_out: list[str] | None = None, root: str | None = None, force: bool = False,
                 dry_run: bool = False, progress: ProgressFactory | None = None,
                 metadata: dict[str, str] | None = None) -> dict:
    """A PEFT adapter folder at `output` (adapter_config.json + adapter_model.safetensors) whose
    fold into BASE approximates TUNED: a truncated SVD of TUNED − BASE per 2-D (linear) and conv
    weight, and per embedding with `embeddings`. `fan_in_fan_out`: patterns of the 2-D weights
    stored [in, out], as transformers' Conv1D stores them (GPT-2's c_attn, c_proj, c_fc) — a
    state dict does not record a module's class. Written whole or not at all (a staged folder).
    `metadata`: entries of adapter_model.safetensors' metadata; the adapter carries none of
    BASE's or TUNED's (their title, architecture or hashes describe a whole model, not a difference)."""
    default, patterns = parse_ranks(rank)
    metadata = core.check_metadata(metadata or {}, "metadata")
    transposed = [core.compile_pattern(p) for p in fan_in_fan_out or []]
    from ..io.write import StagedOutputs, check_parent

    _check_folder(output, force)
    with open_checkpoint(base, root) as b, open_checkpoint(tuned, root) as t:
        for pattern in [p for p, _ in patterns] + list(fan_in_fan_out or []):
            core.select(b.tensors, [pattern])  # a pattern selecting nothing is a typo: said loudly
        matchers = [(core.compile_pattern(p), r) for p, r in patterns]
        only_base = [k for k in b.tensors if k not in t.tensors]
        only_tuned = [k for k in t.tensors if k not in b.tensors]
        groups: dict[tuple, list[str]] = {}
        for name, tb in b.tensors.items():
            groups.setdefault(tb.view_key(), []).append(name)
        plan, not_extracted, unchanged, tied = [], [], 0, {}
        for names in groups.values():
            shared = [n for n in names if n in t.tensors]
            # names tied in both: one difference, extracted once; tied in BASE only: each its own
            tied_too = len({t.tensors[n].view_key() for n in shared}) == 1
            if not tied_too:  # a LoRA folded into one of them changes them all, in BASE's one storage
                for n in shared:
                    if _differs(b.tensors[n], t.tensors[n]):
                        not_extracted.append({"name": n, "reason": f"tied in BASE to {', '.join(x for x in names if x != n)} "
                                                                   f"but not in TUNED: no LoRA can change one alone"})
                    else:
                        unchanged += 1
                continue
            for group in [shared] if shared else []:
                key = _choose(group, embeddings)
                tb, tt = b.tensors[key], t.tensors[key]
                if tb.shape != tt.shape:
                    not_extracted.append({"name": key, "reason": f"shape differs: {list(tb.shape)} in BASE, "
                                                                 f"{list(tt.shape)} in TUNED"})
                    continue
                if not (tb.dtype.floating and tt.dtype.floating and tb.is_plain and tt.is_plain):
                    if _differs(tb, tt):
                        not_extracted.append({"name": key, "reason": f"not floating point ({tb.dtype.name})"})
                    else:
                        unchanged += 1
                    continue
                if not _differs(tb, tt):
                    unchanged += 1
                    continue
                for other in group:
                    if other != key:
                        tied[other] = key
                kind = _kind(key, tb.shape, embeddings)
                if kind == "linear" and any(match(key) for match in transposed):
                    kind = "linear-t"  # [in, out]: factored as its transpose, peft's fan_in_fan_out
                if kind not in ("linear", "linear-t", "conv", "embedding"):
                    not_extracted.append({"name": key, "reason": kind})
                    continue
                want = default
                for match, r in matchers:
                    if match(key):
                        want = r
                rows, cols = ((tb.shape[1], tb.shape[0]) if kind in ("embedding", "linear-t")
                              else (tb.shape[0], math.prod(tb.shape[1:])))
                plan.append({"name": key[: -len(".weight")], "key": key, "kind": kind, "shape": list(tb.shape),
                             "rank": min(want, rows, cols), "requested_rank": want,
                             "clamped": want > min(rows, cols), "error": None})
        if not plan and not dry_run:
            raise CkptError(f"{tuned}: no 2-D or conv weight differs from {base}; nothing to extract"
                            + (f" (not extracted: {', '.join(n['name'] for n in not_extracted[:8])})" if not_extracted else ""))
        modules = [p["name"] for p in plan]
        ranks = {p["name"]: p["rank"] for p in plan}
        r = default
        pattern_keys = _peft_pattern_keys(modules, ranks, r)
        rank_pattern = {pattern_keys[m]: ranks[m] for m in modules if ranks[m] != r}
        config = {
            "alpha_pattern": dict(rank_pattern), "base_model_name_or_path": None, "bias": "none",
            # peft sets it per module from the module's class anyway; saved true only when every
            # linear weight is stored [in, out], so that peft has nothing to warn about
            "fan_in_fan_out": any(p["kind"] == "linear-t" for p in plan)
                              and not any(p["kind"] == "linear" for p in plan),
            "inference_mode": True, "init_lora_weights": True, "lora_alpha": r,
            "lora_dropout": 0.0, "modules_to_save": None, "peft_type": "LORA", "r": r, "rank_pattern": rank_pattern,
            "target_modules": modules, "task_type": None, "use_dora": False, "use_rslora": False,
        }
        weights_name = PEFT_WEIGHTS[0]
        report = {
            "base": base, "tuned": tuned, "output": output,
            "files": [os.path.join(output, PEFT_CONFIG), os.path.join(output, weights_name)],
            "dry_run": dry_run, "rank": default, "rank_patterns": dict(patterns), "embeddings": embeddings,
            "fan_in_fan_out": list(fan_in_fan_out or []),
            "extracted": plan, "not_extracted": not_extracted, "tied": tied, "unchanged": unchanged,
            "only_in_base": only_base, "only_in_tuned": only_tuned,
            "metadata": dict(sorted({**metadata, core.METADATA_FORMAT_KEY: "pt"}.items())),
        }
        factors = OrderedDict()
        svd = _SvdCache(b, t, plan)
        for p in plan:
            prefix = f"{PEFT_PREFIX}{p['name']}."
            shape = p["shape"]
            k = p["rank"]
            if p["kind"] == "embedding":  # peft: lora_embedding_A [r, vocab], lora_embedding_B [dim, r]
                a_shape, b_shape, a_name, b_name = (k, shape[0]), (shape[1], k), "lora_embedding_A", "lora_embedding_B"
                suffix = ""
            elif p["kind"] == "linear-t":  # W [in, out]: A [r, in], B [out, r], ΔW = (B·A)ᵀ
                a_shape, b_shape, a_name, b_name, suffix = (k, shape[0]), (shape[1], k), "lora_A", "lora_B", ".weight"
            else:
                a_shape = (k, *shape[1:])
                b_shape = (shape[0], k, *([1] * (len(shape) - 2)))
                a_name, b_name, suffix = "lora_A", "lora_B", ".weight"
            dtype = _factor_dtype(b.tensors[p["key"]], t.tensors[p["key"]])
            factors[f"{prefix}{a_name}{suffix}"] = computed_tensor(a_shape, dtype, svd.maker(p, "A", dtype))
            factors[f"{prefix}{b_name}{suffix}"] = computed_tensor(b_shape, dtype, svd.maker(p, "B", dtype))
        if dry_run:
            return report
        check_parent(output)
        holder = Checkpoint(path=output, format="safetensors", tensors=factors, root="")
        with StagedOutputs() as outputs:
            folder = outputs.stage_folder(output)
            write_checkpoint(holder, factors, os.path.join(folder, weights_name), progress=progress,
                             metadata=metadata)
            with open(os.path.join(folder, PEFT_CONFIG), "w", encoding="utf-8") as f:
                f.write(json.dumps(config, indent=2, sort_keys=True) + "\n")
        return report


def _choose(group: list[str], embeddings: bool) -> str:
    """Of names tied together, the one to extract the shared difference for: the first that
    can be expressed (lm_head, a linear layer, before a tied embedding unless --embeddings)."""
    for name in group:
        if name.endswith(".weight") and not (is_embedding(name[: -len(".weight")]) and not embeddings):
            return name
    return group[0]


def _kind(key: str, shape: tuple[int, ...], embeddings: bool) -> str:
    """linear, conv, embedding — or why the weight's difference cannot be a LoRA."""
    if len(shape) < 2 or len(shape) > 5:
        return f"{len(shape)}-D: a LoRA adapts 2-D and conv weights only"
    if not key.endswith(".weight"):
        return "not a layer's weight (a LoRA adapts the .weight of a layer)"
    module = key[: -len(".weight")]
    if len(shape) == 2 and is_embedding(module):
        return "embedding" if embeddings else "embedding (pass --embeddings to extract it as lora_embedding_A/B)"
    if 0 in shape:
        return "empty"
    return "linear" if len(shape) == 2 else "conv"


def _factor_dtype(a: TensorRef, b: TensorRef):
    """Factors are written in float32 (float64 when both inputs are), whatever the weights'
    dtype: their error is then the SVD's alone."""
    from ..dtypes import by_name

    return by_name("float64" if a.dtype.name == b.dtype.name == "float64" else "float32")


class _SvdCache:
    """One SVD per weight, made when its A is written and kept until its B is."""

    def __init__(self, base: Checkpoint, tuned: Checkpoint, plan: list[dict]):
        self.base, self.tuned = base, tuned
        self.done: dict[str, dict] = {}

    def factors(self, p: dict):
        import torch

        from ..io.tensors import as_torch

        if p["key"] in self.done:
            return self.done[p["key"]]
        tb, tt = self.base.tensors[p["key"]], self.tuned.tensors[p["key"]]
        wide = torch.float64 if tb.dtype.name == tt.dtype.name == "float64" else torch.float32
        d = as_torch(tt).to(wide) - as_torch(tb).to(wide)
        if not bool(torch.isfinite(d).all()):
            raise CkptError(f"{p['key']}: TUNED − BASE holds NaN or infinite values; cannot extract a LoRA")
        matrix = d.T if p["kind"] in ("embedding", "linear-t") else d.reshape(d.shape[0], -1)
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        k = p["rank"]
        top = float(s[0]) if s.numel() else 0.0  # relative to the largest: s² cannot overflow
        share = (s.double() / top) ** 2 if top > 0 else s.double()
        total = float(share.sum())
        p["error"] = math.sqrt(float(share[k:].sum()) / total) if total > 0 else 0.0
        root = s[:k].sqrt()
        a = root[:, None] * vh[:k]  # √S·Vh  [r, in]
        b = u[:, :k] * root[None, :]  # U·√S  [out, r]
        dtype = torch.float64 if tb.dtype.name == tt.dtype.name == "float64" else torch.float32
        if not (bool(torch.isfinite(a.to(dtype)).all()) and bool(torch.isfinite(b.to(dtype)).all())):
            raise CkptError(f"{p['key']}: its LoRA factors do not fit in {str(dtype)[6:]} (TUNED − BASE near the "
                            f"dtype's largest values); cannot extract it")
        self.done[p["key"]] = {"A": a, "B": b}
        return self.done[p["key"]]

    def maker(self, p: dict, which: str, dtype):
        def make():
            import torch

            from ..io.tensors import to_bytes

            made = self.factors(p)
            value = made.pop(which)
            if not made:
                del self.done[p["key"]]
            return to_bytes(value.to(getattr(torch, dtype.name)).contiguous())

        return make


def _check_folder(output: str, force: bool) -> None:
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
