"""Recipe plans (ckptsurgery.ops.recipes.plan) held to mergekit 0.1.5's own MergePlanner: tiny
Llama folders (transformers' save_pretrained of a random 32-layer model, hidden size 8 — nothing
from the hub) are planned by mergekit (from their config.json, with its llama architecture file)
and by plan_recipe (from their safetensors' key names and shapes only); both must give the same
output keys, the same source (model, key) per output key, and the same parameter values per
output key and per source (which carry each tensor's t, through gradients)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import yaml

from ckptsurgery.errors import CkptError, UsageError
from ckptsurgery.ops.recipes import ModelRef, Role, load_recipe, plan_lines, plan_recipe

pytest.importorskip("mergekit")
transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

LAYERS = 32


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("llamas")
    for seed, name in enumerate(("a", "b", "c")):
        torch.manual_seed(seed)
        config = transformers.LlamaConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=LAYERS,
                                          num_attention_heads=2, num_key_value_heads=2, vocab_size=32,
                                          tie_word_embeddings=False)
        transformers.LlamaForCausalLM(config).save_pretrained(root / name)
    return root


def key_set(folder: Path) -> dict[str, tuple[int, ...]]:
    """Names and shapes from the safetensors header, in the file's order."""
    with open(folder / "model.safetensors", "rb") as f:
        header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
    return {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}


def mergekit_plan(text: str):
    """key -> ([(model, source key)], shared parameters, {model: its parameters}), the output's
    layer count — from mergekit's MergePlanner."""
    from mergekit.architecture import get_architecture_info
    from mergekit.config import MergeConfiguration
    from mergekit.merge import _model_out_config
    from mergekit.options import MergeOptions
    from mergekit.plan import MergePlanner

    config = MergeConfiguration.model_validate(yaml.safe_load(text))
    options = MergeOptions()
    arch = get_architecture_info(config, options)
    out = _model_out_config(config, arch)
    planner = MergePlanner(config, arch, options, out)
    planner._plan()  # plan_in_memory's ReturnTensor does not build under this pydantic; the tasks are the plan
    found = {}
    for weight, task in planner._tensors:
        sources = [(str(m), w.name) for m, w in task.gather_tensors.weight_info.items()]
        assert [str(m) for m in task.model_order] == [m for m, _ in sources]
        found[weight.name] = (sources, dict(task.parameters),
                              {str(m): dict(v) for m, v in task.input_parameters.items()})
    return found, out.num_hidden_layers


def our_plan(text: str, models: Path):
    recipe = load_recipe(text)
    key_sets = {m: key_set(Path(m.path)) for m in recipe.referenced_models()}
    return plan_recipe(recipe, key_sets)


def assert_same_plan(text: str, models: Path):
    theirs, layers = mergekit_plan(text)
    plan = our_plan(text, models)
    assert plan.layers == layers
    assert sorted(t.key for t in plan.tensors) == sorted(theirs)
    assert len(plan.tensors) == len(theirs)
    for tensor in plan.tensors:
        sources, shared, per_input = theirs[tensor.key]
        assert [(s.model.path, s.key) for s in tensor.sources] == sources, tensor.key
        for name, value in tensor.parameters:
            if name in shared:
                assert value == shared[name], (tensor.key, name)
        for source in tensor.sources:
            for name, value in source.parameters:
                if name in per_input[source.model.path]:
                    assert value == per_input[source.model.path][name], (tensor.key, source.model, name)
        # what mergekit resolved from the recipe, we resolved too (what it did not: its defaults)
        for name, value in shared.items():
            assert value is None or tensor.parameter(name) is not None or name not in text, (tensor.key, name)
    order = [t.layer for t in plan.tensors if t.layer is not None]
    assert set(order) == set(range(layers))
    if "slices:" in text:  # layer after layer, as mergekit; a `models:` plan keeps the reference's order
        assert order == sorted(order)
    else:
        assert [t.key for t in plan.tensors] == list(key_set(Path(plan.reference.path)))
    return plan


def test_depth_up_scaling_solar(models):
    text = f"""
slices:
  - sources:
    - model: {models}/a
      layer_range: [0, 24]
  - sources:
    - model: {models}/a
      layer_range: [8, 32]
merge_method: passthrough
dtype: bfloat16
"""
    plan = assert_same_plan(text, models)
    assert plan.layers == 48
    layer = {t.key: t for t in plan.tensors}
    assert layer["model.layers.30.mlp.up_proj.weight"].sources[0].key == "model.layers.14.mlp.up_proj.weight"
    assert layer["model.layers.14.mlp.up_proj.weight"].sources[0].key == "model.layers.14.mlp.up_proj.weight"
    copies = [t for t in plan.tensors if t.sources[0].key == "model.layers.14.mlp.up_proj.weight"]
    assert len(copies) == 2  # a layer used twice is written twice
    assert {t.role for t in plan.tensors if t.layer is None} == {Role.PRE, Role.POST}


