"""What a merged model's folder holds besides its weights, so that `from_pretrained(OUT_DIR)` loads
it: `config.json` (the reference model's, its layer count and dtype updated), the tokenizer's
files, `generation_config.json` and the chat template (copied from the tokenizer's source, or the
recipe's `chat_template:` as chat_template.jinja — recipes/chat_templates.py), the
recipe as it was written (`ckptsurgery_recipe.yml`) and a short model card (`README.md`).

`folder_files` plans them — what each file's bytes are, or which file it is a copy of — without
writing anything; `write_folder_files` writes them into a (staged) folder. Nothing here depends on
the time or the machine: the same inputs give the same bytes.

The layer count: the reference's `num_hidden_layers`, else the one field of its config (among
`n_layer`, `num_layers`, `n_layers`, `num_hidden_layers` of a `text_config`, ...) that equals the
reference's number of layers as its keys number them; a list of one entry per layer
(`layer_types`) is cut or repeated as the output's layers were taken."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from ..errors import CkptError
from ..io.formats import is_remote
from ..io.small_files import parse_json, read_small
from .recipes.chat_templates import recipe_template
from .recipes.links import folder_file

CONFIG = "config.json"
RECIPE_COPY = "ckptsurgery_recipe.yml"
MODEL_CARD = "README.md"
# copied from the tokenizer's source when present, in this order (transformers' names)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                   "generation_config.json")
MAX_CONFIG = 16 << 20  # a config.json is a few KB
MAX_FETCHED = 64 << 20  # a remote repository's tokenizer.json: tens of MB at most (Gemma's: 33 MB)
MAX_MODULES, MAX_MODULE = 16, 8 << 20  # remote code fetched: DeepSeek-V3's is two files of ~100 KB
# fields that count a model's layers, by family (the first that equals the reference's count wins)
LAYER_FIELDS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "num_decoder_layers", "n_layers_total")
PER_LAYER_LISTS = ("layer_types",)  # lists with one entry per layer


@dataclass
class FolderFiles:
    """The files of the output folder besides the weights: `made` name -> bytes, `copied` name ->
    the file copied; `config_changes` the config.json fields set; `notes` what could not be done."""

    made: dict[str, bytes] = field(default_factory=dict)
    copied: dict[str, str] = field(default_factory=dict)
    config_changes: dict[str, object] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return sorted({*self.made, *self.copied})


def model_folder(path: str) -> str | None:
    """The folder holding a model's files: the path itself when it is a folder, else the folder
    of the file (a single weights file or an index) when a config.json is beside it."""
    if os.path.isdir(path):
        return path
    folder = os.path.dirname(os.path.abspath(path))
    return folder if os.path.isfile(os.path.join(folder, CONFIG)) else None


def is_repository(path: str) -> bool:
    """Whether `path` names a whole repository on the Hub (`hf://ORG/REPO[@REV]`, no file in it): a
    model folder, as a local folder is; a file of one, or a URL, is a file."""
    if not path.startswith("hf://"):
        return False
    from ..io.remote import parse_hf

    return parse_hf(path)[1] is None


def read_config(folder: str) -> dict | None:
    """The folder's config.json as a mapping, None when it has none; a CkptError names a file
    that is too large or not a JSON object, or that links out of the folder."""
    path = os.path.join(folder, CONFIG)
    if not os.path.isfile(path):
        return None
    # it is written into an output made to be published: a link out of the folder (to
    # ~/.docker/config.json, say) is refused, as the tokenizer's files are not copied (recipes/links.py)
    if folder_file(folder, CONFIG, refused := []) is None:
        raise CkptError(refused[0])
    return parse_config(path, read_small(path, MAX_CONFIG, f"larger than {MAX_CONFIG >> 20} MB; not a config.json"))


def parse_config(path: str, raw: bytes) -> dict:
    """A config.json's bytes as a mapping; a CkptError names one that is not a JSON object."""
    config = parse_json(path, raw, "not JSON", encoding="utf-8-sig")
    try:
        json.dumps(config)  # updated_config copies it through json: nested deeper than that can, refused here
    except RecursionError:
        raise CkptError(f"{path}: not JSON (nested too deeply)") from None
    if not isinstance(config, dict):
        raise CkptError(f"{path}: not a JSON object")
    return config


def updated_config(config: dict, reference_layers: int, layers_from: Sequence[int], dtype: str | None,
                   notes: list[str]) -> tuple[dict, dict]:
    """`config` with its layer count set to len(layers_from) (output layer i is the reference's
    layer layers_from[i], for per-layer lists) and its dtype set; returns (config, changes)."""
    config, changes = json.loads(json.dumps(config)), {}
    layers = len(layers_from)
    if layers != reference_layers:
        places = [(config, name) for name in LAYER_FIELDS]
        if isinstance(config.get("text_config"), dict):
            places += [(config["text_config"], name) for name in LAYER_FIELDS]
        found = [(where, name) for where, name in places if type(where.get(name)) is int
                 and where[name] == reference_layers]
        if not found:
            notes.append(f"{CONFIG}: no field holds the reference's {reference_layers} layers "
                         f"({', '.join(LAYER_FIELDS)}); set the layer count to {layers} by hand")
        for where, name in found[:1]:
            where[name] = layers
            changes[name if where is config else f"text_config.{name}"] = layers
        for name in PER_LAYER_LISTS:
            value = config.get(name)
            if isinstance(value, list) and len(value) == reference_layers:
                config[name] = [value[min(i, len(value) - 1)] for i in layers_from]
                changes[name] = config[name]
    if dtype is not None:
        for name in ("torch_dtype", "dtype"):
            if name == "torch_dtype" or name in config:
                config[name] = dtype
                changes[name] = dtype
    return config, changes


