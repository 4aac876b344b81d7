"""The output folder of a recipe (ops/model_folder.py): the layer count found in any family's config
field, per-layer lists, the dtype, the chat template; a GPT-2 depth up-scale (`transformer.h`,
`n_layer`, tied head) held to mergekit-yaml and loaded by transformers; refusals."""

from __future__ import annotations

import json
import os

import pytest
import torch

from ckptsurgery.errors import CkptError, UsageError
from ckptsurgery.ops import WriteOptions, merge_recipe
from ckptsurgery.ops.model_folder import FolderPlan, folder_files, updated_config
from ckptsurgery.ops.recipes.chat_templates import TEMPLATES


def test_the_layer_count_field_is_the_one_that_equals_the_references_layers():
    notes = []
    config, changes = updated_config({"n_layer": 4, "n_head": 4, "n_embd": 16}, 4, [0, 1, 2, 1, 2, 3], None, notes)
    assert config == {"n_layer": 6, "n_head": 4, "n_embd": 16} and changes == {"n_layer": 6} and not notes
    nested = {"text_config": {"num_hidden_layers": 4}, "vision_config": {"num_hidden_layers": 12}}
    config, changes = updated_config(nested, 4, [0, 1], "bfloat16", notes)
    assert config["text_config"]["num_hidden_layers"] == 2 and config["vision_config"]["num_hidden_layers"] == 12
    assert changes == {"text_config.num_hidden_layers": 2, "torch_dtype": "bfloat16"} and not notes
    config, changes = updated_config({"depth": 4}, 4, [0, 1], None, notes)
    assert config == {"depth": 4} and "no field holds the reference's 4 layers" in notes[0]


def test_per_layer_lists_follow_the_layers_they_were_taken_from():
    config = {"num_hidden_layers": 4, "layer_types": ["sliding", "full", "sliding", "full"], "dtype": "float32"}
    out, changes = updated_config(config, 4, [0, 1, 2, 1, 2, 3], "bfloat16", [])
    assert out["layer_types"] == ["sliding", "full", "sliding", "full", "sliding", "full"]
    assert out["num_hidden_layers"] == 6 and out["dtype"] == out["torch_dtype"] == "bfloat16"
    assert config["num_hidden_layers"] == 4  # the reference's own is not touched
    unchanged, changes = updated_config(config, 4, [0, 1, 2, 3], None, [])
    assert unchanged == config and changes == {}


def plan(tmp_path, **changes) -> FolderPlan:
    fields = dict(reference=str(tmp_path), reference_layers=2, layers_from=(0, 1), dtype=None,
                  tokenizer=str(tmp_path), chat_template=None, recipe_text="merge_method: linear\n",
                  method="linear", models=("a", "b"), base=None)
    return FolderPlan(**{**fields, **changes})


def test_chat_templates_tokenizer_files_and_a_missing_config(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{}")
    (tmp_path / "chat_template.jinja").write_text("old")
    files = folder_files(plan(tmp_path, chat_template="{{ messages[0]['content'] }}"))
    assert files.made["chat_template.jinja"] == b"{{ messages[0]['content'] }}"
    assert "chat_template.jinja" not in files.copied
    assert files.copied == {"tokenizer.json": str(tmp_path / "tokenizer.json")}
    assert "config.json" not in files.made and "has no config.json" in files.notes[0]
    assert files.made["ckptsurgery_recipe.yml"] == b"merge_method: linear\n"
    exaone = folder_files(plan(tmp_path, chat_template="exaone")).made["chat_template.jinja"]
    assert exaone.decode() == TEMPLATES["exaone"]
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(CkptError, match="config.json: not a JSON object"):
        folder_files(plan(tmp_path))


@pytest.fixture(scope="module")
def gpt2s(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("gpt2")
    config = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=4, n_head=2)
    torch.manual_seed(0)
    for name in ("a", "b"):
        transformers.GPT2LMHeadModel(config).save_pretrained(folder / name)
    return folder


GPT2_RECIPE = """\
slices:
  - sources:
      - model: a
        layer_range: [0, 3]
  - sources:
      - model: b
        layer_range: [1, 4]
merge_method: passthrough
dtype: float32
"""


def test_a_gpt2_frankenmerge_equals_mergekit_and_loads(gpt2s, tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("mergekit")
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge
    from safetensors.torch import load_file

    monkeypatch.chdir(gpt2s)
    (tmp_path / "r.yml").write_text(GPT2_RECIPE)
    run_merge(MergeConfiguration.model_validate(yaml.safe_load(GPT2_RECIPE)), str(tmp_path / "kit"),
              options=MergeOptions(lazy_unpickle=True, copy_tokenizer=False, write_model_card=False,
                                   clone_tensors=True))
    report = merge_recipe(tmp_path / "r.yml", WriteOptions(str(tmp_path / "ours")))
    assert report.layers == 6 and report.config_changes["n_layer"] == 6
    want, got = load_file(tmp_path / "kit" / "model.safetensors"), load_file(tmp_path / "ours" / "model.safetensors")
    assert sorted(got) == sorted(want)
    for key in want:
        assert torch.equal(got[key], want[key]), key
    model, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and model.config.n_layer == 6


def test_the_output_may_not_replace_an_input(gpt2s, tmp_path, monkeypatch):
    monkeypatch.chdir(gpt2s)
    (tmp_path / "r.yml").write_text(GPT2_RECIPE)
    for output in ("a", "a/", str(gpt2s), "a/model.safetensors"):
        with pytest.raises(UsageError, match="which the recipe reads"):
            merge_recipe(tmp_path / "r.yml", WriteOptions(output, force=True))
    assert sorted(os.listdir(gpt2s / "a")) == ["config.json", "generation_config.json", "model.safetensors"]
    assert json.loads((gpt2s / "a" / "config.json").read_text())["n_layer"] == 4


def test_two_stacks_need_a_layer_pattern(tmp_path, monkeypatch):
    """An encoder-decoder's two stacks number as many tensors each: refused until --layer-pattern
    names the one the slices take; the model without a config.json gets a folder without one."""
    from safetensors.torch import save_file

    monkeypatch.chdir(tmp_path)
    keys = {f"{stack}.block.{i}.w": torch.full((2,), float(i)) for stack in ("encoder", "decoder") for i in range(3)}
    save_file({**keys, "shared.weight": torch.ones(4, 2)}, "t5.safetensors")
    (tmp_path / "r.yml").write_text("slices:\n  - sources:\n      - model: t5.safetensors\n        layer_range: [1, 3]\n"
                                    "  - sources:\n      - model: t5.safetensors\n        layer_range: [2, 3]\n"
                                    "merge_method: passthrough\n")
    with pytest.raises(UsageError, match="layer-pattern"):
        merge_recipe(tmp_path / "r.yml", WriteOptions("out"))
    report = merge_recipe(tmp_path / "r.yml", WriteOptions("out"), layer_pattern=r"decoder\.block\.(\d+)\.")
    from safetensors.torch import load_file

    got = load_file("out/model.safetensors")
    assert report.layers == 3 and "has no config.json" in report.notes[0]
    assert {k: v[0].item() for k, v in got.items() if k.startswith("decoder")} == {
        "decoder.block.0.w": 1.0, "decoder.block.1.w": 2.0, "decoder.block.2.w": 2.0}
    assert sorted(os.listdir("out")) == ["README.md", "ckptsurgery_recipe.yml", "model.safetensors"]
