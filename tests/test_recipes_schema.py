"""Recipes (ckptsurgery.ops.recipes.schema) read as mergekit 0.1.5 reads them: each recipe below is
parsed by mergekit's own MergeConfiguration and by load_recipe, and both must agree on the
models, slices, method, base, dtypes, tokenizer source and every parameter setting.

mergekit's wheel ships no examples/*.yml (and none of its tests), so RECIPES is a set written
for these tests after mergekit's examples (gradient-slerp.yml, ties.yml, linear.yml,
orcamini-platy-44layer.yml, mega.yml's two documents) and covering each schema feature of 0.1.5."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from ckptsurgery.errors import CkptError, UsageError
from ckptsurgery.ops.recipes import (
    Conditional, Filtered, Gradient, ModelRef, TokenizerKind, load_recipe, refuse_unknown_parameters, schema,
    setting_names,
)

mergekit_config = pytest.importorskip("mergekit.config")

RECIPES = {
    "linear": """
models:
  - model: ./psmathur/orca_mini_v3_13b
    parameters:
      weight: 1.0
  - model: ./WizardLM/WizardLM-13B-V1.2
    parameters:
      weight: 0.3
  - model: ./garage-bAInd/Platypus2-13B
    parameters:
      weight: 0.5
merge_method: linear
dtype: float16
""",
    "ties-gradients": """
models:
  - model: ./phi-2-super # Best
    parameters:
      density: [0.8, 0.3, 0.1]
      weight: [1.0, 0.8, 0.5]
  - model: ./phi-2-orange-v2
    parameters:
      density: [0.1, 0.4, 0.1]
      weight: [0.2, 0.8, 0.1]
merge_method: ties
base_model: ./phi-2
parameters:
dtype: bfloat16
""",
    "gradient-slerp": """
slices:
  - sources:
      - model: ./orca_mini_v3_13b
        layer_range: [0, 40]
      - model: ./Platypus2-13B
        layer_range: [0, 40]
merge_method: slerp
base_model: ./orca_mini_v3_13b
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5 # fallback for rest of tensors
dtype: float16
""",
    "frankenmerge": """
slices:
  - sources:
    - model: ./orca_mini_v3_13b
      layer_range: [0, 24]
  - sources:
    - model: ./Platypus2-13B
      layer_range: [20, 40]
merge_method: passthrough
dtype: float16
""",
    "solar": """
slices:
  - sources:
    - model: ./Mistral-7B
      layer_range: [0, 24]
  - sources:
    - model: ./Mistral-7B
      layer_range: [8, 32]
merge_method: passthrough
dtype: bfloat16
""",
    "ties-filters-lora": """
models:
  - model: ./gradient-slerp
    parameters:
      density: [1, 0.7, 0.1] # density gradient
      weight: 1.0
  - model: ./WizardMath-13B+./adapters/math-lora
    parameters:
      density: 0.33
      weight:
        - filter: mlp
          value: 0.5
        - value: 0
merge_method: ties
base_model: ./Llama-2-13B-fp16
parameters:
  normalize: true
  int8_mask: true
dtype: float16
out_dtype: bfloat16
tokenizer_source: base
""",
    "dare-slices-everything": """
merge_method: dare_ties
base_model: ./base
slices:
  - sources:
      - model: ./base
        layer_range: [0, 4]
      - model: ./a
        layer_range: [4, 8]
        parameters:
          weight: {filter: "*", value: [0.1, 0.9]}
          density: [0.5, 0.5, 0.9]
      - model: ./b+./b-lora
        layer_range: [0, 4]
        parameters:
          weight: [{filter: q_proj, value: 0.2}, {filter: mlp, value: []}, {value: 0.7}]
    parameters:
      epsilon: 1e-3
      lambda: 1.0
    base_model: ./base
  - sources:
      - model: ./base
        layer_range: [8, 9]
      - model: ./a
        layer_range: [8, 9]
    residual_weight: 0.5
parameters:
  density: 0.5
  rescale: false
  int8_mask: True
  label: "some text"
  gamma: 0.01
tokenizer_source: ./a
chat_template: chatml
dtype: torch.float32
""",
    "task-arithmetic-scalars": """
models:
  - model: ./m1
    parameters: {weight: 1}
  - model: ./m2
    parameters: {weight: -1, scale: 2.5e+0}
  - model: ./base
merge_method: task_arithmetic
base_model: ./base
parameters:
  normalize: false
  lambda: [1, 0.5]
""",
}


def _theirs_setting(value):
    """mergekit's parsed ParameterSetting in one plain form."""
    if isinstance(value, mergekit_config.ConditionalParameter):
        value = [value]
    if isinstance(value, list) and value and all(isinstance(v, mergekit_config.ConditionalParameter) for v in value):
        return ("filters", [(c.filter, _theirs_setting(c.value)) for c in value])
    if isinstance(value, list):
        return ("gradient", list(value))
    return value


def _ours_setting(value):
    if isinstance(value, Filtered):
        return ("filters", [(c.filter, _ours_setting(c.value)) for c in value.entries])
    if isinstance(value, Gradient):
        return ("gradient", list(value.values))
    return value


