"""What every operation returns: a typed report. `--json` prints `report.to_json()`, the fields in
the order they are declared here (a field marked `omit_if_none` is left out when it is None).
Every field's `doc` is the schema CI users rely on: docs/json.md is generated from this module
(`python -m ckptsurgery.ops.reports`) and a test holds the page to it.

An operation returns its report once the work is done; nothing fills one during a write (what a
merge's tensors note about themselves is read from them afterwards)."""

from __future__ import annotations

from collections.abc import Sequence
from abc import abstractmethod
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from typing import Any


def entry(doc: str, *, omit_if_none: bool = False, default: Any = MISSING, factory: Any = MISSING):
    """A report field with its documentation (`doc`) and whether None leaves it out of --json."""
    if default is MISSING and factory is MISSING and omit_if_none:
        default = None
    return field(default=default, default_factory=factory,
                 metadata={"doc": doc, "omit_if_none": omit_if_none})


class Records(Sequence):
    """A report's list of records, each made when it is read: `inspect --json` of 100,000 tensors
    prints them one at a time (cli.common.print_json) instead of holding 100,000 dicts (~35 MB).
    Equal to the list of them, and made into it by `to_json()`. A subclass says how many
    (`__len__`) and makes record `i` (`record`)."""

    @abstractmethod
    def record(self, i: int) -> dict:
        """Record i (0 ≤ i < len): a fresh dict each time it is read."""

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self.record(j) for j in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError("record index out of range")
        return self.record(i % len(self))

    def __iter__(self):
        return map(self.record, range(len(self)))

    def __eq__(self, other) -> bool:
        return isinstance(other, (list, Records)) and len(self) == len(other) and list(self) == list(other)

    __hash__ = None

    def __repr__(self) -> str:
        return repr(list(self))


def _plain(value: Any, lazy: bool = False) -> Any:
    if is_dataclass(value):
        return value.to_json()
    if isinstance(value, Records):
        return value if lazy else list(value)
    if isinstance(value, list):
        return [_plain(v) for v in value] if value and is_dataclass(value[0]) else value
    return value


# Every report class is made with `init=False, repr=False, eq=False`: the base's generic `__init__`,
# `__repr__` and `__eq__` serve them all. Generated ones (compiled per class) were most of what
# importing this module cost, and every command imports it: it is start-up. A report is made once
# per command, so the generic `__init__`'s loop costs nothing that shows.
_report = dataclass(kw_only=True, init=False, repr=False, eq=False)


