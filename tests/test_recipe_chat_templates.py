"""A recipe's `chat_template:` held to mergekit 0.1.5's `_set_chat_template` (issue 19): our named
templates render as mergekit's own files do (with transformers' own renderer, on the same
conversations); `auto` picks what mergekit picks from tiny folders whose tokenizers transformers
loads offline (a WordLevel tokenizer.json); refusals are one line; the output folder holds the
template where transformers 5's save_pretrained puts it, and AutoTokenizer loads it from there."""

from __future__ import annotations

import importlib.resources
import json
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors.torch import save_file

from conftest import assert_one_error_line

from ckptsurgery.errors import CkptError
from ckptsurgery.ops.model_folder import model_folder
from ckptsurgery.ops.recipes import load_recipe
from ckptsurgery.ops.recipes.chat_templates import TEMPLATES, recipe_template, template_models

transformers = pytest.importorskip("transformers")
mergekit_merge = pytest.importorskip("mergekit.merge")
from mergekit._data import chat_templates as mergekit_templates  # noqa: E402
from mergekit.config import MergeConfiguration  # noqa: E402
from transformers.utils.chat_template_utils import render_jinja_template  # noqa: E402

SYSTEM = {"role": "system", "content": " Be brief.\n"}


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


CONVERSATIONS = [
    [SYSTEM, user(" Hi there \n"), assistant("Hello! ")],             # system, user, assistant
    [user("a"), assistant("b"), user("c")],                           # multi-turn, ending on the user
    [SYSTEM, user("a"), assistant("b"), user("c"), assistant("d")],
    [SYSTEM, user("u")], [user("x")], [assistant("a")], [SYSTEM], [],
    [user("q"), {"role": "user_context", "content": " ctx "}, assistant("r")],  # alpaca's input
    [SYSTEM, {"role": "system", "content": "second"}, user("u")],
    [user("a"), user("b")], [user("a"), SYSTEM], [user("a"), assistant("b"), SYSTEM],  # mistral refuses these
    [{"role": "tool", "content": "t"}],
]


def rendered(template, messages, generation_prompt, tokens):
    """What apply_chat_template renders (transformers' own environment), or the error's type."""
    try:
        return render_jinja_template([messages], chat_template=template, add_generation_prompt=generation_prompt,
                                     **tokens)[0][0]
    except Exception as e:  # the same conversation must fail the same way under both
        return type(e).__name__


def mergekit_template(name: str) -> str:
    return importlib.resources.files(mergekit_templates).joinpath(f"{name}.jinja").read_text()


def without_layout(template: str) -> str:
    """A template file's text with its indentation and line breaks taken out."""
    return "".join(line.strip() for line in template.splitlines())


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_our_named_templates_render_as_mergekits(name):
    # mergekit's exaone.jinja renders its own indentation into each prompt: ours renders the
    # turns as that file does once its layout is out (docs/merging.md says why)
    theirs = without_layout(mergekit_template(name)) if name == "exaone" else mergekit_template(name)
    compared = 0
    for messages in CONVERSATIONS:
        for generation_prompt in (False, True):
            for tokens in ({"bos_token": "<s>", "eos_token": "</s>"}, {}):
                ours = rendered(TEMPLATES[name], messages, generation_prompt, tokens)
                assert ours == rendered(theirs, messages, generation_prompt, tokens), (messages, generation_prompt)
                compared += isinstance(ours, str) and bool(ours)
    assert compared >= 20  # most of them render text, not an error


def mergekits_choice(text: str) -> str | None:
    """mergekit's own _set_chat_template on a recipe: the template it gives the output's tokenizer."""
    tokenizer = SimpleNamespace(chat_template=None)
    mergekit_merge._set_chat_template(tokenizer, MergeConfiguration.model_validate(yaml.safe_load(text)))
    return tokenizer.chat_template


def ours(text: str, notes=None) -> str | None:
    recipe = load_recipe(text)
    folders = [model_folder(m.path) for m in template_models(recipe)]
    return recipe_template(recipe.chat_template, folders, [] if notes is None else notes)


def test_names_and_texts_as_mergekit_takes_them():
    for name in TEMPLATES:
        assert mergekits_choice(f"merge_method: linear\nmodels: [{{model: a}}]\nchat_template: {name}\n") \
            == mergekit_template(name)  # which we render alike (above)
    text = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    recipe = f"merge_method: linear\nmodels: [{{model: a}}]\nchat_template: {json.dumps(text)}\n"
    assert ours(recipe) == mergekits_choice(recipe) == text
    assert ours("merge_method: linear\nmodels: [{model: a}]\nchat_template: ''\n") is None
    for wrong in ("ChatML", "vicuna", "{{ short }}"):  # not a name mergekit has, nor a template's text
        recipe = f"merge_method: linear\nmodels: [{{model: a}}]\nchat_template: {json.dumps(wrong)}\n"
        with pytest.raises(RuntimeError, match="Invalid chat template"):
            mergekits_choice(recipe)
        with pytest.raises(CkptError, match="neither a template's text"):
            ours(recipe)


