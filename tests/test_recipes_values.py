"""Parameter values (ckptsurgery.ops.recipes.values) against mergekit 0.1.5's own: every setting
below is read by both parsers and evaluated by both (`evaluate_setting`, and
`resolve_parameter` over ConfigReader's scopes for precedence) for many tensor names and t —
the same value, to the bit."""

from __future__ import annotations

import itertools
import pytest
import yaml

from ckptsurgery.ops.recipes import Settings, evaluate, load_recipe, resolve
from ckptsurgery.ops.recipes.schema import _setting

mergekit_config = pytest.importorskip("mergekit.config")
from mergekit.merge_methods.base import ParameterScope, ParameterSpec
from mergekit.parameter_resolver import resolve_parameter
from pydantic import TypeAdapter

SETTINGS = [
    "0.5", "1", "true", "'text'", "[]", "[0.3]", "[0, 1]", "[0, 0.5, 0.3, 0.7, 1]", "[1, 0.5, 0.7, 0.3, 0]",
    "[0.8, 0.3, 0.1]", "[1, 2, 3]", "[true, false]", "[a, b, c]", "[0, true, 1]", "[1e-3, 0.5]",
    "{filter: self_attn, value: 0.2}", "{value: [0, 1]}", "{filter: '*', value: [1, 0]}",
    "[{filter: self_attn, value: [0, 0.5, 0.3, 0.7, 1]}, {filter: mlp, value: [1, 0.5, 0.7, 0.3, 0]}, {value: 0.5}]",
    "[{filter: q_proj, value: 0.2}, {filter: proj, value: [0.1, 0.9]}]",
    "[{filter: mlp, value: []}, {value: 0.7}]",
    "[{filter: layers.1., value: 3}, {filter: embed, value: [2, 4]}, {filter: '', value: 9}]",
]
TENSORS = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.up_proj.weight",
           "model.layers.13.self_attn.o_proj.weight", "model.norm.weight", "lm_head.weight", ""]
TS = [0.0, 1e-9, 0.1, 0.2, 0.25, 1 / 3, 0.5, 0.6, 2 / 3, 0.7, 0.75, 0.9, 0.999999, 1.0] + [i / 39 for i in range(40)]

ANY = TypeAdapter(object).validate_python  # mergekit validates by the parameter's type; none here
FLOAT = TypeAdapter(float | None).validate_python


def _theirs(text):
    return TypeAdapter(mergekit_config.ParameterSetting).validate_python(yaml.safe_load(text))


def _ours(text):
    return _setting(yaml.safe_load(text), "recipe", "x")


def _same(a, b):
    return type(a) is type(b) and a == b


@pytest.mark.parametrize("text", SETTINGS)
def test_evaluate_as_mergekit(text):
    theirs, ours = _theirs(text), _ours(text)
    for tensor, t in itertools.product(TENSORS, TS):
        expected = mergekit_config.evaluate_setting(tensor, theirs, t, validate=ANY)
        assert _same(evaluate(ours, tensor, t), expected), (tensor, t)


@pytest.mark.parametrize("text", [s for s in SETTINGS if "text" not in s and "a, b" not in s and "true" not in s])
def test_evaluate_with_the_parameters_type_as_mergekit(text):
    """A float parameter: YAML's `1e-3` (text under YAML 1.1) becomes a number and interpolates."""
    theirs, ours = _theirs(text), _ours(text)
    for tensor, t in itertools.product(TENSORS, TS):
        try:
            expected = mergekit_config.evaluate_setting(tensor, theirs, t, validate=FLOAT)
        except ValueError:  # pydantic refuses the value: so must we
            with pytest.raises(ValueError):
                evaluate(ours, tensor, t, FLOAT)
            continue
        assert _same(evaluate(ours, tensor, t, FLOAT), expected), (tensor, t)


RECIPE = """
merge_method: ties
base_model: ./base
slices:
  - sources:
      - model: ./base
        layer_range: [0, 8]
      - model: ./a
        layer_range: [0, 8]
        parameters:
          weight: [{filter: mlp, value: [0.1, 0.9]}]
          density: {filter: self_attn, value: [0.2, 0.4, 0.8]}
      - model: ./b
        layer_range: [0, 8]
        parameters:
          density: [{filter: q_proj, value: 0.3}, {filter: mlp, value: []}]
          gamma: 0.5
    parameters:
      weight: [{filter: self_attn, value: 0.25}]
      density: [{filter: mlp, value: 0.6}]
parameters:
  weight: 1.0
  density: [0.9, 0.1]
  epsilon: [{filter: embed, value: 0.05}]
"""


def test_precedence_as_mergekit():
    """slice source > slice > recipe; a filter list that gives nothing falls through."""
    theirs = mergekit_config.MergeConfiguration.model_validate(yaml.safe_load(RECIPE))
    ours = load_recipe(RECIPE)
    reader = mergekit_config.ConfigReader(config=theirs, t=0, slice_out=theirs.slices[0])
    piece = ours.slices[0]
    for index, source in enumerate(piece.sources):
        their_model = theirs.slices[0].sources[index].model
        scopes = [source.parameters, piece.parameters, ours.parameters]
        for name, tensor, t in itertools.product(("weight", "density", "gamma", "epsilon", "lambda"), TENSORS, TS):
            spec = ParameterSpec(name, float | None, ParameterScope.INPUT, default=None)
            expected = resolve_parameter(spec, tuple(reader.with_t(t).parameter_sources(their_model)),
                                         tensor_name=tensor, t=t)
            assert _same(resolve(scopes, name, tensor, t, FLOAT), expected), (index, name, tensor, t)
    shared = [piece.parameters, ours.parameters]
    for name, tensor, t in itertools.product(("weight", "density", "epsilon"), TENSORS, TS):
        spec = ParameterSpec(name, float | None, ParameterScope.SHARED, default=None)
        expected = resolve_parameter(spec, tuple(reader.with_t(t).parameter_sources(None)), tensor_name=tensor, t=t)
        assert _same(resolve(shared, name, tensor, t, FLOAT), expected), (name, tensor, t)


def test_worked_values():
    gradient = _ours("[0, 0.5, 0.3, 0.7, 1]")
    assert evaluate(gradient, "x", 0.0) == 0 and evaluate(gradient, "x", 1.0) == 1
    assert evaluate(gradient, "x", 0.5) == 0.3
    assert evaluate(gradient, "x", 0.125) == pytest.approx(0.25)
    assert evaluate(_ours("[a, b, c]"), "x", 0.99) == "b"  # picked at ⌊t·(len − 1)⌋, not rounded
    assert evaluate(_ours("[]"), "x", 0.5) is None
    assert resolve([Settings(), None], "weight", "x") is None