@_report
class Report:
    """The base of every report: `to_json()` is the --json document."""

    def __init__(self, **given) -> None:
        for f in fields(self):
            if f.name in given:
                value = given.pop(f.name)
            elif f.default is not MISSING:
                value = f.default
            elif f.default_factory is not MISSING:
                value = f.default_factory()
            else:
                raise TypeError(f"{type(self).__name__}() missing keyword argument: {f.name!r}")
            setattr(self, f.name, value)
        if given:
            raise TypeError(f"{type(self).__name__}() got unexpected keyword arguments: {', '.join(map(repr, given))}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{f.name}={getattr(self, f.name)!r}' for f in fields(self))})"

    def __eq__(self, other) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return all(getattr(self, f.name) == getattr(other, f.name) for f in fields(self))

    __hash__ = None  # mutable, compared by value: as a dataclass with eq=True

    def to_json(self, lazy: bool = False) -> dict:
        """The --json document; `lazy`: `Records` left as they are, for print_json to write one by one."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None and f.metadata.get("omit_if_none"):
                continue
            out[f.name] = _plain(value, lazy)
        return out

    @classmethod
    def extend(cls, report: "Report", /, **more):
        """This report kind made of `report`'s fields (a report of a base class) and `more`."""
        return cls(**{**{f.name: getattr(report, f.name) for f in fields(report)}, **more})


# ---- writing: every command that writes a checkpoint ------------------------------------------

@_report
class Dequantized(Report):
    """What `--dequantize` did to the input's FP8 weights (`WriteReport.dequantized`)."""

    tensors: list[str] = entry("The float8 weights dequantized, by name.")
    dtype: str = entry("The dtype they were written in (`bfloat16` unless `--dtype`).")
    schemes: dict[str, int] = entry("How many were scaled by each scheme: `block` (a `weight_scale_inv` or "
                                    "`weight_scale` grid of blocks), `per-tensor`, `per-channel`.")
    block_size: list[int] | None = entry("The block size [rows, columns] of the `block` scheme.", omit_if_none=True)
    block_size_from: str | None = entry("The config.json that gave the block size (absent: the default, 128×128).",
                                        omit_if_none=True)
    scales_dropped: list[str] = entry("The scale tensors consumed and left out.")
    input_scales_dropped: list[str] = entry("Activation scales (`input_scale`) left out: a dequantized model does "
                                            "not use them.")


@_report
class HfNames(Report):
    """What `--names hf` did to a GGUF input's tensor names (`WriteReport.hf_names`, `InspectReport.hf_names`,
    `DiffReport.hf_names`)."""

    architecture: str = entry("The GGUF file's `general.architecture` (`llama`, `qwen2`, `qwen3`; several inputs': "
                              "each once, comma-separated).")
    renamed: int = entry("Tensors read under their Hugging Face names.")
    unpermuted: list[str] = entry("The q/k projections (Hugging Face names) read with llama.cpp's rotary "
                                  "permutation undone (`llama` only).")
    left_out: list[str] = entry("GGUF tensors with no Hugging Face name (`rope_freqs.weight`), left out.")


@_report
class Fetched(Report):
    """What was fetched from remote inputs (`https://`, `hf://`): `WriteReport.fetched`,
    `InspectReport.fetched`, `DiffReport.fetched`."""

    bytes: int = entry("Bytes received, over every remote file.")
    requests: int = entry("Requests that returned bytes (a range, an index; redirects not counted).")
    files: list[dict] = entry("One record per remote file: `url` (`hf://` paths as given, a URL without its "
                              "query), `size` (its total bytes), `bytes` (received), `requests`.")
    full_downloads: list[str] = entry("Files downloaded whole because their server ignores range requests "
                                      "(`--allow-full-download`).")


@_report
class WriteReport(Report):
    """What `write_checkpoint` wrote (`convert`'s whole report)."""

    input: str | None = entry("The input checkpoint (absent for merge, which names its `sources`).",
                              omit_if_none=True)
    output: str = entry("The output path as given (`-o DIR/`: DIR/model.safetensors; with `--format dcp`, DIR).")
    format: str = entry("The output's format: `torch`, `safetensors` or `dcp`.")
    root: str | None = entry("Where the state dict sat inside the input: a key of a nested .pth, `\"\"` its top "
                             "level, `null` a format with nothing nested (safetensors, shards, DeepSpeed).")
    tensors: int = entry("Number of tensors written (tied names counted each).")
    total_bytes: int = entry("Bytes of tensor data written (a tied tensor once).")
    dtype: str | None = entry("The dtype floating tensors were cast to (`--dtype`), or `null`.")
    kept_dtype: list[str] = entry("Tensors `--dtype` left in their dtype (float8, quantized, integer, bool; in a "
                                  ".pth, floats whose storage also backs those).")
    tied: dict[str, str] = entry("Tied names stored once: alias -> the name that holds the data.")
    extras_left_out: list[str] = entry("Entries outside the state dict (and non-tensor entries in it) that the "
                                       "output cannot hold (safetensors, shards).")
    files: list[str] = entry("Every file written (shards and index included); under torchrun, this rank's.")
    dry_run: bool = entry("Whether nothing was written (`--dry-run`).")
    metadata: dict[str, str] | None = entry("The safetensors metadata written, besides the tie record "
                                            "(`null` for .pth and DCP outputs).")
    metadata_dropped: list[str] = entry("Input metadata keys the output does not carry (content hashes, "
                                        "`--no-metadata`, values that are not text, or all of them for .pth/DCP).")
    metadata_not_text: list[str] | None = entry("Of `metadata_dropped`, the keys whose values are not text (a GGUF "
                                                "file's numbers and arrays, an index's `total_size`), which a "
                                                "safetensors file's metadata cannot hold.", omit_if_none=True)
    shards: int | None = entry("Number of shards, for a sharded output.", omit_if_none=True)
    removed: list[str] = entry("Files of an earlier sharded output at OUT that this write removed (`--force`).",
                               factory=list)
    inert: list[str] | None = entry("Placeholders the output carries over from its input (module.name of each "
                                    "global an unsafe torch.load of it would import; never run here).",
                                    omit_if_none=True)
    needs_force: list[str] | None = entry("`--dry-run` without `--force`: the paths already taken, which the real "
                                          "run would refuse to replace without `--force`.", omit_if_none=True)
    rank: int | None = entry("Under torchrun: this process's rank.", omit_if_none=True)
    world_size: int | None = entry("Under torchrun: the number of ranks.", omit_if_none=True)
    dequantized: Dequantized | None = entry("With `--dequantize`: what was dequantized (see `Dequantized`).",
                                            omit_if_none=True)
    model_folder: dict[str, Any] | None = entry(
        "`convert --dequantize` of a model folder to `-o DIR/`: `config_changes` (the config.json fields set; "
        "`null`: removed, as `quantization_config`), `copied` (the input's files copied: tokenizer, generation, "
        "remote code) and `notes` (what could not be done: a file that links out of its folder).", omit_if_none=True)
    fetched: Fetched | None = entry("With remote inputs: what was fetched (see `Fetched`).", omit_if_none=True)
    hf_names: HfNames | None = entry("With `--names hf`: what was renamed (see `HfNames`).", omit_if_none=True)


@_report
class FilterReport(WriteReport):
    """`filter`: the keys kept."""

    kept: list[str] = entry("Keys kept, in the input's order.")
    left_out: list[str] = entry("Keys of the input not kept.")
    missing_from_input: list[str] = entry("With `--like`: the template's keys the input lacks.")
    shape_mismatched: list[dict] = entry("With `--like --skip-mismatched`: `{name, shape, template_shape}` per key "
                                         "left out because its shape differs from the template's (`null`: not a "
                                         "tensor); without the flag such a key is an error.")
    dtype_mismatched: list[dict] = entry("With `--like`: `{name, dtype, template_dtype}` per key kept in a dtype "
                                         "other than the template's (written as the input has it; "
                                         "`load_state_dict` casts it).")


@_report
class DropReport(WriteReport):
    """`drop`: the keys removed."""

    dropped: list[str] = entry("Keys removed.")
    dropped_outside: list[str] = entry("Top-level entries beside the state dict removed from the written object "
                                       "(`optimizer`), each named by a pattern that selects no key of the state dict "
                                       "(`dropped` lists the state dict's keys removed).")
    kept: list[str] = entry("Keys written.")


@_report
class RenameReport(WriteReport):
    """`rename`: old name -> new name."""

    renamed: dict[str, str] = entry("Old name -> new name, for the keys a rule changed.")
    untouched: list[str] = entry("Keys no rule changed.")


# ---- merge, by mode ----------------------------------------------------------------------------

@_report
class MergeReport(WriteReport):
    """`merge`, every mode."""

    mode: str = entry("`union`, `into`, `method`, `lora` or `recipe`.")
    sources: list[str] = entry("The SOURCE checkpoints, in order.")
    template: str | None = entry("`--into`: the template.", omit_if_none=True)


@_report
class UnionReport(MergeReport):
    """`merge` of several sources' keys."""

    conflicts: list[str] = entry("Keys in more than one source (sorted).")
    on_conflict: str = entry("The `--on-conflict` policy: `error`, `first` or `last`.")
    keys_from: list[int] = entry("Per source, in order: how many keys of the output came from it.")


@_report
class IntoReport(MergeReport):
    """`merge --into TEMPLATE`: every template key under exactly one of copied, renamed, adapted,
    kept_from_template, mismatched; source keys the template lacks under left_out."""

    copied: list[str] = entry("Template keys copied from a source under the same name.")
    renamed: dict[str, str] = entry("Source key -> template key, found after removing a wrapper prefix.")
    adapted: list[dict] = entry("`--on-mismatch adapt`: `{name, rule, from, to}` per adapted key, with `source` "
                                "(when renamed), `prefix_tokens` and `grid` (position embeddings), `tied_to`.")
    kept_from_template: list[str] = entry("Template keys no source supplies (or a head kept): the template's values.")
    kept_reasons: dict[str, str] = entry("Why a key the sources have kept the template's values.")
    mismatched: list[dict] = entry("`{name, source_shape, template_shape, policy}` per shape mismatch.")
    left_out: list[str] = entry("Source keys the template lacks.")


@_report
class MethodReport(MergeReport):
    """`merge --method` (and `--average`)."""

    method: str = entry("The merge method.")
    base: str | None = entry("`--base`, or `null`.")
    parameters: dict[str, Any] = entry("The method's parameters with their defaults filled in; a gradient over the "
                                       "layers as given, a list (`--t 0,0.5,1`: `[0, 0.5, 1]`).")
    layers: int = entry("How many layers the gradients are spread over, found from the key names or "
                        "`--layer-pattern` (0: no gradient given).")
    merged: int = entry("Number of tensors merged by the method.")
    not_merged: list[str] = entry("Tensors taken from the base (or first model): not floating.")
    notes: dict[str, str] = entry("Per tensor, what happened beyond the formula (slerp: `nearly collinear: "
                                  "interpolated linearly`). Empty after `--dry-run`.")


@_report
class RecipeReport(MergeReport):
    """`merge --config RECIPE`: a mergekit recipe; `sources` are the models it names, the base first."""

    recipe: str | None = entry("The recipe file (`null`: a recipe the library was given loaded).")
    merge_method: str = entry("The recipe's `merge_method`, as mergekit names it.")
    method: str = entry("The merge method that ran it, as `--method` names it (`model_stock`: `model-stock`).")
    base: str | None = entry("The recipe's `base_model`, or `null`.")
    layers: int = entry("The output's layer count (0: no layers were told apart, nor needed).")
    merged: int = entry("Tensors the method computes.")
    copied: int = entry("Tensors written as their source holds them (passthrough without `scale`, tensors that are "
                        "not floating: from the base, else the first source).")
    ignored: list[str] = entry("`MODEL:KEY` of the tensors of other models than the reference that the output has "
                               "no place for (mergekit drops them too).")
    plan: list[str] = entry("Per output tensor, in the output's order: `KEY <- method(MODEL:KEY{its own parameters}, "
                            "...) t=T shared parameters`.")
    config_changes: dict[str, Any] = entry("The fields of the reference's config.json set in the output's: the layer "
                                           "count, per-layer lists (`layer_types`), `torch_dtype` (and `dtype`). "
                                           "Empty for a weights file.")
    notes: list[str] = entry("What the recipe holds that changes nothing, and what the folder could not be given "
                             "(no config.json in the reference).")
    tensor_notes: dict[str, str] = entry("Per tensor, what happened beyond the formula (slerp: `nearly collinear: "
                                         "interpolated linearly`). Empty after `--dry-run`.")


@_report
class AdapterFolded(Report):
    """One adapter of `merge --lora`."""

    path: str = entry("The adapter as given.")
    format: str = entry("`peft`, `diffusers` or `kohya` (kohya and LyCORIS files).")
    scale: float = entry("Its `--lora-scale`.")
    modules: int = entry("LoRA modules it holds.")
    kinds: dict[str, int] = entry("Its modules that fold, per kind: `lora` (LyCORIS LoCon too), `dora` (PEFT "
                                  "`use_dora`; a kohya/LyCORIS LoRA with a `dora_scale`), `ia3`, `loha`, `lokr` (PEFT "
                                  "`IA3`, `LOHA`, `LOKR`; LyCORIS `hada_*`, `lokr_*`, with or without a `dora_scale`), "
                                  "`full` (LyCORIS `diff`), in that order.")
    folded: int = entry("Base weights (and biases: PEFT `lora_bias`, LyCORIS `diff_b`) its modules fold into; names "
                        "tied to them not counted.")
    replaced: list[str] = entry("Base tensors it replaced whole (PEFT `modules_to_save`, trained embeddings); one "
                                "equal to the base's own is not listed.")
    unmatched: list[str] = entry("Its modules (and whole tensors) that match no base key, as the adapter names them; "
                                 "an error unless `--allow-unmatched`.")
    prefix: dict | None = entry("PEFT: `{\"added\": P, \"keys\": N}` when the base's keys have a prefix P the "
                                "adapter's names lack, `{\"removed\": P, \"keys\": N}` when the names have one the "
                                "base's keys lack; N names were read so.", omit_if_none=True)


@_report
class FoldReport(MergeReport):
    """`merge BASE --lora ADAPTER...`."""

    adapters: list[AdapterFolded] = entry("Per adapter, in order.")
    folded: int = entry("Base tensors changed by any adapter (tied names each).")
    changed: list[str] = entry("Those tensors' names.")
    unmatched: list[str] = entry("Every adapter's `unmatched`, in order.")


# ---- extract-lora ------------------------------------------------------------------------------

@_report
class Extracted(Report):
    """One LoRA module `extract-lora` wrote."""

    name: str = entry("The module (the weight's name without `.weight`).")
    key: str = entry("The weight's key.")
    kind: str = entry("`linear`, `linear-t` (stored [in, out]), `conv` or `embedding`.")
    shape: list[int] = entry("The weight's shape.")
    rank: int = entry("The rank written.")
    requested_rank: int = entry("The rank asked for.")
    clamped: bool = entry("Whether the rank was cut to the weight's size.")
    error: float | None = entry("Relative Frobenius error of the rank-r approximation (`null` after --dry-run).")


@_report
class ExtractReport(Report):
    """`extract-lora`: a PEFT adapter folder."""

    base: str = entry("BASE as given.")
    tuned: str = entry("TUNED as given.")
    output: str = entry("The adapter folder.")
    files: list[str] = entry("adapter_config.json and adapter_model.safetensors in it.")
    dry_run: bool = entry("Whether nothing was written.")
    rank: int = entry("The default rank (`lora_alpha` too); with `--energy`, the most common of the ranks chosen.")
    energy: float | None = entry("`lora extract --energy E`: each module's rank is the smallest keeping that share "
                                 "of its ΔW's squared singular values.", omit_if_none=True)
    rank_patterns: dict[str, int] = entry("`--rank PATTERN=R` entries.")
    embeddings: bool = entry("`--embeddings`.")
    fan_in_fan_out: list[str] = entry("`--fan-in-fan-out` patterns.")
    extracted: list[Extracted] = entry("The modules written.")
    not_extracted: list[dict] = entry("`{name, reason}` per tensor that differs but cannot be a LoRA (its shape or "
                                      "dtype differs, it is not a 2-D or conv weight, an embedding without "
                                      "`--embeddings`, or it is tied in BASE but not in TUNED).")
    tied: dict[str, str] = entry("Names tied (one storage) in both BASE and TUNED to an extracted weight: name -> "
                                 "the key extracted for them all.")
    unchanged: int = entry("Tensors of BASE equal in TUNED (names tied in both counted once).")
    only_in_base: list[str] = entry("Keys only BASE has.")
    only_in_tuned: list[str] = entry("Keys only TUNED has.")
    metadata: dict[str, str] = entry("The adapter file's metadata.")
    needs_force: list[str] | None = entry("`--dry-run` without `--force`: the folder already there, which the real "
                                          "run would refuse to replace without `--force`.", omit_if_none=True)


# ---- lora: LoRA to LoRA ------------------------------------------------------------------------

@_report
class LoraModule(Report):
    """One module `lora merge` or `lora resize` wrote."""

    name: str = entry("The module as the adapters name it (PEFT: its dotted name; kohya: `lora_unet_…`).")
    kind: str = entry("`linear`, `linear-t` (stored [in, out]), `conv` or `embedding`.")
    shape: list[int] = entry("The shape of B·A: `[out, in]`, `[out, in·k…]` for a conv.")
    ranks: list[int] = entry("Its rank in each input adapter, in order (`lora merge`: 0 for an adapter that does not "
                             "adapt it).")
    rank: int = entry("The rank written.")
    alpha: float = entry("The alpha written (its scale is alpha/rank).")
    error: float = entry("Relative Frobenius error of the module written against what was asked — `lora merge`: "
                         "Σ wᵢ·ΔWᵢ (`cat`: 0, exact), `lora resize`: the adapter's own ΔW — which is √(Σ dropped "
                         "s²)/√(Σ s²) of its singular values.")


@_report
class LoraReport(Report):
    """What every `lora` command that writes an adapter reports first."""

    output: str = entry("The output as given: a folder (PEFT) or a .safetensors file (kohya).")
    format: str = entry("The output's adapter format: `peft` or `kohya`.")
    files: list[str] = entry("The files written (PEFT: adapter_config.json and adapter_model.safetensors).")
    dry_run: bool = entry("Whether nothing was written.")
    metadata: dict[str, str] = entry("The metadata of the adapter's .safetensors file (`--metadata`; none of the "
                                     "inputs').")
    needs_force: list[str] | None = entry("`--dry-run` without `--force`: the output already there, which the real "
                                          "run would refuse to replace without `--force`.", omit_if_none=True)


@_report
class LoraMergeReport(LoraReport):
    """`lora merge ADAPTER... --combine cat|svd`: one adapter of several."""

    adapters: list[str] = entry("The adapters as given, in order.")
    weights: list[float] = entry("Their weights wᵢ (`--weights`; 1 each by default).")
    combine: str = entry("`cat` (exact: the factors side by side, rank Σ rᵢ) or `svd` (the best rank-R approximation "
                         "of Σ wᵢ·ΔWᵢ per module).")
    rank: int | None = entry("`svd`: the rank asked for (`--rank`; by default the largest rank of the inputs), each "
                             "module's at most its ΔW's; `null` for `cat`.")
    modules: list[LoraModule] = entry("Per module, in order of first appearance.")


@_report
class LoraResizeReport(LoraReport):
    """`lora resize ADAPTER (--rank R | --energy E)`."""

    adapter: str = entry("The adapter as given.")
    rank: int | None = entry("`--rank`: each module's new rank, at most its old one.", omit_if_none=True)
    energy: float | None = entry("`--energy`: each module keeps the smallest rank whose squared singular values reach "
                                 "this share of its ΔW's.", omit_if_none=True)
    modules: list[LoraModule] = entry("Per module: its old rank (`ranks`), new rank, alpha (the scale kept) and error.")


@_report
class LoraConvertReport(LoraReport):
    """`lora convert ADAPTER --to peft|kohya`."""

    adapter: str = entry("The adapter as given.")
    source_format: str = entry("Its format: `peft` or `kohya`.")
    base: str | None = entry("BASE as given (`--base`): the module names were resolved against its keys.",
                             omit_if_none=True)
    names: dict[str, str] = entry("Each module as the input names it -> as the output names it.")


# ---- reading -----------------------------------------------------------------------------------

@_report
class InspectReport(Report):
    """`inspect` of one input (`--json` with several inputs is refused: one document per run)."""

    path: str = entry("The input as given.")
    format: str = entry("torch-zip, torch-legacy, safetensors, sharded-safetensors, sharded-torch, dcp, "
                        "deepspeed, accelerate, gguf.")
    root: str | None = entry("Key of the state dict inside a nested .pth (`\"\"`: its top level; `null`: a format "
                             "with nothing nested).")
    extras: dict[str, str] = entry("Entries outside the state dict: name -> a short description of its value.")
    non_tensors: dict[str, str] = entry("Non-tensor entries inside the state dict (`fc._extra_state`).")
    metadata: dict[str, str] = entry("The safetensors metadata (`{}` when none); a GGUF file's key/value metadata, "
                                     "its values typed (numbers, bools, text, arrays).")
    inert: list[str] = entry("Pickled classes left inert (never run): module.name.")
    total_params: int = entry("Elements of the listed tensors, tied ones once.")
    total_bytes: int = entry("Bytes of the listed tensors, tied ones once.")
    trainable_params: int | None = entry("A whole pickled model (`torch.save(model)`, or one under a key): elements "
                                         "of the listed parameters whose `requires_grad` is true, tied ones once "
                                         "(buffers count in neither this nor `frozen_params`); omitted for a state "
                                         "dict, which records no flag.", omit_if_none=True)
    frozen_params: int | None = entry("Likewise, the parameters whose `requires_grad` is false.", omit_if_none=True)
    tensors: Sequence[dict] = entry("One record per listed tensor: `name`, `dtype` (torch's name; a quantized GGUF "
                                    "tensor's GGML type, `Q4_K`, and `nbytes` its bytes in the file), `shape`, "
                                    "`nbytes`, `requires_grad` (a pickled Parameter's flag, else null), "
                                    "`shares_with` (the first name of its storage, or null), `contiguous`, "
                                    "`quantization` (quantized tensors); `--stats`: `min`, `max`, `mean`, `std`, "
                                    "`nan`, `inf`; `--hash`: `sha256`.")
    fingerprint: str | None = entry("`--hash`: SHA-256 over the listed tensors' names and hashes.", omit_if_none=True)
    tree: list[dict] | None = entry("`--tree`: one record per module row (repeats folded); `frozen: true` on a row "
                                    "whose parameters (a whole pickled model's) are all frozen.", omit_if_none=True)
    dequantized: Dequantized | None = entry("With `--dequantize`: what was read dequantized (see `Dequantized`).",
                                            omit_if_none=True)
    fetched: Fetched | None = entry("With remote inputs: what was fetched (see `Fetched`).", omit_if_none=True)
    hf_names: HfNames | None = entry("With `--names hf`: what was renamed (see `HfNames`).", omit_if_none=True)


@_report
class DiffReport(Report):
    """`diff A B` (`--by-layer`: with the norms per layer)."""

    a: str = entry("A as given.")
    b: str = entry("B as given.")
    atol: float = entry("The absolute tolerance (with `rtol` 0 too: bit-exact).")
    rtol: float = entry("The relative tolerance: a tensor is equal when every element is within `atol + rtol·abs(B)` "
                        "(B the reference; `torch.isclose(A, B, rtol, atol, equal_nan=True)` on the values in "
                        "float64, integers exactly; complex values part by part).")
    identical: bool = entry("The verdict the exit code follows (0 identical, 1 different).")
    equal: int = entry("Tensors equal (within the tolerance).")
    only_in_a: list[str] = entry("Keys only A has (tied names aside: see `tied`).")
    only_in_b: list[str] = entry("Keys only B has (tied names aside: see `tied`).")
    shape_changed: list[dict] = entry("`{name, a, b}` shapes.")
    dtype_changed: list[dict] = entry("`{name, a, b}` dtypes, with `max_abs_diff` when a tolerance is given.")
    value_changed: list[dict] = entry("`{name, max_abs_diff}` beyond the tolerance.")
    tied: list[dict] = entry(
        "`{name, side, tied_to, by}`: a name only one side lists (`side`: `\"a\"` or `\"b\"`), whose tensor "
        "the other side holds tied, as `tied_to`, and equal (within the tolerance): not a difference, nor counted "
        "in `equal`. `by` says how the tie is known: `\"storage\"`, `side` stores `name` and `tied_to` as one view "
        "of the same bytes (a tied model's `state_dict()`, where transformers' `save_pretrained` keeps one name "
        "and records nothing); `\"metadata\"`, the other side's safetensors metadata maps `name` to `tied_to`, "
        "as safetensors' `save_model` does for each tied name it drops.")
    ignored: list[str] = entry("Keys the `--ignore` patterns select on either side (A's order, then B's): "
                               "compared on neither side and counted nowhere else.")
    base: str | None = entry("BASE as given (`--by-layer --base BASE`): the rows measure A's and B's task vectors "
                             "from it.", omit_if_none=True)
    layer_container: str | None = entry(
        "With `--by-layer`: the key prefix whose numbers are the layers (`model.layers`), or the `--layer-pattern` "
        "given; omitted for a model without layers.", omit_if_none=True)
    layers: list[dict] | None = entry(
        "With `--by-layer`: one row per layer index, then one (`layer` null) for the tensors outside the layers "
        "(the only row of a model without layers). Each row: `layer`; `tensors`, the names counted in its norms "
        "(floating tensors of one shape and dtype in A and B, and with `--base` a floating tensor of that shape in "
        "BASE; a name tied on both sides once); `left_out`, its names listed in `left_out`; `a_norm` ‖A‖; "
        "`diff_norm` ‖B−A‖; `relative` ‖B−A‖/‖A‖ (null when ‖A‖ is 0) — Frobenius norms over all the row's "
        "tensors, accumulated in float64. With `--base` also `base_norm` ‖BASE‖, `a_delta` ‖A−BASE‖, `b_delta` "
        "‖B−BASE‖, `a_relative` and `b_relative` (those over ‖BASE‖; null when it is 0) and `cosine`, "
        "⟨A−BASE, B−BASE⟩/(‖A−BASE‖·‖B−BASE‖) (null when either is 0).", omit_if_none=True)
    left_out: list[dict] | None = entry(
        "With `--by-layer`: `{name, why}` for each name left out of the norms: `why` is `\"only in A\"`, "
        "`\"only in B\"`, `\"shape\"`, `\"dtype\"` (as listed above), `\"not in BASE\"` (BASE lacks it or holds it "
        "not floating) or `\"shape in BASE\"`. Tensors that are not floating (integers, bools, float8, quantized, "
        "complex) are compared as always and are in no norm, nor listed here.", omit_if_none=True)
    dequantized: Dequantized | None = entry("With `--dequantize`: what was read dequantized (see `Dequantized`).",
                                            omit_if_none=True)
    fetched: Fetched | None = entry("With remote inputs: what was fetched (see `Fetched`).", omit_if_none=True)
    hf_names: HfNames | None = entry("With `--names hf`: what was renamed (see `HfNames`).", omit_if_none=True)


REPORTS: tuple[tuple[str, type[Report]], ...] = (
    ("inspect", InspectReport), ("convert", WriteReport), ("filter", FilterReport), ("drop", DropReport),
    ("rename", RenameReport), ("merge (plain union)", UnionReport), ("merge --into", IntoReport),
    ("merge --method / --average", MethodReport), ("merge --config", RecipeReport), ("merge --lora, lora fold", FoldReport),
    ("extract-lora, lora extract", ExtractReport), ("lora merge", LoraMergeReport), ("lora resize", LoraResizeReport),
    ("lora convert", LoraConvertReport), ("diff", DiffReport),
)
NESTED: tuple[type[Report], ...] = (Dequantized, Fetched, HfNames, AdapterFolded, Extracted, LoraReport, LoraModule)


def schema_markdown() -> str:
    """docs/json.md: every --json field of every command, once (a subclass lists only its own)."""
    lines = ["# `--json` output", "",
             "Every command's `--json` prints one JSON document on stdout: the fields below, in this order. "
             "Generated from `ckptsurgery/ops/reports.py` by `python -m ckptsurgery.ops.reports > docs/json.md`; "
             "`tests/test_contract.py` checks that this page matches the code. A field marked *omitted when null* "
             "is left out instead of printed as `null`. Fields may be added in later versions; none is removed "
             "or changes meaning without a major version.", ""]
    described: set[type] = set()
    for title, cls in (*REPORTS, *((c.__name__, c) for c in NESTED)):
        own = [f for f in fields(cls) if not any(f.name in {g.name for g in fields(b)}
                                                  for b in cls.__mro__[1:] if is_dataclass(b) and b is not Report)]
        parents = [b.__name__ for b in cls.__mro__[1:-1] if is_dataclass(b) and b is not Report]
        lines += [f"## {title}: `{cls.__name__}`", "", cls.__doc__.strip(), ""]
        if parents:
            lines += [f"First the fields of `{parents[0]}`, then:" if own else f"The fields of `{parents[0]}`.", ""]
        if cls in described or not own:
            continue
        described.add(cls)
        lines += ["| field | meaning |", "|---|---|"]
        for f in own:
            note = " *(omitted when null)*" if f.metadata.get("omit_if_none") else ""
            lines.append(f"| `{f.name}` | {f.metadata['doc']}{note} |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    import sys

    sys.stdout.write(schema_markdown())