def test_exaone_renders_the_formats_turns_where_mergekits_file_renders_its_indentation():
    conversation, tokens = [user("Hi"), assistant("Hello")], {}
    ours_text = rendered(TEMPLATES["exaone"], conversation, True, tokens)
    assert ours_text == "[|system|][|endofturn|]\n[|user|]Hi\n[|assistant|]Hello[|endofturn|]\n[|assistant|]"
    theirs = rendered(mergekit_template("exaone"), conversation, True, tokens)
    assert theirs == ("        [|system|][|endofturn|]\n\n    [|user|]Hi\n        \n\n    [|assistant|]Hello\n"
                      "        [|endofturn|]\n\n    [|assistant|]\n")  # the file's layout in the prompt


def tokenizer_folder(folder, config_template=None, jinja=None, json_template=None, tokenizer=True):
    """A folder AutoTokenizer loads offline: a WordLevel tokenizer.json and a tokenizer_config.json."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder.mkdir(parents=True)
    if tokenizer:
        tok = Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2, "hi": 3}, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        tok.save(str(folder / "tokenizer.json"))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
                  "model_max_length": 32}
        if config_template is not None:
            config["chat_template"] = config_template
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    if jinja is not None:
        (folder / "chat_template.jinja").write_text(jinja)
    if json_template is not None:
        (folder / "chat_template.json").write_text(json.dumps({"chat_template": json_template}))
    return folder


T1, T2, T3 = ("{{ 'one' }}{% for m in messages %}{{ m['content'] }}{% endfor %}",
              "{{ 'two' }}{% for m in messages %}{{ m['content'] }}{% endfor %}",
              "{{ 'three' }}{% for m in messages %}{{ m['content'] }}{% endfor %}")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("templates")
    return {
        "config": tokenizer_folder(root / "config", config_template=T1 + "\n  "),  # stripped: T1
        "jinja": tokenizer_folder(root / "jinja", config_template=T3, jinja=T1 + "\n"),  # the .jinja wins: T1
        "listed": tokenizer_folder(root / "listed", config_template=[{"name": "tool_use", "template": T3},
                                                                     {"name": "default", "template": T2}]),
        "two": tokenizer_folder(root / "two", jinja=T2),
        "three": tokenizer_folder(root / "three", jinja=T3),
        "processor": tokenizer_folder(root / "processor", json_template=T3),  # not the tokenizer's: not counted
        "none": tokenizer_folder(root / "none"),
        "no-tokenizer": tokenizer_folder(root / "no-tokenizer", tokenizer=False),
        "no-default": tokenizer_folder(root / "no-default", config_template=[{"name": "tool_use", "template": T3}]),
    }


def models_recipe(folders, *names, base=None, slices=False):
    lines = ["merge_method: linear", "chat_template: auto"] + ([f"base_model: {folders[base]}"] if base else [])
    if slices:
        lines += ["slices:", "  - sources:"] + [f"      - {{model: {folders[n]}, layer_range: [0, 1]}}" for n in names]
    else:
        lines += ["models:"] + [f"  - model: {folders[n]}" for n in names]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("names, base, slices", [
    (("config", "two", "jinja"), None, False),  # T1 twice (tokenizer_config.json, .jinja), T2 once
    (("two", "listed", "config"), "three", False),  # T2 twice (a .jinja, a list's default)
    (("processor", "none", "no-tokenizer", "no-default", "three"), None, False),  # only T3 counts
    (("processor", "none", "no-tokenizer"), "no-default", True),  # none: nothing chosen
    (("three", "jinja"), "config", True),  # the base counts as a model: T1 twice
])
def test_auto_picks_what_mergekit_picks(folders, names, base, slices):
    text = models_recipe(folders, *names, base=base, slices=slices)
    assert ours(text) == mergekits_choice(text)


def test_auto_ties_go_to_the_first_in_the_recipe(folders, monkeypatch):
    """mergekit lists the models from a set, so its pick among equals follows the set's order, which
    changes between runs (string hashing); given the recipe's order it picks our first."""
    def in_order(self):  # mergekit's referenced_models, the set made an ordered one
        found = [self.base_model] if self.base_model else []
        found += [m.model for m in self.models or ()] + [s.model for p in self.slices or () for s in p.sources]
        return list(dict.fromkeys(found))

    monkeypatch.setattr(MergeConfiguration, "referenced_models", in_order)
    for names in (("three", "two", "config"), ("two", "config", "three"), ("config", "three", "two")):
        text = models_recipe(folders, *names)
        assert ours(text) == mergekits_choice(text) == {"three": T3, "two": T2, "config": T1}[names[0]]