def _theirs_params(params):
    return {k: _theirs_setting(v) for k, v in (params or {}).items()}


def _ours_params(settings):
    return {k: _ours_setting(v) for k, v in settings.items}


def _dtype(name):
    return None if name is None else name.removeprefix("torch.")


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipes_agree_with_mergekit(name):
    text = RECIPES[name]
    theirs = mergekit_config.MergeConfiguration.model_validate(yaml.safe_load(text))
    ours = load_recipe(text)
    assert ours.merge_method == theirs.merge_method
    assert str(ours.base_model or "") == str(theirs.base_model or "")
    assert ours.dtype == _dtype(theirs.dtype) and ours.out_dtype == _dtype(theirs.out_dtype)
    assert ours.chat_template == theirs.chat_template
    assert _ours_params(ours.parameters) == _theirs_params(theirs.parameters)
    if theirs.models:
        assert [(str(m.model), _ours_params(m.parameters)) for m in ours.models] == \
            [(str(m.model), _theirs_params(m.parameters)) for m in theirs.models]
        assert ours.slices is None
    else:
        assert ours.models is None
        assert len(ours.slices) == len(theirs.slices)
        for mine, their in zip(ours.slices, theirs.slices):
            assert str(mine.base_model or "") == str(their.base_model or "")
            assert _ours_params(mine.parameters) == _theirs_params(their.parameters)
            assert [(str(s.model), s.layer_range, _ours_params(s.parameters)) for s in mine.sources] == \
                [(str(s.model), tuple(s.layer_range), _theirs_params(s.parameters)) for s in their.sources]
    source = theirs.tokenizer_source
    if source is None:
        assert ours.tokenizer_source is None
    elif source == "base":
        assert ours.tokenizer_source.kind == TokenizerKind.BASE
    else:
        assert ours.tokenizer_source.kind == TokenizerKind.MODEL and str(ours.tokenizer_source.model) == str(source)
    assert {str(m) for m in ours.referenced_models()} == {str(m) for m in theirs.referenced_models()} | \
        ({str(ours.tokenizer_source.model)} if ours.tokenizer_source and ours.tokenizer_source.model else set())


def test_lora_references_split_as_mergekit_splits_them():
    recipe = load_recipe(RECIPES["dare-slices-everything"])
    theirs = mergekit_config.MergeConfiguration.model_validate(yaml.safe_load(RECIPES["dare-slices-everything"]))
    mine, their = recipe.slices[0].sources[2].model, theirs.slices[0].sources[2].model
    assert mine == ModelRef("./b", "./b-lora")
    assert (mine.path, mine.lora) == (their.model.path, their.lora.path)
    assert recipe.notes == ("slices[1].residual_weight is ignored, as mergekit 0.1.5 ignores it",)


def test_setting_forms():
    recipe = load_recipe(RECIPES["dare-slices-everything"])
    weight = recipe.slices[0].sources[1].parameters.get("weight")
    assert weight == Filtered((Conditional("*", Gradient((0.1, 0.9))),))
    listed = recipe.slices[0].sources[2].parameters.get("weight")
    assert listed.entries[1] == Conditional("mlp", Gradient(()))
    assert recipe.parameters.get("int8_mask") is True and recipe.parameters.get("label") == "some text"
    assert recipe.slices[0].parameters.get("epsilon") == "1e-3"  # YAML 1.1: no dot, no float (mergekit's too)
    assert setting_names(recipe)["weight"] == "slices[0].sources[1].parameters.weight"
    assert recipe.dtype == "float32"


def test_from_a_file(tmp_path):
    path = tmp_path / "r.yml"
    path.write_text(RECIPES["solar"])
    assert load_recipe(path) == load_recipe(RECIPES["solar"])
    assert load_recipe(path).slices[1].sources[0].layer_range == (8, 32)