def config_bytes(config: dict) -> bytes:
    """As transformers writes a config: two-space indents, keys in their order, a final newline."""
    try:
        return (json.dumps(config, indent=2, ensure_ascii=False) + "\n").encode()
    except UnicodeEncodeError:  # a lone surrogate ("\udc80" is valid JSON): \u-escaped, the same JSON value
        return (json.dumps(config, indent=2) + "\n").encode()


def tokenizer_files(folder: str | None, notes: list[str]) -> dict[str, str]:
    """The tokenizer, generation and chat template files the folder holds: name -> path (a link
    followed only within the folder or its hub cache's blobs: recipes/links.py)."""
    if folder is None:
        return {}
    found = {}
    for name in TOKENIZER_FILES:
        path = folder_file(folder, name, notes)
        if path is not None:
            found[name] = path
    return found


def model_card(method: str, models: Sequence[str], base: str | None, recipe_text: str | None) -> bytes:
    """A short README.md: front matter as the hub reads it, the method, the models and the recipe
    (not the output's name: the same recipe writes the same bytes wherever it is written)."""
    lines = ["---", "base_model:"] + [f"- {json.dumps(m)}" for m in models]
    lines += ["library_name: transformers", "tags:", "- merge", "- ckptsurgery", "---", "", "# A merged model", "",
              f"A merge of the models below, made by ckptsurgery from a mergekit recipe with the `{method}` method"
              + (f" (base: `{base}`)." if base else "."), "", "## Models", ""]
    lines += [f"- `{m}`" for m in models]
    if recipe_text is not None:
        fence = "````" if "```" in recipe_text else "```"
        lines += ["", "## Recipe", "", f"{fence}yaml", recipe_text.rstrip("\n"), fence]
    return ("\n".join(lines) + "\n").encode()


def _without_template(path: str) -> bytes | None:
    """A tokenizer_config.json without its `chat_template` (it would contradict chat_template.jinja
    for a tool that reads it first), None when it has none or is not a small JSON object."""
    try:
        with open(path, "rb") as f:
            config = json.loads(f.read(MAX_CONFIG + 1).decode("utf-8-sig"))
        rewritten = config_bytes({k: v for k, v in config.items() if k != "chat_template"}) \
            if isinstance(config, dict) and "chat_template" in config else None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):  # a file nested too deeply: copied as it is
        return None
    return rewritten


def write_folder_files(folder: str, files: FolderFiles) -> list[str]:
    """Write the planned files into `folder` (a staged folder: nothing there yet); their names."""
    for name, data in files.made.items():
        with open(os.path.join(folder, name), "xb") as f:
            f.write(data)
    for name, path in files.copied.items():
        try:
            shutil.copyfile(path, os.path.join(folder, name))
        except OSError as e:
            raise CkptError(f"{path}: cannot copy ({e.strerror or e}); nothing was written") from None
    return files.names


@dataclass(frozen=True)
class FolderPlan:
    """What the folder files are made from: the reference model (its config.json), its layer
    count and which of its layers each output layer is, the written dtype, the tokenizer's
    model, the recipe's chat template and text, and what the model card names."""

    reference: str
    reference_layers: int
    layers_from: tuple[int, ...]
    dtype: str | None
    tokenizer: str
    chat_template: str | None
    recipe_text: str | None
    method: str
    models: tuple[str, ...]
    base: str | None
    template_models: tuple[str, ...] = ()  # the paths `chat_template: auto` asks (chat_templates.template_models)
    vocab_size: int | None = None  # the rows of a vocabulary aligned by token (recipes/vocabulary.py)
    fetched: Mapping[str, str] = field(default_factory=dict)  # hf:// repository -> the folder of its fetched files

    def folder(self, path: str) -> str | None:
        return folder_of(path, self.fetched)


def folder_of(path: str, fetched: Mapping[str, str]) -> str | None:
    """A model's folder: for a repository on the Hub, the folder its files were fetched into
    (`fetched`); for a local model, model_folder's; None for any other remote file."""
    return fetched.get(path) or (None if is_remote(path) else model_folder(path))