def test_two_model_frankenmerge_with_scale(models):
    text = f"""
slices:
  - sources:
    - model: {models}/a
      layer_range: [0, 20]
  - sources:
    - model: {models}/b
      layer_range: [12, 32]
      parameters:
        scale:
          - filter: o_proj
            value: [0.5, 1.0]
          - filter: down_proj
            value: 0.25
          - filter: layers.13.
            value: 3.0
  - sources:
    - model: {models}/c
      layer_range: [31, 32]
      parameters:
        scale: [0.1, 0.9]
merge_method: passthrough
"""
    plan = assert_same_plan(text, models)
    by_key = {t.key: t for t in plan.tensors}
    assert by_key["model.embed_tokens.weight"].sources[0].model == ModelRef(f"{models}/a")
    assert by_key["lm_head.weight"].sources[0].model == ModelRef(f"{models}/c")
    assert by_key["model.norm.weight"].sources[0].model == ModelRef(f"{models}/c")
    assert by_key["model.layers.20.self_attn.o_proj.weight"].scale == 0.5  # t = 0 at the slice's first layer
    assert by_key["model.layers.39.self_attn.o_proj.weight"].scale == 1.0
    assert by_key["model.layers.39.mlp.down_proj.weight"].scale == 0.25
    assert by_key["model.layers.39.mlp.up_proj.weight"].scale is None
    # a source's own parameters are matched against its key (layer 13), not the output's (21)
    assert by_key["model.layers.21.input_layernorm.weight"].scale == 3.0
    assert by_key["model.layers.13.input_layernorm.weight"].scale is None
    assert by_key["model.layers.40.mlp.up_proj.weight"].scale == 0.9  # a one-layer slice has t = 1
    assert by_key["model.layers.40.mlp.up_proj.weight"].t == 1.0
    assert by_key["lm_head.weight"].scale == 0.1  # outside the layers: t = 0


def test_gradient_slerp_over_models(models):
    text = f"""
models:
  - model: {models}/a
  - model: {models}/b
merge_method: slerp
base_model: {models}/a
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: float16
"""
    plan = assert_same_plan(text, models)
    by_key = {t.key: t for t in plan.tensors}
    assert by_key["model.layers.0.self_attn.q_proj.weight"].parameter("t") == 0
    assert by_key["model.layers.31.self_attn.q_proj.weight"].parameter("t") == 1
    assert by_key["model.layers.31.mlp.up_proj.weight"].parameter("t") == 0
    assert by_key["model.layers.10.input_layernorm.weight"].parameter("t") == 0.5
    assert by_key["model.layers.10.mlp.up_proj.weight"].t == 10 / 31
    assert by_key["model.embed_tokens.weight"].t == 0
    assert plan.reference == ModelRef(f"{models}/a") and plan.container == "model.layers"


def test_gradient_slerp_over_slices(models):
    text = f"""
slices:
  - sources:
      - model: {models}/a
        layer_range: [0, 16]
      - model: {models}/b
        layer_range: [0, 16]
  - sources:
      - model: {models}/b
        layer_range: [16, 32]
      - model: {models}/a
        layer_range: [16, 32]
    parameters:
      t: [{{filter: mlp, value: [0.9, 0.1]}}]
merge_method: slerp
base_model: {models}/a
parameters:
  t: [0.2, 0.8]
"""
    plan = assert_same_plan(text, models)
    by_key = {t.key: t for t in plan.tensors}
    assert by_key["model.layers.15.self_attn.q_proj.weight"].parameter("t") == pytest.approx(0.8)
    assert by_key["model.layers.16.mlp.up_proj.weight"].parameter("t") == pytest.approx(0.9)
    assert by_key["model.layers.16.self_attn.q_proj.weight"].parameter("t") == pytest.approx(0.2)


def test_ties_per_model_gradients_and_an_added_base(models):
    text = f"""
models:
  - model: {models}/a
    parameters:
      density: [0.8, 0.3, 0.1]
      weight: [1.0, 0.8, 0.5]
  - model: {models}/b
    parameters:
      density: 0.33
      weight:
        - filter: mlp
          value: [0.5, 0.1]
        - value: 0
merge_method: ties
base_model: {models}/c
parameters:
  normalize: true
  int8_mask: true
  density: 0.9
dtype: float16
"""
    plan = assert_same_plan(text, models)
    first = plan.tensors[0]
    assert [s.model.path for s in first.sources] == [f"{models}/a", f"{models}/b", f"{models}/c"]
    assert dict(first.sources[2].parameters) == {"density": 0.9, "normalize": True, "int8_mask": True}
    assert plan.ignored == ()