def test_auto_asks_the_models_mergekit_asks(folders, tmp_path):
    """Two adapters on one model count it twice, a model named twice once; tokenizer_source and a
    slice's base_model are not asked — as mergekit's referenced_models."""
    two, config, three = folders["two"], folders["config"], folders["three"]
    for text in (f"merge_method: linear\ntokenizer_source: {three}\nmodels:\n  - model: {two}+{tmp_path}/x\n"
                 f"  - model: {two}+{tmp_path}/y\n  - model: {config}\n  - model: {config}\n",
                 f"merge_method: slerp\nbase_model: {config}\nslices:\n  - base_model: {three}\n    sources:\n"
                 f"      - {{model: {two}, layer_range: [0, 1]}}\n      - {{model: {config}, layer_range: [0, 1]}}\n"):
        theirs = MergeConfiguration.model_validate(yaml.safe_load(text)).referenced_models()
        asked = [m.path for m in template_models(load_recipe(text))]
        assert sorted(asked) == sorted(m.model.path for m in theirs) and str(three) not in asked


def tiny_model(folder, seed, **tokenizer):
    """A two-layer 'model' with a config.json and a tokenizer transformers loads."""
    tokenizer_folder(folder, **tokenizer)
    g = torch.Generator().manual_seed(seed)
    save_file({"model.embed_tokens.weight": torch.randn(4, 2, generator=g),
               **{f"model.layers.{i}.mlp.weight": torch.randn(2, 2, generator=g) for i in range(2)}},
              folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 2}))
    return folder


def test_the_folder_holds_it_where_transformers_5_saves_it(tmp_path, cli):
    a = tiny_model(tmp_path / "a", 0, config_template=T3, json_template=T3)  # the tokenizer's source
    b = tiny_model(tmp_path / "b", 1, jinja=T2 + "\n")
    c = tiny_model(tmp_path / "c", 2, jinja=T2)
    for value, expected in (("chatml", TEMPLATES["chatml"]), ("auto", T2)):
        recipe = tmp_path / f"{value}.yml"
        recipe.write_text(f"merge_method: linear\nchat_template: {value}\nmodels: [{{model: {a}}}, {{model: {b}}}, "
                          f"{{model: {c}}}]\n")
        out = tmp_path / f"out-{value}"
        result = cli("merge", "--config", recipe, "-o", out)
        assert result.code == 0, result.err
        assert (out / "chat_template.jinja").read_text() == expected and not (out / "chat_template.json").exists()
        config = json.loads((out / "tokenizer_config.json").read_text())
        assert "chat_template" not in config and config["model_max_length"] == 32  # only the stale template goes
        assert transformers.AutoTokenizer.from_pretrained(out).chat_template == expected
        # mergekit: the source's tokenizer, its template set, saved by save_pretrained
        tokenizer = transformers.AutoTokenizer.from_pretrained(a)
        mergekit_merge._set_chat_template(tokenizer, MergeConfiguration.model_validate(
            {"merge_method": "linear", "chat_template": value, "models": [{"model": str(m)} for m in (a, b, c)]}))
        tokenizer.save_pretrained(tmp_path / f"mergekit-{value}")
        saved = tmp_path / f"mergekit-{value}"
        assert "chat_template" not in json.loads((saved / "tokenizer_config.json").read_text())
        theirs = (saved / "chat_template.jinja").read_text()
        assert theirs == (expected if value == "auto" else mergekit_template(value))
    # auto, no merged model having a template (tokenizer_source is not asked, as in mergekit): the
    # tokenizer source's files as they are
    d, e = tiny_model(tmp_path / "d", 3), tiny_model(tmp_path / "e", 4)
    recipe = tmp_path / "none.yml"
    recipe.write_text(f"merge_method: linear\nchat_template: auto\ntokenizer_source: {a}\n"
                      f"models: [{{model: {d}}}, {{model: {e}}}]\n")
    assert ours(recipe.read_text()) is mergekits_choice(recipe.read_text()) is None
    result = cli("merge", "--config", recipe, "-o", tmp_path / "out-none")
    assert result.code == 0, result.err
    for name in ("tokenizer_config.json", "chat_template.json"):
        assert (tmp_path / "out-none" / name).read_bytes() == (a / name).read_bytes()
    assert not (tmp_path / "out-none" / "chat_template.jinja").exists()


def test_a_refusal_is_one_line(tmp_path, cli):
    a, b = tiny_model(tmp_path / "a", 0), tiny_model(tmp_path / "b", 1)
    recipe = tmp_path / "r.yml"
    recipe.write_text(f"merge_method: linear\nchat_template: vicuna\nmodels: [{{model: {a}}}, {{model: {b}}}]\n")
    assert_one_error_line(cli("merge", "--config", recipe, "-o", tmp_path / "out"), "'vicuna' is neither a template")
    assert not (tmp_path / "out").exists()