@pytest.mark.parametrize("text, words", [
    ("modles: []\nmerge_method: linear\n", "unknown key 'modles' (did you mean 'models'?)"),
    ("models:\n  - model: a\n    paramters: {weight: 1}\nmerge_method: linear\n",
     "models[0]: unknown key 'paramters' (did you mean 'parameters'?)"),
    (("slices:\n  - sources:\n      - model: a\n        layer_range: [0, 2]\n        layers: 3\n"
      "merge_method: passthrough\n"),
     "slices[0].sources[0]: unknown key 'layers'"),
    (("models:\n  - model: a\n    parameters:\n      t:\n        - pattern: self_attn\n          value: 1\n"
      "merge_method: slerp\n"), "models[0].parameters.t[0]: unknown key 'pattern'"),
    ("models:\n  - model: a\nmerge_method: linear\ntokenizer_source: union\n", "union"),
    ("modules: {}\nmerge_method: linear\n", "`modules:`"),
    ("models:\n  - model: a\nmerge_method: linear\ntokenizer: {source: base}\n", "`tokenizer:`"),
    ("models:\n  - model: a\nslices: []\nmerge_method: linear\n", "exactly one of `models:` and `slices:`"),
    ("models:\n  - model: a\n", "`merge_method:`"),
    ("models:\n  - model: a+b+c\nmerge_method: linear\n", "more than one '+'"),
    ("models:\n  - model: org/m@main\nmerge_method: linear\n", "hub revision"),
    ("models:\n  - model: a\nmerge_method: linear\ndtype: float8\n", "dtype 'float8': not one of"),
    ("slices:\n  - sources:\n      - model: a\n        layer_range: [3, 3]\nmerge_method: passthrough\n",
     "0 <= start < end"),
    (("slices:\n  - sources:\n      - model: a\n        layer_range: [0, 2]\n      - model: b\n"
      "        layer_range: [0, 3]\nmerge_method: linear\n"), "as many layers (here 2, 3)"),
    ("slices:\n  - sources:\n      - model: a\n        layer_range: [0.5, 2]\nmerge_method: passthrough\n",
     "two whole numbers"),
    ("models:\n  - model: a\n    parameters: {weight: [1, {filter: x, value: 2}]}\nmerge_method: linear\n",
     "models[0].parameters.weight[1] must be"),
    ("models:\n  - model: a\n    parameters: {weight: .nan}\nmerge_method: linear\n", "not a finite number"),
    ("models:\n  - model: a\n    parameters: {weight: null}\nmerge_method: linear\n", "nothing (null)"),
    ("models:\n  - model: a\n    parameters: {weight: {value: 1, filter: 3}}\nmerge_method: linear\n",
     "filter must be text"),
    ("models:\n  - {parameters: {weight: 1}}\nmerge_method: linear\n", "models[0] has no `model:`"),
    ("- 1\n- 2\n", "a recipe is a mapping"),
])
def test_refusals_name_the_key_and_place(text, words):
    with pytest.raises(UsageError) as e:
        load_recipe(text)
    message = str(e.value)
    assert words in message and "\n" not in message and message.startswith("recipe: ")


@pytest.mark.parametrize("text, words", [
    ("models: [\n", "not valid YAML"),
    ("merge_method: linear\n---\nmerge_method: ties\n", "more than one document"),
    ("a: &a [*a]\n", "holds itself"),
    ("[" * 5000 + "]" * 5000, "nest"),
])
def test_bad_files_are_ckpt_errors(text, words):
    with pytest.raises(CkptError) as e:
        load_recipe(text)
    assert words in str(e.value) and not isinstance(e.value, UsageError)


def test_billion_laughs_is_refused_quickly():
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    text = "\n".join(lines) + "\nmerge_method: linear\nmodels: [{model: a, parameters: {weight: *a9}}]\n"
    start = time.perf_counter()
    with pytest.raises(CkptError, match="expands to more than"):
        load_recipe(text)
    assert time.perf_counter() - start < 1.0


def test_aliases_that_stay_small_are_fine():
    text = "merge_method: linear\nmodels:\n  - model: a\n    parameters: &p {weight: [0, 1]}\n" \
           "  - model: b\n    parameters: *p\n"
    recipe = load_recipe(text)
    assert recipe.models[0].parameters == recipe.models[1].parameters


def test_file_size_is_capped(tmp_path, monkeypatch):
    path = tmp_path / "big.yml"
    path.write_text("merge_method: linear\n" + "# padding\n" * 200)
    monkeypatch.setattr(schema, "MAX_BYTES", 1000)
    with pytest.raises(CkptError, match="too large for a recipe"):
        load_recipe(path)
    with pytest.raises(CkptError, match="cannot read the recipe"):
        load_recipe(tmp_path / "missing.yml")
    (tmp_path / "bin.yml").write_bytes(b"merge_method: \xff\n")
    with pytest.raises(CkptError, match="not UTF-8"):
        load_recipe(tmp_path / "bin.yml")
    assert isinstance(tmp_path, Path)


def test_without_libyaml(monkeypatch):
    """PyYAML's own (Python) loader where libyaml is missing: the same refusals."""
    monkeypatch.delattr(yaml, "CSafeLoader", raising=False)
    with pytest.raises(CkptError, match="nested too deeply|nest"):  # past Python's recursion limit; PyYAML's
        load_recipe("[" * 1500 + "]" * 1500)  # Python scanner is quadratic in the depth (20000: 20 s)
    test_billion_laughs_is_refused_quickly()
    assert load_recipe(RECIPES["solar"]).slices[0].sources[0].layer_range == (0, 24)


def test_parameters_a_method_does_not_take_are_named_where_they_are():
    recipe = load_recipe(RECIPES["ties-filters-lora"])
    refuse_unknown_parameters(recipe, ["weight", "density", "normalize", "int8_mask"])
    with pytest.raises(UsageError) as e:
        refuse_unknown_parameters(recipe, ["weight", "density", "normalize", "int8_masks"])
    assert str(e.value) == "parameters.int8_mask: ties does not take 'int8_mask' (did you mean 'int8_masks'? it " \
                           "takes: density, int8_masks, normalize, weight)"
    with pytest.raises(UsageError, match=r"^parameters.normalize: linear does not take 'normalize' \(it takes"):
        refuse_unknown_parameters(recipe, ["weight"], "linear")