def folder_files(plan: FolderPlan) -> FolderFiles:
    """The output folder's files besides the weights, planned (nothing read but small JSON files)."""
    files = FolderFiles()
    folder = plan.folder(plan.reference)
    config = read_config(folder) if folder else None
    if config is None:
        files.notes.append(f"{plan.reference} has no {CONFIG}: the output has none (from_pretrained needs one)")
    else:
        config, files.config_changes = updated_config(config, plan.reference_layers, plan.layers_from, plan.dtype,
                                                      files.notes)
        _set_vocab_size(config, plan.vocab_size, files.config_changes)
        files.made[CONFIG] = config_bytes(config)
    files.copied.update(tokenizer_files(plan.folder(plan.tokenizer), files.notes))
    template = recipe_template(plan.chat_template, (plan.folder(p) for p in plan.template_models), files.notes)
    if template is not None:  # the one template the folder holds, where transformers 5 saves it (as mergekit)
        files.copied.pop("chat_template.json", None)
        files.copied.pop("chat_template.jinja", None)
        files.made["chat_template.jinja"] = template.encode()
        config = files.copied.get("tokenizer_config.json")
        if config is not None and (without := _without_template(config)) is not None:
            del files.copied["tokenizer_config.json"]
            files.made["tokenizer_config.json"] = without
    if plan.recipe_text is not None:
        files.made[RECIPE_COPY] = plan.recipe_text.encode()
    else:
        files.notes.append(f"the recipe was given loaded, not as a file: no {RECIPE_COPY} written")
    files.made[MODEL_CARD] = model_card(plan.method, plan.models, plan.base, plan.recipe_text)
    return files


def _set_vocab_size(config: dict, size: int | None, changes: dict) -> None:
    """vocab_size set to an aligned vocabulary's, where the config holds it (its text_config's when
    only that one has it), as mergekit's _update_config_vocab."""
    text = config.get("text_config")
    where, name = (text, "text_config.vocab_size") if "vocab_size" not in config and isinstance(text, dict) and \
        "vocab_size" in text else (config, "vocab_size")
    if size is not None and where.get("vocab_size") != size:
        where["vocab_size"] = size
        changes[name] = size


def remote_code_files(folder: str, config: dict, notes: list[str]) -> dict[str, str]:
    """The modules a config's `auto_map` names that lie in the folder: name -> path. A release
    that needs trust_remote_code (DeepSeek-V3) loads from the output only with them."""
    found = {}
    for name in remote_code_names(config):
        path = folder_file(folder, name, notes)
        if path is not None:
            found[name] = path
    return found


def remote_code_names(config: dict) -> list[str]:
    """The modules a config's `auto_map` names, as files of its folder
    ("modeling_deepseek.DeepseekV3ForCausalLM" -> modeling_deepseek.py)."""
    auto_map = config.get("auto_map")
    names = [v for v in auto_map.values()] if isinstance(auto_map, dict) else []
    modules = []
    for value in names:
        for ref in value if isinstance(value, list) else [value]:
            if isinstance(ref, str) and "--" not in ref and "." in ref:  # "repo--module.Class" lives in another repo
                modules.append(ref.rsplit(".", 1)[0].replace(".", "/") + ".py")
    # printable: a lone surrogate or a NUL (valid in JSON) is no file's name, nor one a URL can hold
    return [name for name in dict.fromkeys(modules) if "/" not in name and not name.startswith(".")
            and name.isprintable()]


def converted_folder_files(folder: str, dtype: str | None, dequantized: bool, commit: str | None = None) -> FolderFiles:
    """A converted model folder's files besides its weights: config.json (its `quantization_config`
    dropped once the weights are dequantized, its dtype set to `dtype`), the tokenizer's and
    generation files, and the remote code modules its config names, copied. `folder` may be an
    `hf://` repository: its files are fetched (io/remote.py) at `commit`, the one its weights were
    read at."""
    files, remote = FolderFiles(), is_remote(folder)
    if remote:
        from ..io.remote import repository_files

        fetched = repository_files(folder, [CONFIG, *TOKENIZER_FILES], MAX_FETCHED, commit)
        config = parse_config(f"{folder.rstrip('/')}/{CONFIG}", fetched.pop(CONFIG)) if CONFIG in fetched else None
    else:
        config = read_config(folder)
    if config is None:
        files.notes.append(f"{folder} has no {CONFIG}: the output has none (from_pretrained needs one)")
    else:
        config, files.config_changes = updated_config(config, 0, (), dtype, files.notes)
        if dequantized and "quantization_config" in config:
            del config["quantization_config"]
            files.config_changes["quantization_config"] = None
        files.made[CONFIG] = config_bytes(config)
        if remote:
            modules = remote_code_names(config)
            if len(modules) > MAX_MODULES:  # each is a request, held in memory: a config naming thousands is not a model's
                files.notes.append(f"{CONFIG} names {len(modules)} remote code modules: the first {MAX_MODULES} "
                                   f"fetched, the others not")
            files.made.update(repository_files(folder, modules[:MAX_MODULES], MAX_MODULE, commit))
        else:
            files.copied.update(remote_code_files(folder, config, files.notes))
    if remote:
        files.made.update(fetched)
    else:
        files.copied.update(tokenizer_files(folder, files.notes))
    return files
