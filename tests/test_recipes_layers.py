"""Layers found from key names alone (ckptsurgery.ops.recipes.layers), on the key sets of the
model families mergekit has architecture files for, and --layer-pattern's checks."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from ckptsurgery.errors import UsageError
from ckptsurgery.ops.recipes import Role, Template, check_layer_pattern, layer_scheme, side

LLAMA_LAYER = ["input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight",
               "self_attn.v_proj.weight", "self_attn.o_proj.weight", "post_attention_layernorm.weight",
               "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"]


def llama(n=4, tied=False):
    keys = ["model.embed_tokens.weight"] + [f"model.layers.{i}.{k}" for i in range(n) for k in LLAMA_LAYER]
    return keys + ["model.norm.weight"] + ([] if tied else ["lm_head.weight"])


def gpt2(n=12):
    layer = ["ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
             "attn.c_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight",
             "mlp.c_proj.bias"]
    return ["transformer.wte.weight", "transformer.wpe.weight"] + \
        [f"transformer.h.{i}.{k}" for i in range(n) for k in layer] + \
        ["transformer.ln_f.weight", "transformer.ln_f.bias", "lm_head.weight"]


def bert(n=12):
    layer = ["attention.self.query.weight", "attention.self.key.weight", "attention.self.value.weight",
             "attention.output.dense.weight", "attention.output.LayerNorm.weight", "intermediate.dense.weight",
             "output.dense.weight", "output.LayerNorm.weight"]
    return ["bert.embeddings.word_embeddings.weight", "bert.embeddings.position_embeddings.weight",
            "bert.embeddings.token_type_embeddings.weight", "bert.embeddings.LayerNorm.weight"] + \
        [f"bert.encoder.layer.{i}.{k}" for i in range(n) for k in layer] + \
        ["bert.pooler.dense.weight", "bert.pooler.dense.bias", "cls.predictions.bias"]


def vit(n=12):
    layer = ["norm1.weight", "attn.qkv.weight", "attn.proj.weight", "norm2.weight", "mlp.fc1.weight", "mlp.fc2.weight"]
    return ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"] + \
        [f"blocks.{i}.{k}" for i in range(n) for k in layer] + ["norm.weight", "head.weight", "head.bias"]


def t5(n=6):
    enc = ["layer.0.SelfAttention.q.weight", "layer.0.SelfAttention.k.weight", "layer.0.SelfAttention.v.weight",
           "layer.0.SelfAttention.o.weight", "layer.0.layer_norm.weight", "layer.1.DenseReluDense.wi.weight",
           "layer.1.DenseReluDense.wo.weight", "layer.1.layer_norm.weight"]
    dec = enc[:5] + ["layer.1.EncDecAttention.q.weight", "layer.1.EncDecAttention.k.weight",
                     "layer.1.EncDecAttention.v.weight", "layer.1.EncDecAttention.o.weight",
                     "layer.1.layer_norm.weight", "layer.2.DenseReluDense.wi.weight",
                     "layer.2.DenseReluDense.wo.weight", "layer.2.layer_norm.weight"]
    return ["shared.weight"] + [f"encoder.block.{i}.{k}" for i in range(n) for k in enc] + \
        ["encoder.final_layer_norm.weight"] + [f"decoder.block.{i}.{k}" for i in range(n) for k in dec] + \
        ["decoder.final_layer_norm.weight", "lm_head.weight"]


def mixtral(n=2, experts=8):
    layer = ["input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.o_proj.weight",
             "block_sparse_moe.gate.weight", "post_attention_layernorm.weight"]
    layer += [f"block_sparse_moe.experts.{e}.w{w}.weight" for e in range(experts) for w in (1, 2, 3)]
    return ["model.embed_tokens.weight"] + [f"model.layers.{i}.{k}" for i in range(n) for k in layer] + \
        ["model.norm.weight", "lm_head.weight"]


@pytest.mark.parametrize("keys, container, count", [
    (llama(4), "model.layers", 4), (llama(1, tied=True), "model.layers", 1), (gpt2(12), "transformer.h", 12),
    (bert(12), "bert.encoder.layer", 12), (vit(12), "blocks", 12), (mixtral(2, 8), "model.layers", 2),
    (mixtral(1, 64), "model.layers", 1),
])
def test_the_layer_container_is_found(keys, container, count):
    scheme = layer_scheme(keys)
    assert (scheme.container, scheme.count) == (container, count)
    numbered = [k for k in keys if scheme.layer_of(k) is not None]
    assert all(k.startswith(container + ".") for k in numbered)
    assert len(numbered) == len([k for k in keys if k.startswith(container + ".")])


def test_split_and_templates():
    scheme = layer_scheme(mixtral(12, 4))
    index, template = scheme.split("model.layers.11.block_sparse_moe.experts.3.w1.weight")
    assert index == 11 and template == Template("model.layers.", ".block_sparse_moe.experts.3.w1.weight")
    assert template.key(40) == "model.layers.40.block_sparse_moe.experts.3.w1.weight"
    assert str(template) == "model.layers.{layer}.block_sparse_moe.experts.3.w1.weight"
    assert scheme.split("model.norm.weight") == (None, None)
    assert scheme.split("model.layers.norm") == (None, None)
    assert layer_scheme(["w", "b", "net.weight"]).count == 0
    assert layer_scheme([]).split("x") == (None, None)


def test_two_stacks_are_ambiguous_unless_a_pattern_says():
    with pytest.raises(UsageError) as e:
        layer_scheme(t5(6), "t5")
    message = str(e.value)
    assert "decoder.block.N" in message and "encoder.block.N" in message and "--layer-pattern" in message
    scheme = layer_scheme(t5(6), "t5", r"decoder\.block\.(\d+)\.")
    assert scheme.count == 6 and scheme.layer_of("decoder.block.5.layer.0.SelfAttention.q.weight") == 5
    assert scheme.layer_of("encoder.block.5.layer.0.SelfAttention.q.weight") is None


def test_equal_stacks_are_ambiguous():
    keys = [f"{side}.layers.{i}.w" for side in ("encoder", "decoder") for i in range(3)]
    with pytest.raises(UsageError, match="ambiguous"):
        layer_scheme(keys)


def test_numbers_that_are_not_layers_are_refused():
    keys = ["features.0.weight", "features.0.bias", "features.3.weight", "features.3.bias", "classifier.weight"]
    with pytest.raises(UsageError, match=r"features\.N numbers 0, 3: not the layers"):
        layer_scheme(keys, "vgg")


def test_leading_zeros_are_not_numbers():
    scheme = layer_scheme(["model.layers.0.w", "model.layers.1.w", "model.layers.01.w"])
    assert scheme.count == 2 and scheme.layer_of("model.layers.01.w") is None


@pytest.mark.parametrize("pattern, words", [
    (r"layers\.\d+", "exactly one group"),
    (r"(layers)\.(\d+)", "exactly one group"),
    (r"layers\.(\d+", "not a valid regular expression"),
    (r"(a+)+\1", "back-reference"),
    (r"((a+)+)", "exactly one group"),
    (r"((?:a|a)*)*b", "too long"),
    (r"(?:(?:a|aa)+)+(\d)", "too long"),
    ("", "1 to 1000 characters"),
    ("x" * 1001, "1 to 1000 characters"),
    (r".*.*\.h\.(\d+)", "not anchored"),
])
def test_bad_patterns_are_refused(pattern, words):
    start = time.perf_counter()
    with pytest.raises(UsageError, match=words):
        check_layer_pattern(pattern, 120)
    assert time.perf_counter() - start < 1


def test_given_patterns_are_checked_against_the_keys():
    with pytest.raises(UsageError, match="matches none of"):
        layer_scheme(llama(2), "m", r"blocks\.(\d+)\.")
    with pytest.raises(UsageError, match="not a layer number"):
        layer_scheme(llama(2), "m", r"model\.(\w+)\.")
    with pytest.raises(UsageError, match="not the layers"):
        layer_scheme(["a.2.w", "a.3.w"], "m", r"a\.(\d+)\.")
    assert layer_scheme(llama(3), "m", r"layers\.(\d+)\.").count == 3
    for pattern in (r"model\.layers\.(\d+)\.", r"^.*?\.h\.([0-9]+)\.", r"(?:encoder|decoder)\.block\.(\d+)"):
        assert check_layer_pattern(pattern, 300).groups == 1  # real patterns pass on long keys


# ---- which side of the layers a key outside them is on ------------------------------------------

ARCHITECTURES = Path(pytest.importorskip("mergekit").__file__).parent / "_data" / "architectures"
# vision towers and projectors of multimodal models (mergekit plans them as modules, which
# recipes here do not take): their input-side tensors have no embedding-like name
NOT_BY_NAME = {"conv1.bias", "conv1.weight", "conv2.bias", "conv2.weight", "norm.weight", "linear_1.weight",
               "linear_2.weight", "patch_conv.weight", "patch_merger.merging_layer.weight",
               "transformer.relative_pe.slopes", "model.visual.merger.linear_fc1.bias",
               "model.visual.merger.linear_fc1.weight", "model.visual.merger.linear_fc2.bias",
               "model.visual.merger.linear_fc2.weight", "model.visual.merger.norm.bias",
               "model.visual.merger.norm.weight", "visual.merger.ln_q.bias", "visual.merger.ln_q.weight"}


def _weights(data, found):
    if isinstance(data, dict):
        for key, value in data.items():
            if key in ("pre_weights", "post_weights"):
                found.update((w["name"], Role.PRE if key == "pre_weights" else Role.POST) for w in value
                             if "$" not in w["name"])
            else:
                _weights(value, found)
    elif isinstance(data, list):
        for value in data:
            _weights(value, found)
    return found


def test_sides_agree_with_mergekits_architecture_files():
    found = set()
    for path in sorted(ARCHITECTURES.glob("*.json")):
        _weights(json.loads(path.read_text()), found)
    assert len(found) > 100
    wrong = sorted((name, role.value) for name, role in found if side(name) != role and name not in NOT_BY_NAME)
    assert not wrong
    assert {name for name, role in found if side(name) != role} == NOT_BY_NAME


@pytest.mark.parametrize("key, role", [
    ("model.embed_tokens.weight", Role.PRE), ("transformer.wte.weight", Role.PRE), ("shared.weight", Role.PRE),
    ("gpt_neox.embed_in.weight", Role.PRE), ("cls_token", Role.POST), ("pos_embed", Role.PRE),
    ("model.norm.weight", Role.POST), ("lm_head.weight", Role.POST), ("embed_out.weight", Role.POST),
    ("transformer.ln_f.weight", Role.POST), ("bert.pooler.dense.weight", Role.POST),
])
def test_sides(key, role):
    assert side(key) == role