def test_task_arithmetic_with_the_base_listed(models):
    text = f"""
models:
  - model: {models}/c
  - model: {models}/a
    parameters:
      weight: [{{filter: self_attn, value: [0, 2]}}, {{value: 1}}]
  - model: {models}/b
    parameters:
      weight: -0.5
merge_method: task_arithmetic
base_model: {models}/c
parameters:
  lambda: [1, 0.5]
"""
    assert_same_plan(text, models)


def test_refusals(models):
    a, b = ModelRef(f"{models}/a"), ModelRef(f"{models}/b")
    keys_a = key_set(models / "a")
    short = {k: v for k, v in keys_a.items() if k != "model.layers.3.mlp.up_proj.weight"}
    recipe = load_recipe(f"models: [{{model: {a}}}, {{model: {b}}}]\nmerge_method: linear\n")
    with pytest.raises(CkptError, match=r"has no tensor 'model.layers.3.mlp.up_proj.weight'"):
        plan_recipe(recipe, {a: keys_a, b: short})
    extra = {**keys_a, "extra.bias": (3,)}
    assert plan_recipe(recipe, {a: keys_a, b: extra}).ignored == ((b, "extra.bias"),)
    sliced = load_recipe(f"slices: [{{sources: [{{model: {a}, layer_range: [0, 33]}}]}}]\nmerge_method: passthrough\n")
    with pytest.raises(UsageError, match=r"goes past .*'s 32 layers"):
        plan_recipe(sliced, {a: keys_a})
    with pytest.raises(UsageError, match="no layers found"):
        plan_recipe(sliced, {a: {"w": (1,)}})
    pair = load_recipe(f"slices: [{{sources: [{{model: {a}, layer_range: [0, 2]}}, "
                       f"{{model: {b}, layer_range: [2, 4]}}]}}]\nmerge_method: linear\n")
    with pytest.raises(CkptError, match="in its layer 3"):
        plan_recipe(pair, {a: keys_a, b: short})
    twice = load_recipe(f"models: [{{model: {a}}}, {{model: {a}}}]\nmerge_method: linear\n")
    with pytest.raises(UsageError, match="named twice"):
        plan_recipe(twice, {a: keys_a})
    fewer = {k: v for k, v in keys_a.items() if ".31." not in k}
    with pytest.raises(UsageError, match="as many layers"):
        plan_recipe(recipe, {a: keys_a, b: fewer})


def test_layers_are_needed_only_for_gradients():
    a, b = ModelRef("a"), ModelRef("b")
    t5ish = {f"{s}.block.{i}.w": (2,) for s in ("encoder", "decoder") for i in range(3)} | {"shared.weight": (4, 2)}
    plain = load_recipe("models: [{model: a}, {model: b}]\nmerge_method: linear\nparameters: {weight: 0.5}\n")
    plan = plan_recipe(plain, {a: t5ish, b: t5ish})
    assert plan.layers == 0 and all(t.t == 0 for t in plan.tensors)
    graded = load_recipe("models: [{model: a}, {model: b}]\nmerge_method: linear\nparameters: {weight: [0, 1]}\n")
    with pytest.raises(UsageError, match="--layer-pattern"):
        plan_recipe(graded, {a: t5ish, b: t5ish})
    plan = plan_recipe(graded, {a: t5ish, b: t5ish}, layer_pattern=r"^decoder\.block\.(\d+)\.")
    by_key = {t.key: t for t in plan.tensors}
    assert by_key["decoder.block.2.w"].parameter("weight") == 1.0
    assert by_key["encoder.block.2.w"].parameter("weight") == 0  # outside the layers named: t = 0
    assert plan_lines(plan)[0] == "encoder.block.0.w <- linear(a:encoder.block.0.w{weight=0.0}, " \
                                  "b:encoder.block.0.w{weight=0.0}) t=0 weight=0.0"


def test_a_pattern_numbering_two_stacks_keeps_both():
    a = ModelRef("a")
    keys = {f"{s}.block.{i}.w": (2,) for s in ("encoder", "decoder") for i in range(4)} | {"shared.weight": (4, 2)}
    recipe = load_recipe("slices:\n  - sources: [{model: a, layer_range: [0, 2]}]\n"
                         "  - sources: [{model: a, layer_range: [1, 4]}]\nmerge_method: passthrough\n")
    plan = plan_recipe(recipe, {a: keys}, layer_pattern=r"^(?:encoder|decoder)\.block\.(\d+)\.")
    assert plan.layers == 5 and [t.key for t in plan.tensors][:3] == ["shared.weight", "encoder.block.0.w",
                                                                     "decoder.block.0.w"]
    by_key = {t.key: t.sources[0].key for t in plan.tensors}
    assert by_key["encoder.block.4.w"] == "encoder.block.3.w" and by_key["decoder.block.2.w"] == "decoder.block.1.w"
    assert len(plan.tensors) == 11
