"""LoRA: `merge BASE --lora ADAPTER` equals peft's merge_and_unload() on models built here (PEFT
folders and kohya files), and `extract-lora` writes adapters that peft loads and that fold back
into TUNED within the error the report states; and hand-made adapters (hostile configs, names
that resolve twice or not at all, careless use of extract-lora) refused in one line or bounded."""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections import OrderedDict

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from conftest import ROOT, assert_one_error_line, load_any

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402


class Small(nn.Module):
    """One of each layer peft's LoRA adapts: embedding, linear (two, one not square), conv 2-D
    and 1-D, and a transformers Conv1D (GPT-2's [in, out] linear, peft's fan_in_fan_out)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.lin = nn.Linear(6, 5)
        self.sq = nn.Linear(5, 5, bias=False)
        self.conv = nn.Conv2d(3, 4, 3)
        self.conv1 = nn.Conv1d(4, 6, 2)
        self.gpt = Conv1D(7, 5)  # nf=7 outputs, nx=5 inputs: weight [5, 7]
        self.head = nn.Linear(7, 2)


TARGETS = ["emb", "lin", "sq", "conv", "conv1", "gpt"]


def randomise(model, seed=1):
    """peft starts lora_B (and lora_embedding_A) at zero: give every factor values."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * 0.3
    return model


def peft_model(make, config, seed=1):
    torch.manual_seed(0)
    base = make()
    base_sd = copy.deepcopy(base.state_dict())  # a copy that keeps tied weights tied
    model = randomise(get_peft_model(base, config), seed)
    return model, base_sd


def save_adapter(model, folder, safe=True):
    model.save_pretrained(str(folder), safe_serialization=safe)
    return folder


def merged_reference(model) -> dict:
    return {k: v.clone() for k, v in model.merge_and_unload().state_dict().items()}


def assert_close(out: dict, ref: dict, atol=1e-5, rtol=1e-5):
    assert sorted(out) == sorted(ref)
    for k in ref:
        assert out[k].dtype == ref[k].dtype, k
        assert out[k].shape == ref[k].shape, k
        assert torch.allclose(out[k].float(), ref[k].float(), atol=atol, rtol=rtol), (k, (out[k] - ref[k]).abs().max())


# ---- PEFT: equal to merge_and_unload ---------------------------------------------------------

@pytest.mark.parametrize("options", [
    dict(r=4, lora_alpha=8),
    dict(r=3, lora_alpha=5, use_rslora=True),
    dict(r=2, lora_alpha=4, rank_pattern={"lin": 5, "^conv$": 3}, alpha_pattern={"sq": 7.5, "conv1": 1}),
])
def test_fold_equals_peft_merge_and_unload(cli, tmp_path, options):
    model, base_sd = peft_model(Small, LoraConfig(target_modules=TARGETS, fan_in_fan_out=False, **options))
    adapter = save_adapter(model, tmp_path / "adapter")
    ref = merged_reference(model)
    save_file(base_sd, tmp_path / "base.safetensors")
    result = cli("merge", tmp_path / "base.safetensors", "--lora", adapter, "-o", tmp_path / "out.safetensors", "--json")
    assert result.code == 0, result.err
    assert_close(load_file(tmp_path / "out.safetensors"), ref)
    doc = result.json()
    assert doc["mode"] == "lora" and doc["folded"] == len(TARGETS) and doc["unmatched"] == []
    assert doc["adapters"][0]["format"] == "peft" and doc["adapters"][0]["scale"] == 1.0
    # untouched tensors are the base's bytes
    out = load_file(tmp_path / "out.safetensors")
    assert torch.equal(out["head.weight"], base_sd["head.weight"]) and torch.equal(out["lin.bias"], base_sd["lin.bias"])


def test_pth_base_bin_adapter_and_scale(cli, tmp_path):
    model, base_sd = peft_model(Small, LoraConfig(r=2, lora_alpha=3, target_modules=["lin", "conv", "emb"]))
    adapter = save_adapter(model, tmp_path / "adapter", safe=False)
    assert (adapter / "adapter_model.bin").exists() and not (adapter / "adapter_model.safetensors").exists()
    torch.save(base_sd, tmp_path / "base.pth")
    ref_full = merged_reference(model)
    out = tmp_path / "out.pth"
    assert cli("merge", tmp_path / "base.pth", "--lora", adapter, "--lora-scale", "0.5", "-o", out).code == 0
    got = load_any(out)
    for k in ref_full:  # W + 0.5·Δ, from the full fold: (W + Δ + W) / 2
        expected = (ref_full[k] + base_sd[k]) / 2
        assert torch.allclose(got[k], expected, atol=1e-5), k


def test_two_adapters_add_up_in_order_with_their_scales(cli, tmp_path):
    torch.manual_seed(0)
    base = Small()
    base_sd = {k: v.clone() for k, v in base.state_dict().items()}
    deltas = []
    for i, (targets, r) in enumerate([(["lin", "conv"], 2), (["lin", "gpt", "emb"], 3)]):
        torch.manual_seed(0)
        model = randomise(get_peft_model(Small(), LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets)), seed=i + 5)
        save_adapter(model, tmp_path / f"a{i}")
        merged = merged_reference(model)
        deltas.append({k: merged[k] - base_sd[k] for k in base_sd})
    torch.save(base_sd, tmp_path / "base.pth")
    out = tmp_path / "out.safetensors"
    result = cli("merge", tmp_path / "base.pth", "--lora", tmp_path / "a0", "--lora", tmp_path / "a1",
                 "--lora-scale", "2", "--lora-scale", "-0.5", "-o", out)
    assert result.code == 0, result.err
    assert "folded 2 adapters into 4 tensors" in result.err
    got = load_file(out)
    for k in base_sd:
        assert torch.allclose(got[k], base_sd[k] + 2 * deltas[0][k] - 0.5 * deltas[1][k], atol=1e-5), k
    # one scale for both
    assert cli("merge", tmp_path / "base.pth", "--lora", tmp_path / "a0", "--lora", tmp_path / "a1",
               "--lora-scale", "0", "-o", tmp_path / "zero.safetensors").code == 0
    zero = load_file(tmp_path / "zero.safetensors")
    assert all(torch.equal(zero[k], base_sd[k]) for k in base_sd)


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16, n_positions=8))


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                                        num_key_value_heads=1, vocab_size=32, max_position_embeddings=16))


def test_gpt2_fan_in_fan_out_and_a_base_without_the_wrapper_prefix(cli, tmp_path):
    """GPT-2's Conv1D layers ([in, out]: peft's fan_in_fan_out, c_proj square) and its tied
    wte/lm_head; the base saved from the inner GPT2Model lacks `transformer.`."""
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)
    model, base_sd = peft_model(tiny_gpt2, config)
    adapter = save_adapter(model, tmp_path / "adapter")
    ref = merged_reference(model)
    torch.save(base_sd, tmp_path / "base.pth")  # lm_head.weight and transformer.wte.weight tied
    out = tmp_path / "out.pth"
    result = cli("merge", tmp_path / "base.pth", "--lora", adapter, "-o", out, "--json")
    assert result.code == 0, result.err
    assert_close(load_any(out), ref)
    inner = {k.removeprefix("transformer."): v for k, v in base_sd.items() if k.startswith("transformer.")}
    torch.save(inner, tmp_path / "inner.pth")
    result = cli("merge", tmp_path / "inner.pth", "--lora", adapter, "-o", tmp_path / "inner_out.pth", "--json")
    assert result.code == 0, result.err
    assert result.json()["adapters"][0]["prefix"] == {"removed": "transformer.", "keys": 4}
    got = load_any(tmp_path / "inner_out.pth")
    assert all(torch.allclose(got[k], ref["transformer." + k], atol=1e-5) for k in inner)


def test_tied_weights_fold_once_and_stay_tied(cli, tmp_path):
    """An adapter on GPT-2's lm_head changes the one tensor wte and lm_head share, as peft's
    in-place merge into the shared parameter does; the output keeps them tied."""
    config = LoraConfig(r=2, lora_alpha=2, target_modules=["lm_head"])
    model, base_sd = peft_model(tiny_gpt2, config)
    adapter = save_adapter(model, tmp_path / "adapter")
    ref = merged_reference(model)
    assert torch.equal(ref["lm_head.weight"], ref["transformer.wte.weight"])
    torch.save(base_sd, tmp_path / "base.pth")
    result = cli("merge", tmp_path / "base.pth", "--lora", adapter, "-o", tmp_path / "out.safetensors", "--json")
    assert result.code == 0, result.err
    doc = result.json()
    assert doc["tied"] == {"lm_head.weight": "transformer.wte.weight"}
    assert sorted(doc["changed"]) == ["lm_head.weight", "transformer.wte.weight"]
    from ckptsurgery.io import open_checkpoint

    with open_checkpoint(str(tmp_path / "out.safetensors")) as ckpt:  # our reader restores the alias
        assert ckpt.tensors["lm_head.weight"].view_key() == ckpt.tensors["transformer.wte.weight"].view_key()
        got = {k: t.to_torch() for k, t in ckpt.tensors.items()}
    assert_close(got, ref)


def test_llama_sharded_folder_base_in_bf16(cli, tmp_path, capsys):
    """A Hugging Face model folder (sharded safetensors) in bfloat16, an adapter on attention,
    MLP and embeddings: written in bfloat16, equal to peft's merge up to one bf16 rounding."""
    torch.manual_seed(0)
    model = tiny_llama().to(torch.bfloat16)
    model.save_pretrained(str(tmp_path / "base"), max_shard_size="4KB")
    assert (tmp_path / "base" / "model.safetensors.index.json").exists()
    base_sd = {k: v.clone() for k, v in model.state_dict().items()}
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "gate_proj", "embed_tokens"])
    peft_m = randomise(get_peft_model(model, config))
    adapter = save_adapter(peft_m, tmp_path / "adapter")
    ref = merged_reference(peft_m)
    capsys.readouterr()  # what transformers printed (DeepSpeed's accelerator notice) is not ours
    out = tmp_path / "out.safetensors"
    result = cli("merge", tmp_path / "base", "--lora", adapter, "-o", out, "--json")
    assert result.code == 0, result.err
    got = load_file(out)
    assert all(t.dtype == torch.bfloat16 for t in got.values())
    assert_close(got, ref, atol=2e-2, rtol=2e-2)
    # exactly our formula: W + scale·B·A in float32, rounded once to bf16
    factors = load_file(adapter / "adapter_model.safetensors")
    a = factors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].float()
    b = factors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].float()
    key = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(got[key], (base_sd[key].float() + 2 * (b @ a)).to(torch.bfloat16))
    assert result.json()["folded"] == 2 * 4 + 1


# ---- kohya ------------------------------------------------------------------------------------

def kohya_base():
    torch.manual_seed(0)
    return OrderedDict([
        ("model.diffusion_model.input_blocks.1.proj_in.weight", torch.randn(6, 4, 1, 1)),
        ("model.diffusion_model.input_blocks.1.proj_in.bias", torch.randn(6)),
        ("model.diffusion_model.input_blocks.1.conv.weight", torch.randn(5, 3, 3, 3)),
        ("model.diffusion_model.out.to_q.weight", torch.randn(4, 8)),
        ("cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight", torch.randn(7, 5)),
    ])


def kohya_lora(ranks=(2, 3, 2, 4)):
    g = torch.Generator().manual_seed(3)
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    r0, r1, r2, r3 = ranks
    return OrderedDict([
        ("lora_unet_input_blocks_1_proj_in.lora_down.weight", rnd(r0, 4, 1, 1)),
        ("lora_unet_input_blocks_1_proj_in.lora_up.weight", rnd(6, r0, 1, 1)),
        ("lora_unet_input_blocks_1_proj_in.alpha", torch.tensor(1.0)),
        ("lora_unet_input_blocks_1_conv.lora_down.weight", rnd(r1, 3, 3, 3)),
        ("lora_unet_input_blocks_1_conv.lora_up.weight", rnd(5, r1, 1, 1)),
        ("lora_unet_input_blocks_1_conv.alpha", torch.tensor(6.0, dtype=torch.float16)),
        ("lora_unet_out_to_q.lora_down.weight", rnd(r2, 8)),
        ("lora_unet_out_to_q.lora_up.weight", rnd(4, r2)),  # no alpha: alpha = rank, scale 1
        ("lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight", rnd(r3, 5).half()),
        ("lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight", rnd(7, r3).half()),
        ("lora_te_text_model_encoder_layers_0_mlp_fc1.alpha", torch.tensor(2.0)),
    ])


def kohya_expected(base, lora, multiplier=1.0):
    expected = OrderedDict((k, v.clone()) for k, v in base.items())
    pairs = {"lora_unet_input_blocks_1_proj_in": "model.diffusion_model.input_blocks.1.proj_in.weight",
             "lora_unet_input_blocks_1_conv": "model.diffusion_model.input_blocks.1.conv.weight",
             "lora_unet_out_to_q": "model.diffusion_model.out.to_q.weight",
             "lora_te_text_model_encoder_layers_0_mlp_fc1":
                 "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight"}
    for name, key in pairs.items():
        down, up = lora[f"{name}.lora_down.weight"].float(), lora[f"{name}.lora_up.weight"].float()
        rank = down.shape[0]
        alpha = float(lora[f"{name}.alpha"]) if f"{name}.alpha" in lora else rank
        d = (up.flatten(1) @ down.flatten(1)).reshape(base[key].shape)
        expected[key] = base[key] + multiplier * alpha / rank * d
    return expected


def test_kohya_fold_resolves_underscore_names(cli, tmp_path):
    base, lora = kohya_base(), kohya_lora()
    save_file(base, tmp_path / "base.safetensors")
    save_file(lora, tmp_path / "style.safetensors")
    out = tmp_path / "out.safetensors"
    result = cli("merge", tmp_path / "base.safetensors", "--lora", tmp_path / "style.safetensors",
                 "--lora-scale", "0.75", "-o", out, "--json")
    assert result.code == 0, result.err
    doc = result.json()
    assert doc["adapters"][0]["format"] == "kohya" and doc["adapters"][0]["folded"] == 4
    got = load_file(out)
    expected = kohya_expected(base, lora, 0.75)
    for k in base:
        assert torch.allclose(got[k], expected[k], atol=1e-5), k
    assert torch.equal(got["model.diffusion_model.input_blocks.1.proj_in.bias"],
                       base["model.diffusion_model.input_blocks.1.proj_in.bias"])


def test_kohya_ambiguous_and_unmatched_names(cli, tmp_path):
    base, lora = kohya_base(), kohya_lora()
    ambiguous = OrderedDict(base)
    ambiguous["first_stage_model.out.to_q.weight"] = torch.randn(4, 8)  # also ends in out.to_q
    save_file(ambiguous, tmp_path / "ambiguous.safetensors")
    save_file(lora, tmp_path / "style.safetensors")
    result = cli("merge", tmp_path / "ambiguous.safetensors", "--lora", tmp_path / "style.safetensors",
                 "-o", tmp_path / "o.safetensors")
    assert_one_error_line(result, "lora_unet_out_to_q", "first_stage_model.out.to_q",
                          "model.diffusion_model.out.to_q")
    assert not (tmp_path / "o.safetensors").exists()

    extra = OrderedDict(lora)
    extra["lora_unet_mid_block_attn.lora_down.weight"] = torch.randn(2, 3)
    extra["lora_unet_mid_block_attn.lora_up.weight"] = torch.randn(3, 2)
    save_file(extra, tmp_path / "extra.safetensors")
    save_file(base, tmp_path / "base.safetensors")
    result = cli("merge", tmp_path / "base.safetensors", "--lora", tmp_path / "extra.safetensors",
                 "-o", tmp_path / "o.safetensors")
    assert_one_error_line(result, "lora_unet_mid_block_attn", "--allow-unmatched")
    result = cli("merge", tmp_path / "base.safetensors", "--lora", tmp_path / "extra.safetensors",
                 "--allow-unmatched", "-o", tmp_path / "o.safetensors")
    assert result.code == 0 and "lora_unet_mid_block_attn" in result.err
    got = load_file(tmp_path / "o.safetensors")
    expected = kohya_expected(base, lora)
    assert all(torch.allclose(got[k], expected[k], atol=1e-5) for k in base)


# ---- extract-lora ----------------------------------------------------------------------------

def low_rank_pair(rank=3):
    """BASE and TUNED = BASE + a difference of rank ≤ `rank` on 2-D and conv weights, plus a
    changed 1-D bias and embedding."""
    g = torch.Generator().manual_seed(7)
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    base = OrderedDict([
        ("emb.weight", rnd(11, 6)), ("lin.weight", rnd(5, 6)), ("lin.bias", rnd(5)),
        ("conv.weight", rnd(4, 3, 3, 3)), ("conv.bias", rnd(4)), ("conv1.weight", rnd(6, 4, 2)),
        ("conv1.bias", rnd(6)), ("sq.weight", rnd(5, 5)), ("gpt.weight", rnd(5, 7)), ("gpt.bias", rnd(7)),
        ("head.weight", rnd(2, 7)), ("head.bias", rnd(2)),
    ])
    tuned = OrderedDict((k, v.clone()) for k, v in base.items())
    for key in ("lin.weight", "conv.weight", "conv1.weight", "sq.weight"):
        shape = base[key].shape
        tuned[key] += (rnd(shape[0], rank) @ rnd(rank, math.prod(shape[1:]))).reshape(shape) * 0.1
    tuned["lin.bias"] += 0.5
    tuned["emb.weight"] += rnd(11, rank) @ rnd(rank, 6) * 0.1
    return base, tuned


def test_extract_then_fold_recovers_tuned(cli, tmp_path):
    base, tuned = low_rank_pair(rank=3)
    save_file(base, tmp_path / "base.safetensors")
    save_file(tuned, tmp_path / "tuned.safetensors")
    adapter = tmp_path / "adapter"
    result = cli("extract-lora", tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", "--rank", "3",
                 "--embeddings", "-o", adapter, "--json")
    assert result.code == 0, result.err
    doc = result.json()
    assert sorted(p["name"] for p in doc["extracted"]) == ["conv", "conv1", "emb", "lin", "sq"]
    assert all(p["error"] < 1e-5 and p["rank"] == 3 for p in doc["extracted"])
    assert doc["not_extracted"] == [{"name": "lin.bias", "reason": "1-D: a LoRA adapts 2-D and conv weights only"}]
    assert doc["unchanged"] == 6
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 3 and config["peft_type"] == "LORA"
    assert sorted(config["target_modules"]) == ["conv", "conv1", "emb", "lin", "sq"]
    factors = load_file(adapter / "adapter_model.safetensors")
    assert factors["base_model.model.conv.lora_A.weight"].shape == (3, 3, 3, 3)
    assert factors["base_model.model.conv.lora_B.weight"].shape == (4, 3, 1, 1)
    assert factors["base_model.model.emb.lora_embedding_A"].shape == (3, 11)
    assert factors["base_model.model.emb.lora_embedding_B"].shape == (6, 3)
    # fold back with our own merge
    out = tmp_path / "back.safetensors"
    assert cli("merge", tmp_path / "base.safetensors", "--lora", adapter, "-o", out).code == 0
    back = load_file(out)
    for k in base:
        if k != "lin.bias":
            assert torch.allclose(back[k], tuned[k], atol=1e-5), k
    # ... and with peft, onto the model the weights belong to
    torch.manual_seed(0)
    model = Small()
    model.load_state_dict(base)
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload().state_dict()
    for k in base:
        if k != "lin.bias":
            assert torch.allclose(merged[k], tuned[k], atol=1e-5), k


def test_extract_full_rank_difference_states_the_svd_error(cli, tmp_path):
    g = torch.Generator().manual_seed(1)
    base = {"a.weight": torch.randn(12, 9, generator=g), "b.weight": torch.randn(6, 4, 3, 3, generator=g)}
    tuned = {k: v + torch.randn(v.shape, generator=g) for k, v in base.items()}
    save_file(base, tmp_path / "base.safetensors")
    save_file(tuned, tmp_path / "tuned.safetensors")
    adapter = tmp_path / "adapter"
    result = cli("extract-lora", tmp_path / "base.safetensors", tmp_path / "tuned.safetensors",
                 "--rank", "2", "--rank", "b.*=5", "-o", adapter, "--json")
    assert result.code == 0, result.err
    doc = {p["key"]: p for p in result.json()["extracted"]}
    assert doc["a.weight"]["rank"] == 2 and doc["b.weight"]["rank"] == 5
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 2 and config["rank_pattern"] == {"b": 5} and config["alpha_pattern"] == {"b": 5}
    assert cli("merge", tmp_path / "base.safetensors", "--lora", adapter, "-o", tmp_path / "back.safetensors").code == 0
    back = load_file(tmp_path / "back.safetensors")
    for key, k in (("a.weight", 2), ("b.weight", 5)):
        d = (tuned[key] - base[key]).reshape(base[key].shape[0], -1)
        s = torch.linalg.svdvals(d.double())
        stated = math.sqrt(float((s[k:] ** 2).sum() / (s ** 2).sum()))
        assert doc[key]["error"] == pytest.approx(stated, rel=1e-4)
        # the adapter holds the best rank-k approximation: the measured error is the stated one
        measured = float((back[key] - tuned[key]).norm() / (tuned[key] - base[key]).norm())
        assert measured == pytest.approx(stated, rel=1e-3)


def test_extract_rank_clamped_and_only_in_one(cli, tmp_path):
    base = {"x.weight": torch.zeros(3, 8), "gone.weight": torch.zeros(2, 2), "emb.weight": torch.zeros(4, 2)}
    tuned = {"x.weight": torch.ones(3, 8), "new.weight": torch.ones(2, 2), "emb.weight": torch.ones(4, 2)}
    save_file(base, tmp_path / "base.safetensors")
    save_file(tuned, tmp_path / "tuned.safetensors")
    result = cli("extract-lora", tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", "--rank", "16",
                 "-o", tmp_path / "adapter", "--json")
    assert result.code == 0, result.err
    doc = result.json()
    assert doc["extracted"][0] | {"error": None} == {
        "name": "x", "key": "x.weight", "kind": "linear", "shape": [3, 8], "rank": 3, "requested_rank": 16,
        "clamped": True, "error": None}
    assert doc["only_in_base"] == ["gone.weight"] and doc["only_in_tuned"] == ["new.weight"]
    assert doc["not_extracted"][0]["name"] == "emb.weight" and "--embeddings" in doc["not_extracted"][0]["reason"]


def test_extract_refuses_existing_folder_and_dry_run_writes_nothing(cli, tmp_path):
    base, tuned = low_rank_pair()
    save_file(base, tmp_path / "base.safetensors")
    save_file(tuned, tmp_path / "tuned.safetensors")
    args = [tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", "--rank", "2"]
    dry = cli("extract-lora", *args, "-o", tmp_path / "adapter", "--dry-run")
    assert dry.code == 0 and "would write" in dry.out and not (tmp_path / "adapter").exists()
    assert sorted(os.listdir(tmp_path)) == ["base.safetensors", "tuned.safetensors"]
    first = cli("extract-lora", *args, "-o", tmp_path / "adapter", "-q")
    assert first.code == 0 and first.err == ""
    made = (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes()
    assert_one_error_line(cli("extract-lora", *args, "-o", tmp_path / "adapter"), "already exists", "--force")
    again = cli("extract-lora", *args, "-o", tmp_path / "adapter", "--force")
    assert again.code == 0, again.err
    assert (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes() == made  # byte-deterministic
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert_one_error_line(cli("extract-lora", *args, "-o", other, "--force"), "not an adapter")
    assert (other / "notes.txt").read_text() == "mine"
    assert sorted(os.listdir(tmp_path)) == ["adapter", "base.safetensors", "other", "tuned.safetensors"]


def test_extract_rank_pattern_for_a_name_that_is_a_tail_of_another(tmp_path):
    """peft matches rank_pattern keys against dotted tails: `q` would also select `attn.q`; the
    written pattern must select the module meant only (peft itself loads it)."""
    from ckptsurgery.ops import WriteOptions, extract_lora

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.q = nn.Linear(6, 6, bias=False)
            self.attn = nn.Module()
            self.attn.q = nn.Linear(6, 6, bias=False)

    torch.manual_seed(0)
    model = Two()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(2)
    tuned = {k: v + torch.randn(6, 6, generator=g) for k, v in base.items()}
    save_file(base, tmp_path / "base.safetensors")
    save_file(tuned, tmp_path / "tuned.safetensors")
    report = extract_lora(str(tmp_path / "base.safetensors"), str(tmp_path / "tuned.safetensors"),
                          WriteOptions(str(tmp_path / "adapter")), rank=["2", "q.weight=4"])
    assert {p.name: p.rank for p in report.extracted} == {"q": 4, "attn.q": 2}
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["rank_pattern"] == {"^q": 4}
    merged = PeftModel.from_pretrained(model, str(tmp_path / "adapter")).merge_and_unload().state_dict()
    from ckptsurgery.ops import merge_checkpoints

    merge_checkpoints([str(tmp_path / "base.safetensors")], WriteOptions(str(tmp_path / "back.safetensors")),
                      lora=[str(tmp_path / "adapter")])
    back = load_file(tmp_path / "back.safetensors")
    for k in base:
        assert torch.allclose(merged[k], back[k], atol=1e-5), k


# ---- refusals ----------------------------------------------------------------------------------

@pytest.fixture
def adapter_and_base(tmp_path):
    model, base_sd = peft_model(Small, LoraConfig(r=2, lora_alpha=2, target_modules=["lin"]))
    save_adapter(model, tmp_path / "adapter")
    torch.save(base_sd, tmp_path / "base.pth")
    return tmp_path / "adapter", tmp_path / "base.pth"


def edit_config(folder, **changes):
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def test_refusals(cli, tmp_path, adapter_and_base):
    adapter, base = adapter_and_base
    out = tmp_path / "out.pth"
    assert_one_error_line(cli("merge", base, "--lora", adapter, "--average", "-o", out), "fold first, then merge", code=2)
    assert_one_error_line(cli("merge", base, "--lora", adapter, "--into", base, "-o", out), "fold first", code=2)
    assert_one_error_line(cli("merge", base, "--lora", adapter, "--on-conflict", "last", "-o", out), "fold first", code=2)
    for option in (["--method", "ties"], ["--base", str(base)], ["--density", "0.5"], ["--t", "0.5"], ["--seed", "1"]):
        assert_one_error_line(cli("merge", base, "--lora", adapter, *option, "-o", out),
                              f"--lora does not combine with {option[0]}", code=2)
    assert_one_error_line(cli("merge", base, base, "--lora", adapter, "-o", out), "exactly one base", code=2)
    assert_one_error_line(cli("merge", base, "--lora", adapter, "--lora", adapter, "--lora-scale", "1",
                              "--lora-scale", "2", "--lora-scale", "3", "-o", out), "--lora-scale given 3 times", code=2)
    assert_one_error_line(cli("merge", base, "--lora-scale", "2", "-o", out), "--lora only", code=2)
    assert_one_error_line(cli("merge", base, "--allow-unmatched", "-o", out), "--lora only", code=2)
    assert_one_error_line(cli("merge", base, "--lora", adapter, "--lora-scale", "nan", "-o", out), "finite", code=2)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_error_line(cli("merge", base, "--lora", empty, "-o", out), "no adapter_config.json")
    edit_config(adapter, use_dora=True)
    assert_one_error_line(cli("merge", base, "--lora", adapter, "-o", out), "no lora_magnitude_vector", "DoRA")
    edit_config(adapter, use_dora=False, peft_type="VERA")
    assert_one_error_line(cli("merge", base, "--lora", adapter, "-o", out), "peft_type 'VERA'")
    edit_config(adapter, peft_type="LORA", r=3)
    assert_one_error_line(cli("merge", base, "--lora", adapter, "-o", out), "rank 2", "r=3")
    edit_config(adapter, r=2)
    assert cli("merge", base, "--lora", adapter, "-o", out).code == 0
    cast = tmp_path / "bf16.safetensors"  # --dtype casts the folded output
    assert cli("merge", base, "--lora", adapter, "--dtype", "bf16", "-o", cast).code == 0
    assert all(t.dtype == torch.bfloat16 for t in load_any(cast).values() if t.is_floating_point())
    assert_one_error_line(cli("merge", base, "--lora", adapter, "-o", out), "already exists")
    bad_shape = tmp_path / "bad.pth"
    torch.save({"lin.weight": torch.zeros(3, 3), "lin.bias": torch.zeros(3)}, bad_shape)
    assert_one_error_line(cli("merge", bad_shape, "--lora", adapter, "-o", tmp_path / "o2.pth"), "lin", "[5, 2]")
    assert not out.with_name("o2.pth").exists()
    missing = cli("extract-lora", base, base, "-o", tmp_path / "x")  # the parser's own usage error
    assert missing.code == 2 and "Missing option '--rank'" in missing.err
    assert_one_error_line(cli("extract-lora", base, base, "--rank", "lin=2", "-o", tmp_path / "x"), "default", code=2)
    assert_one_error_line(cli("extract-lora", base, base, "--rank", "2", "--rank", "nothing*=3", "-o", tmp_path / "x"),
                          "nothing*")
    assert_one_error_line(cli("extract-lora", base, base, "--rank", "2", "-o", tmp_path / "x"), "nothing to extract")
    assert not (tmp_path / "x").exists()


def test_lora_bias_modules_to_save_and_untouched_tensors_pass_through(cli, tmp_path):
    """peft's lora_bias (B's bias × scale added to the layer's bias) and modules_to_save (the
    trained copy replaces the base's); tensors no adapter touches are the base's own refs."""
    config = LoraConfig(r=2, lora_alpha=3, target_modules=["lin", "conv"], lora_bias=True, modules_to_save=["head"])
    model, base_sd = peft_model(Small, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "modules_to_save" in name:
                p.add_(1.0)
    adapter = save_adapter(model, tmp_path / "adapter")
    ref = merged_reference(model)
    save_file(base_sd, tmp_path / "base.safetensors")
    result = cli("merge", tmp_path / "base.safetensors", "--lora", adapter, "-o", tmp_path / "out.safetensors", "--json")
    assert result.code == 0, result.err
    assert_close(load_file(tmp_path / "out.safetensors"), ref)
    assert sorted(result.json()["adapters"][0]["replaced"]) == ["head.bias", "head.weight"]

    from ckptsurgery.io import open_checkpoint
    from ckptsurgery.ops.adapters import fold_into, read_adapter

    with open_checkpoint(str(tmp_path / "base.safetensors")) as base, read_adapter(str(adapter)) as lora:
        merged, details = fold_into(base, [(lora, 1.0)])
        untouched = [k for k in base.tensors if k not in details.changed]
        assert untouched and all(merged[k] is base.tensors[k] for k in untouched)
        assert sorted(details.changed) == ["conv.bias", "conv.weight", "head.bias", "head.weight",
                                              "lin.bias", "lin.weight"]


def test_peft_names_meet_a_base_with_a_prefix_once(tmp_path):
    from ckptsurgery.errors import CkptError
    from ckptsurgery.ops.adapters.peft import PeftResolver as _PeftResolver

    resolve = _PeftResolver(["module.lin.weight", "module.conv.weight"])  # DataParallel's prefix
    assert resolve("lin.weight") == "module.lin.weight" and resolve("conv.weight") == "module.conv.weight"
    assert resolve.check("a") == {"added": "module.", "keys": 2}
    assert resolve("nothing.weight") is None
    with pytest.raises(CkptError, match="encoder.q.weight, decoder.q.weight|decoder.q.weight, encoder.q.weight"):
        _PeftResolver(["encoder.q.weight", "decoder.q.weight"])("q.weight")
    mixed = _PeftResolver(["module.lin.weight", "conv.weight"])
    assert mixed("lin.weight") and mixed("model.conv.weight")
    with pytest.raises(CkptError, match="different prefixes"):
        mixed.check("adapter")


def test_extract_from_model_folders_and_sharded_indexes(cli, tmp_path):
    """BASE an unsharded Hugging Face folder, TUNED a sharded index: the same adapter as from files."""
    base, tuned = low_rank_pair(rank=3)
    save_file(base, tmp_path / "base.safetensors")
    save_file(tuned, tmp_path / "tuned.safetensors")
    (tmp_path / "base").mkdir()
    save_file(base, tmp_path / "base" / "model.safetensors")
    (tmp_path / "base" / "config.json").write_text("{}")
    (tmp_path / "tuned").mkdir()
    assert cli("convert", tmp_path / "tuned.safetensors", "-o", tmp_path / "tuned" / "model.safetensors",
               "--max-shard-size", "200").code == 0
    assert len(list((tmp_path / "tuned").glob("model-*.safetensors"))) > 1
    for name, args in (("files", ["base.safetensors", "tuned.safetensors"]), ("folders", ["base", "tuned"])):
        assert cli("extract-lora", *(tmp_path / a for a in args), "--rank", "3", "-o", tmp_path / name).code == 0
    assert (tmp_path / "files" / "adapter_model.safetensors").read_bytes() == \
        (tmp_path / "folders" / "adapter_model.safetensors").read_bytes()


# ---- hand-made adapters: hostile configs, names, careless use ------------------------------------

PREFIX = "base_model.model."


def make_adapter(folder, config=None, tensors=None, raw_config: str | None = None):
    """A hand-made PEFT folder: r=2, alpha=4 on `lin` (A [2, 3], B [4, 2]) unless told otherwise."""
    folder.mkdir(parents=True, exist_ok=True)
    doc = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["lin"]}
    doc.update(config or {})
    (folder / "adapter_config.json").write_text(raw_config if raw_config is not None else json.dumps(doc))
    if tensors is None:
        tensors = {f"{PREFIX}lin.lora_A.weight": torch.ones(2, 3), f"{PREFIX}lin.lora_B.weight": torch.ones(4, 2)}
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder


def make_base(path, **shapes):
    shapes = shapes or {"lin.weight": (4, 3)}
    save_file({k.replace("__", "."): torch.zeros(*s) for k, s in shapes.items()}, str(path))
    return path


def assert_no_crash(result):
    """Either it worked, or it refused with one clean line (never the catch-all)."""
    if result.code != 0:
        assert_one_error_line(result, code=result.code)
    assert "Traceback" not in result.err and "Warning" not in result.err, result.err


def run_cli(args, timeout, data_limit=None):
    """The real console entry point in a subprocess (a hang or a memory blow-up must not take
    the test run down with it)."""

    def limit():
        if data_limit is not None:
            import resource

            resource.setrlimit(resource.RLIMIT_DATA, (data_limit, data_limit))

    env = {**os.environ, "PYTHONPATH": ROOT}
    env.pop("CKPTSURGERY_DEBUG", None)
    return subprocess.run([sys.executable, "-c", "from ckptsurgery.cli import main; main()", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, preexec_fn=limit, env=env)


@pytest.mark.parametrize("config", [
    {"r": 10 ** 400},  # a JSON integer: Python makes it an int that math.isfinite cannot take
    {"lora_alpha": 10 ** 400},
    {"target_modules": "(unclosed"},  # a regex string that does not compile
    {"target_modules": [1, "lin"]},  # not strings
    {"target_modules": [["lin"]]},
], ids=["r-huge-int", "alpha-huge-int", "target-bad-regex", "target-int", "target-nested-list"])
def test_adapter_config_wrong_types_are_one_clear_line(cli, tmp_path, config):
    """A hostile adapter_config.json (huge int r/lora_alpha, target_modules a broken regex or a list of non-strings) hits the catch-all (OverflowError/re.error/TypeError, lora.py _number/_targets); it should be refused as a bad config in one line."""
    adapter = make_adapter(tmp_path / "adapter", config)
    base = make_base(tmp_path / "base.safetensors")
    result = cli("merge", base, "--lora", adapter, "-o", tmp_path / "out.safetensors")
    assert_one_error_line(result, "adapter_config.json")
    assert not (tmp_path / "out.safetensors").exists()


def test_deeply_nested_adapter_config_is_one_clear_line(cli, tmp_path):
    """A 200 KB adapter_config.json nested 100 000 deep raises RecursionError, which lora.py _read_json does not catch (catch-all line); it should say the config is not readable JSON."""
    raw = '{"peft_type": "LORA", "r": 2, "lora_alpha": 4, "x": ' + "[" * 100_000 + "]" * 100_000 + "}"
    adapter = make_adapter(tmp_path / "adapter", raw_config=raw)
    base = make_base(tmp_path / "base.safetensors")
    result = cli("merge", base, "--lora", adapter, "-o", tmp_path / "out.safetensors")
    assert_one_error_line(result, "adapter_config.json")


def test_catastrophic_rank_pattern_does_not_hang(tmp_path):
    """rank_pattern (and target_modules as a string) are run as Python regexes against module names the same file chooses: `(a+)+b` against a 40-letter name backtracks 2^40 times (lora.py pattern_key); the tool hangs instead of refusing or bounding the match."""
    name = "a" * 40
    adapter = make_adapter(tmp_path / "adapter", {"rank_pattern": {"(a+)+b": 2}, "target_modules": None},
                           {f"{PREFIX}{name}.lora_A.weight": torch.ones(2, 3),
                            f"{PREFIX}{name}.lora_B.weight": torch.ones(4, 2)})
    base = tmp_path / "base.safetensors"
    save_file({f"{name}.weight": torch.zeros(4, 3)}, str(base))
    try:
        result = run_cli(["merge", base, "--lora", adapter, "-o", tmp_path / "out.safetensors"], timeout=8)
    except subprocess.TimeoutExpired:
        pytest.fail("merge --lora hung on a 1 KB adapter_config.json's rank_pattern")
    assert result.returncode in (0, 1), result.stderr


def test_kohya_te_with_another_digit_is_resolved_or_refused_in_one_line(cli, tmp_path):
    """`lora_te4_…` passes _KOHYA_KEY (`te\\d?`) though no entry of _KOHYA_PREFIXES starts it: it is resolved (any te<digit>_) or refused in one line, never the catch-all 'StopIteration: ' of _KohyaResolver.__call__'s next()."""
    base = make_base(tmp_path / "base.safetensors", fc__weight=(4, 3))
    lora = tmp_path / "te4.safetensors"
    save_file({"lora_te4_fc.lora_down.weight": torch.ones(2, 3), "lora_te4_fc.lora_up.weight": torch.ones(4, 2)},
              str(lora))
    result = cli("merge", base, "--lora", lora, "-o", tmp_path / "out.safetensors")
    assert_no_crash(result)
    assert "StopIteration" not in result.err


def test_a_long_dotted_key_is_matched_within_memory(tmp_path):
    """An 80 KB base whose one key has 40 000 dots: merge --lora runs under a 1.5 GiB heap (building every dotted tail of it in _KohyaResolver, _PeftResolver.tails and _suffixes once took ~3 GB, growing as the square)."""
    key = ".".join(["a"] * 40_000) + ".weight"
    base = tmp_path / "base.safetensors"
    save_file({key: torch.zeros(4, 3), "fc.weight": torch.zeros(4, 3)}, str(base))
    lora = tmp_path / "k.safetensors"
    save_file({"lora_unet_fc.lora_down.weight": torch.ones(2, 3), "lora_unet_fc.lora_up.weight": torch.ones(4, 2)},
              str(lora))
    out = tmp_path / "out.safetensors"
    result = run_cli(["merge", base, "--lora", lora, "-o", out], timeout=60, data_limit=1536 * 2**20)
    assert result.returncode in (0, 1), result.stderr
    assert "MemoryError" not in result.stderr, result.stderr
    if result.returncode == 0:
        assert torch.equal(load_file(str(out))["fc.weight"], torch.full((4, 3), 2.0))


def test_adapter_file_given_by_name_is_the_file_folded(cli, tmp_path):
    """`--lora run/adapter_model.step500.safetensors` (any name starting `adapter_model.`) silently folds run/adapter_model.safetensors instead — and a name that does not exist at all is accepted (lora.py read_adapter/_read_peft); the file named should be the one read, or refused if missing."""
    adapter = make_adapter(tmp_path / "run")  # adapter_model.safetensors: A = 1
    step = tmp_path / "run" / "adapter_model.step500.safetensors"
    save_file({f"{PREFIX}lin.lora_A.weight": torch.full((2, 3), 10.0),
               f"{PREFIX}lin.lora_B.weight": torch.ones(4, 2)}, str(step))
    base = make_base(tmp_path / "base.safetensors")
    out = tmp_path / "out.safetensors"
    assert cli("merge", base, "--lora", step, "-o", out).code == 0
    # scale alpha/r = 2; B·A = 2·10 per entry
    assert torch.equal(load_file(str(out))["lin.weight"], torch.full((4, 3), 40.0))
    missing = cli("merge", base, "--lora", adapter / "adapter_model.typo", "-o", tmp_path / "o2.safetensors")
    assert_one_error_line(missing, "adapter_model.typo")


@pytest.mark.parametrize("kind", ["kohya", "peft"])
def test_two_modules_of_one_adapter_on_one_weight_are_refused(cli, tmp_path, kind):
    """Two modules of ONE adapter that resolve to the same base weight (kohya lora_te1_x and lora_te2_x on a one-encoder base; peft `lin` and `m.lin` via the prefix rule) are both folded — the delta is applied twice and the report says '1 weights' (lora.py fold); it should refuse, naming both."""
    if kind == "kohya":
        base = make_base(tmp_path / "base.safetensors", text_model__fc__weight=(4, 3))
        adapter = tmp_path / "dup.safetensors"
        save_file({f"lora_te{i}_text_model_fc.{p}": t for i in (1, 2)
                   for p, t in (("lora_down.weight", torch.ones(2, 3)), ("lora_up.weight", torch.ones(4, 2)))},
                  str(adapter))
    else:
        base = make_base(tmp_path / "base.safetensors")
        adapter = make_adapter(tmp_path / "dup", {"target_modules": None},
                               {f"{PREFIX}{m}.lora_{ab}.weight": torch.ones(*s) for m in ("lin", "m.lin")
                                for ab, s in (("A", (2, 3)), ("B", (4, 2)))})
    result = cli("merge", base, "--lora", adapter, "-o", tmp_path / "out.safetensors")
    assert_one_error_line(result)
    assert not (tmp_path / "out.safetensors").exists()


def test_one_module_saved_with_and_without_an_adapter_name_is_refused(cli, tmp_path):
    """`lin.lora_A.weight` beside `lin.lora_A.default.weight`: folding either silently would be a guess."""
    base = make_base(tmp_path / "base.safetensors", **{"lin.weight": (3, 2)})
    make_adapter(tmp_path / "ad", {"r": 1, "lora_alpha": 1}, {
        "base_model.model.lin.lora_A.weight": torch.ones(1, 2),
        "base_model.model.lin.lora_A.default.weight": torch.full((1, 2), 2.0),
        "base_model.model.lin.lora_B.weight": torch.ones(3, 1),
    })
    result = cli("merge", base, "--lora", tmp_path / "ad", "-o", tmp_path / "o.safetensors")
    assert_one_error_line(result, "module lin has two A weights")
    assert not (tmp_path / "o.safetensors").exists()


@pytest.mark.parametrize("layout", ["dtype", "transposed"])
def test_extract_complex_tensors_print_no_warning(tmp_path, layout):
    """A complex tensor that differs in dtype (or is a non-contiguous view) goes through lora.py _differs' `as_torch(a).float()`, and torch prints 'UserWarning: Casting complex values to real discards the imaginary part' on stderr; compare without the cast (e.g. view_as_real / torch.equal)."""
    torch.manual_seed(0)
    if layout == "dtype":
        c_base, c_tuned = torch.randn(3, dtype=torch.complex64), torch.randn(3, dtype=torch.complex128)
    else:
        c_base, c_tuned = torch.randn(3, 2, dtype=torch.complex64).t(), torch.randn(2, 3, dtype=torch.complex64)
    torch.save({"fc.weight": torch.randn(4, 3), "c": c_base}, tmp_path / "base.pth")
    torch.save({"fc.weight": torch.randn(4, 3), "c": c_tuned}, tmp_path / "tuned.pth")
    # in a subprocess: in-process, pytest's warning capture would hide what a user sees on stderr
    result = run_cli(["extract-lora", tmp_path / "base.pth", tmp_path / "tuned.pth", "--rank", "2", "-o", tmp_path / "x"],
                     timeout=60)
    assert result.returncode == 0, result.stderr
    assert "Warning" not in result.stderr, result.stderr


def test_extract_float32_difference_near_max_does_not_write_inf_factors(cli, tmp_path):
    """A finite float32 difference near float32's max has a singular value above it: the float32 SVD (lora.py _SvdCache.factors) gives inf, and the adapter is written with -inf factors while the report states a relative error of 0.0; compute in float64 (or check the factors are finite and refuse)."""
    torch.save({"fc.weight": torch.zeros(4, 3)}, tmp_path / "base.pth")
    torch.save({"fc.weight": torch.full((4, 3), 3e38)}, tmp_path / "tuned.pth")
    out = tmp_path / "x"
    result = cli("extract-lora", tmp_path / "base.pth", tmp_path / "tuned.pth", "--rank", "1", "-o", out)
    if result.code == 0:
        factors = load_file(str(out / "adapter_model.safetensors"))
        assert all(bool(torch.isfinite(t).all()) for t in factors.values()), factors
    else:
        assert_one_error_line(result, "fc.weight")


def test_extract_float64_large_values_report_a_real_error(cli, tmp_path):
    """For a float64 rank-1 difference of 1e200s, s² overflows in lora.py _SvdCache.factors and the relative error is reported as nan (JSON "nan") though the rank-1 extraction is exact; scale by the largest singular value before squaring."""
    torch.save({"fc.weight": torch.zeros(4, 3, dtype=torch.float64)}, tmp_path / "base.pth")
    torch.save({"fc.weight": torch.full((4, 3), 1e200, dtype=torch.float64)}, tmp_path / "tuned.pth")
    result = cli("extract-lora", tmp_path / "base.pth", tmp_path / "tuned.pth", "--rank", "1", "-o", tmp_path / "x",
                 "--json")
    assert result.code == 0, result.err
    error = result.json()["extracted"][0]["error"]
    assert isinstance(error, float) and error < 1e-6, error


def test_extract_force_does_not_delete_what_is_not_the_adapter(cli, tmp_path):
    """extract-lora --force over a folder that holds adapter_config.json replaces the whole folder (lora.py _check_folder + stage_folder): a trainer's output dir loses its checkpoint-*/ subfolders and tokenizer files; it should replace only the adapter's two files, or refuse a folder holding anything else."""
    base = make_base(tmp_path / "base.safetensors")
    torch.manual_seed(0)
    save_file({"lin.weight": torch.randn(4, 3)}, str(tmp_path / "tuned.safetensors"))
    run = make_adapter(tmp_path / "run")
    (run / "checkpoint-500").mkdir()
    (run / "checkpoint-500" / "optimizer.pt").write_bytes(b"weeks of training")
    (run / "tokenizer.json").write_text("{}")
    result = cli("extract-lora", base, tmp_path / "tuned.safetensors", "--rank", "1", "-o", run, "--force")
    if result.code == 0:
        assert (run / "checkpoint-500" / "optimizer.pt").exists() and (run / "tokenizer.json").exists()
    else:
        assert_one_error_line(result)
        assert (run / "checkpoint-500" / "optimizer.pt").exists()


def test_extract_from_a_tied_base_does_not_claim_an_exact_round_trip(cli, tmp_path):
    """BASE ties emb/head (one storage), TUNED changed head only: extract-lora reports head with relative error 0.0 and emb 'unchanged', but folding the adapter back into BASE (which keeps the tie, as peft does) moves emb.weight by 1.0 — the report's promise is false; a weight tied in BASE but not in TUNED should be refused or listed as not extractable (lora.py extract_lora, 'tied in BASE only: each its own')."""
    torch.manual_seed(0)
    emb = torch.randn(6, 4)
    torch.save({"emb.weight": emb, "head.weight": emb}, tmp_path / "base.pth")
    head = emb.clone()
    head[0] += 1.0
    torch.save({"emb.weight": emb.clone(), "head.weight": head}, tmp_path / "tuned.pth")
    extracted = cli("extract-lora", tmp_path / "base.pth", tmp_path / "tuned.pth", "--rank", "4",
                    "-o", tmp_path / "x", "--json")
    if extracted.code != 0:
        assert_one_error_line(extracted, "head")
        return
    if any(n["name"].startswith("head") for n in extracted.json()["not_extracted"]):
        return
    assert cli("merge", tmp_path / "base.pth", "--lora", tmp_path / "x", "-o", tmp_path / "back.pth").code == 0
    back = load_any(tmp_path / "back.pth")
    assert torch.allclose(back["head.weight"], head, atol=1e-5)
    assert torch.allclose(back["emb.weight"], emb, atol=1e-5), "emb.weight moved though TUNED left it unchanged"


# ---- against peft: layouts it transposes, layers it wraps, one rounding ---------------------------

def seeded_gpt2(cls_name="GPT2LMHeadModel", **extra):
    from transformers import GPT2Config

    torch.manual_seed(0)
    cls = getattr(transformers, cls_name)
    return cls(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16, n_positions=8, bos_token_id=0,
                          eos_token_id=0, pad_token_id=0, **extra))


def low_rank(shape, rank, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape[0], rank, generator=g) @ torch.randn(rank, shape[1], generator=g)) * 0.1


def peft_merge(model, adapter) -> dict:
    """What peft itself makes of the adapter: PeftModel.from_pretrained(...).merge_and_unload()."""
    return PeftModel.from_pretrained(model, str(adapter)).merge_and_unload().state_dict()


def test_extract_lora_of_gpt2_conv1d_weights_loads_in_peft(cli, tmp_path):
    """Issue 10 §2: "peft loads the adapter onto the base model and reproduces TUNED within the
    error the dropped singular values imply". GPT-2's attention/MLP weights are transformers
    `Conv1D` ([in, out]); peft adapts them with fan_in_fan_out=True, i.e. lora_A [r, in] and
    lora_B [out, r] with ΔW = (B·A)ᵀ (peft/tuners/lora/layer.py `dispatch_default` forces
    fan_in_fan_out for Conv1D; `Linear.get_delta_weight` transposes). extract-lora factors the
    [in, out] matrix as if it were nn.Linear's [out, in] and writes fan_in_fan_out=false, so peft
    refuses the file (size mismatch for c_attn) — and would silently transpose a square one
    (attn.c_proj). Cause: ops/lora.py extract_lora/_kind treat every 2-D `.weight` as [out, in]."""
    model = seeded_gpt2()
    base = {k: v.clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied to wte
    tuned = {k: v.clone() for k, v in base.items()}
    for i, key in enumerate(["transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_proj.weight"]):
        tuned[key] += low_rank(tuned[key].shape, 2, seed=i)
    save_file(base, tmp_path / "base.safetensors")
    save_file(tuned, tmp_path / "tuned.safetensors")
    result = cli("extract-lora", tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", "--rank", "2",
                 "--fan-in-fan-out", r"re:\.c_(attn|proj|fc)\.", "-o", tmp_path / "adapter", "--json")
    assert result.code == 0, result.err
    assert {p["kind"] for p in result.json()["extracted"]} == {"linear-t"}
    try:
        merged = peft_merge(seeded_gpt2(), tmp_path / "adapter")
    except RuntimeError as e:
        pytest.fail(f"peft cannot load the extracted adapter: {str(e).splitlines()[1].strip()}")
    for key in tuned:
        torch.testing.assert_close(merged[key], tuned[key], atol=1e-5, rtol=1e-5, msg=key)


def test_extract_lora_of_an_embedding_not_named_like_one_reproduces_tuned_in_peft(cli, tmp_path):
    """T5's `relative_attention_bias` is an nn.Embedding(32, heads). extract-lora decides
    "embedding" by the module's last name only (ops/lora.py EMBEDDING_NAMES), so it writes
    lora_A/lora_B.weight for it; peft wraps the nn.Embedding with lora_embedding_A/B
    (peft/tuners/lora/layer.py `Embedding.update_layer`), ignores the keys with a warning and
    merges nothing: TUNED is not reproduced and no error is raised. Expected (issue 10 §2): the
    adapter peft loads reproduces TUNED, or the weight is listed under `not_extracted`."""

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.relative_attention_bias = nn.Embedding(32, 4)
            self.q = nn.Linear(8, 8, bias=False)

    torch.manual_seed(0)
    base = {k: v.clone() for k, v in Attn().state_dict().items()}
    tuned = {k: v + low_rank(v.shape, 2, seed=i) for i, (k, v) in enumerate(base.items())}
    save_file(base, tmp_path / "base.safetensors")
    save_file(tuned, tmp_path / "tuned.safetensors")
    report = cli("extract-lora", tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", "--rank", "2",
                 "-o", tmp_path / "adapter", "--json").json()
    extracted = [p["key"] for p in report["extracted"]]
    if "relative_attention_bias.weight" not in extracted:
        return  # listed as not extracted: fine
    torch.manual_seed(0)
    merged = peft_merge(Attn(), tmp_path / "adapter")
    torch.testing.assert_close(merged["relative_attention_bias.weight"], tuned["relative_attention_bias.weight"],
                               atol=1e-5, rtol=1e-5)


def test_fold_square_conv1d_beside_a_non_square_linear_is_transposed_as_peft_does(cli, tmp_path):
    """GPT-2 with a LoRA on c_attn, attn.c_proj (Conv1D, square 8×8) and the classifier `score`
    (nn.Linear, [2, 8]). peft transposes every Conv1D delta and no nn.Linear one
    (peft/tuners/lora/layer.py `dispatch_default`, `Linear.get_delta_weight`), so
    merge_and_unload() adds (B·A)ᵀ to attn.c_proj. ops/lora.py `_square_layouts` guesses a square
    weight's layout from the other weights: none shares the name `c_proj`, and the rest disagree
    (c_attn: transposed; score: not), so it falls back to "nn.Linear's" and adds B·A untransposed.
    Suggested: prefer evidence from the same parent module (`…h.0.attn.c_attn` for
    `…h.0.attn.c_proj`), and report per key which layout was chosen (or refuse a guess)."""
    model = seeded_gpt2("GPT2ForSequenceClassification", num_labels=2)
    base_sd = copy.deepcopy(model.state_dict())
    pm = get_peft_model(model, LoraConfig(r=2, lora_alpha=2, target_modules=["c_attn", "attn.c_proj", "score"]))
    g = torch.Generator().manual_seed(1)
    for name, p in pm.named_parameters():
        if "lora_" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.3
    pm.save_pretrained(str(tmp_path / "adapter"))
    ref = {k: v.clone() for k, v in pm.merge_and_unload().state_dict().items()}
    torch.save(base_sd, tmp_path / "base.pth")
    result = cli("merge", tmp_path / "base.pth", "--lora", tmp_path / "adapter", "-o", tmp_path / "out.pth")
    assert result.code == 0, result.err
    got = torch.load(tmp_path / "out.pth", weights_only=True)
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], atol=1e-5, rtol=1e-5, msg=key)


def test_fold_with_dtype_rounds_once_like_the_merge_methods(cli, tmp_path):
    """`merge --method/--average` compute in float32 and write straight to `--dtype` (one
    rounding: ops/merge.py `_merged_tensor` encodes to `cast or t.dtype`; issue 10: "write in each
    tensor's input dtype unless --dtype says otherwise"). `merge BASE --lora A --dtype fp32` on a
    bf16 base instead rounds W + ΔW to bf16 first (ops/lora.py `_folded` converts to the base's
    dtype) and the writer then casts to fp32: the float32 output holds bf16 values, up to 2⁻⁸
    relative off the fold it asked for. Suggested: pass the cast to `fold` and let `_folded` write
    `cast or base.dtype`."""

    class Lin(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(16, 12, bias=False)

    torch.manual_seed(0)
    pm = get_peft_model(Lin(), LoraConfig(r=2, lora_alpha=2, target_modules=["lin"]))
    for name, p in pm.named_parameters():
        if "lora_" in name:
            p.data = torch.randn(p.shape) * 0.01
    pm.save_pretrained(str(tmp_path / "adapter"))
    base = {"lin.weight": torch.randn(12, 16).to(torch.bfloat16)}
    save_file(base, tmp_path / "base.safetensors")
    out = tmp_path / "out.safetensors"
    assert cli("merge", tmp_path / "base.safetensors", "--lora", tmp_path / "adapter", "--dtype", "fp32", "-o", out).code == 0
    factors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    a, b = factors["base_model.model.lin.lora_A.weight"], factors["base_model.model.lin.lora_B.weight"]
    want = base["lin.weight"].float() + b @ a
    got = load_file(out)["lin.weight"]
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


# ---- issue 18 §6: hostile adapters on the new surfaces ----------------------------------------

def test_an_adapter_config_past_16_mib_is_refused_unread(cli, tmp_path):
    """A 99 MB adapter_config.json took 2.4 GB to parse (peft.py `_read_json` read it whole,
    uncapped): it is refused in one line past 16 MiB, as a shard index is (io/sharded.py)."""
    doc = json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["lin"]})
    filler = ', "notes": [' + "0," * (8 * 2**20 + 1) + "0]}"  # 17 MiB of small values: the costly kind
    adapter = make_adapter(tmp_path / "adapter", raw_config=doc[:-1] + filler)
    assert (adapter / "adapter_config.json").stat().st_size > 16 * 2**20
    base = make_base(tmp_path / "base.safetensors")
    result = cli("merge", base, "--lora", adapter, "-o", tmp_path / "out.safetensors")
    assert_one_error_line(result, "adapter_config.json", "larger than 16 MiB")
    assert not (tmp_path / "out.safetensors").exists()
    make_adapter(tmp_path / "adapter", {"notes": "x" * 2**20})  # 1 MiB: read as before
    assert cli("merge", base, "--lora", adapter, "-o", tmp_path / "out.safetensors").code == 0


def test_extract_refuses_a_weight_far_larger_than_what_the_files_hold(cli, tmp_path):
    """Two 1.4 KB .pth files whose weight is one float viewed as 6144 × 6144 (stride 0) ran an SVD
    of 37 M elements for minutes (extract.py `_SvdCache.factors`), deaf to SIGTERM. It is refused
    in one line naming the key and the way out, in a second or two. A small expanded weight, one
    that TUNED stores whole, and a repeated buffer that is no weight are extracted (or reported
    as not extracted) as before."""
    torch.save({"lin.weight": torch.zeros(1).expand(6144, 6144)}, tmp_path / "base.pth")
    torch.save({"lin.weight": torch.ones(1).expand(6144, 6144)}, tmp_path / "tuned.pth")
    assert (tmp_path / "tuned.pth").stat().st_size < 2000
    try:
        result = run_cli(["extract-lora", tmp_path / "base.pth", tmp_path / "tuned.pth", "--rank", "2",
                          "-o", tmp_path / "adapter"], timeout=60, data_limit=4 * 2**30)
    except subprocess.TimeoutExpired:
        pytest.fail("extract-lora worked for a minute on two files of 1.4 KB")
    assert result.returncode == 1, result.stderr
    err = result.stderr
    assert err.startswith("ckptsurgery: error: ") and err.count("\n") == 1 and "CKPTSURGERY_DEBUG" not in err, err
    assert "lin.weight: a view of 1 stored value repeated as [6144, 6144]" in err and "convert both files to .safetensors" in err, err
    assert not (tmp_path / "adapter").exists()

    save_file({"a.weight": torch.zeros(64, 64), "b.weight": torch.zeros(600, 500), "buf": torch.zeros(2**22)},
              str(tmp_path / "base.safetensors"))
    torch.save({"a.weight": torch.ones(1).expand(64, 64), "b.weight": torch.ones(600, 500),
                "buf": torch.ones(1).expand(2**22)}, tmp_path / "tuned.pth")
    torch.save({"a.weight": torch.zeros(1).expand(64, 64), "b.weight": torch.zeros(1).expand(600, 500),
                "buf": torch.zeros(1).expand(2**22)}, tmp_path / "base.pth")
    for base in ("base.safetensors", "base.pth"):
        result = cli("extract-lora", tmp_path / base, tmp_path / "tuned.pth", "--rank", "1", "-o", tmp_path / base[:-4],
                     "--json")
        assert result.code == 0, result.err
        doc = result.json()
        assert {e["key"]: e["error"] < 1e-4 for e in doc["extracted"]} == {"a.weight": True, "b.weight": True}
        assert [n["name"] for n in doc["not_extracted"]] == ["buf"]


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_extract_stops_at_once_on_sigterm_or_ctrl_c_during_a_long_svd(tmp_path, sig, code):
    """The SVD of one large weight is one call into LAPACK, minutes long; Python runs signal
    handlers only when it returns, so SIGTERM and Ctrl-C waited for it (and a CI job's timeout
    then SIGKILLed the run, leaving its staged folder). The SVD now runs in a worker thread: the
    signal unwinds at once, the staged folder is removed, and the run ends."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4000, 4000, generator=g)
    save_file({"big.weight": base}, str(tmp_path / "base.safetensors"))
    save_file({"big.weight": base + torch.randn(4000, 4000, generator=g)}, str(tmp_path / "tuned.safetensors"))
    env = {**os.environ, "PYTHONPATH": ROOT}
    env.pop("CKPTSURGERY_DEBUG", None)
    proc = subprocess.Popen([sys.executable, "-c", "from ckptsurgery.cli import main; main()", "extract-lora",
                             str(tmp_path / "base.safetensors"), str(tmp_path / "tuned.safetensors"), "--rank", "4",
                             "-o", str(tmp_path / "adapter")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)

    def staged():
        return [n for n in os.listdir(tmp_path) if n.endswith(".ckptsurgery-tmp")]

    def cpu_seconds():  # of every thread of the process
        fields = open(f"/proc/{proc.pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    try:
        deadline = time.monotonic() + 60
        while not staged():
            assert proc.poll() is None and time.monotonic() < deadline, "the extraction never started its write"
            time.sleep(0.01)
        # then it imports torch (a second or two of CPU) and starts the SVD (a minute of CPU):
        # 5 s of CPU past this point is well inside the SVD
        start = cpu_seconds()
        while cpu_seconds() < start + 5:
            assert proc.poll() is None and time.monotonic() < deadline, "the SVD finished before it could be interrupted"
            time.sleep(0.05)
        proc.send_signal(sig)
        sent = time.monotonic()
        while staged() and time.monotonic() < sent + 3:
            time.sleep(0.01)
        assert not staged(), "the staged folder outlived the signal by 3 s: the signal waited for the SVD"
        proc.wait(timeout=30)  # the interpreter's teardown, while the worker still computes
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == code, proc.stderr.read()
    assert b"Traceback" not in proc.stderr.read()
    assert sorted(os.listdir(tmp_path)) == ["base.safetensors", "tuned.safetensors"]


@contextlib.contextmanager
def alarm_after(seconds: float):
    """Raise TimeoutError in whatever runs past `seconds` (Python's matcher checks for signals,
    so a match that backtracks for hours is stopped too)."""

    def fire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("config, module, fragment", [
    # bounded repetitions, which the regex check did not count: 1000⁵ ways to split a name
    ({"target_modules": "a{0,999}" * 5 + "b"}, "a" * 1000, "could take about 1e+11 steps"),
    ({"target_modules": "(?:a{0,999}){5}b"}, "a" * 1000, "could take about 1e+11 steps"),
    ({"target_modules": "(?:a|aa)+b"}, "a" * 1000, "could take about 5e+39 steps"),
    ({"rank_pattern": {"a{0,999}" * 5 + "b": 4}}, "a" * 1000, "could take about"),
    # two repetitions allowed, made cubic by peft's `(.*\.)?(key)$` wrapper on a name of many dots
    ({"rank_pattern": {"[a-z.]*[a-z.]*x": 4}}, "a." * 1500 + "lin", "would take too long"),
    ({"alpha_pattern": {".*.*x": 4}}, "a." * 1500 + "lin", "would take too long"),
], ids=["target-bounded", "target-bounded-nested", "target-exponential", "rank-bounded", "rank-cubic",
                "alpha-cubic"])
def test_costly_adapter_patterns_are_refused_at_once(cli, tmp_path, config, module, fragment):
    """issue 18 §6: `target_modules` of bounded repetitions and a rank_pattern key that the
    fold's `(.*\\.)?(key)$` wrapper makes cubic hung `merge --lora` (patterns.py counted only
    unbounded repetitions, and ran keys inside peft's wrapper). Each is refused in one line,
    well under a second."""
    adapter = make_adapter(tmp_path / "adapter", {"target_modules": ["lin"], **config},
                           {f"{PREFIX}{module}.lora_A.weight": torch.ones(2, 3),
                            f"{PREFIX}{module}.lora_B.weight": torch.ones(4, 2)})
    base = make_base(tmp_path / "base.safetensors")
    start = time.monotonic()
    with alarm_after(10):
        result = cli("merge", base, "--lora", adapter, "-o", tmp_path / "out.safetensors")
    assert time.monotonic() - start < 1.0
    assert_one_error_line(result, "adapter_config.json", fragment)
    assert not (tmp_path / "out.safetensors").exists()


def test_peft_pattern_rules_fold_as_merge_and_unload(cli, tmp_path):
    """The rules patterns.py keeps, against peft itself: target_modules as one regular
    expression with three repetitions (peft's own documented example, which the old check
    refused), rank_pattern and alpha_pattern keys that are plain module names, dotted tails,
    anchored or regular expressions — first key in the file's order wins."""

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.v, self.o = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 6)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.SelfAttention, self.EncDecAttention = Attention(), Attention()

    class Seq2Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = nn.ModuleDict({"block": nn.ModuleList([Block()])})
            self.decoder = nn.ModuleDict({"block": nn.ModuleList([Block(), Block(), Block()])})

    config = LoraConfig(
        target_modules=r".*decoder.*(SelfAttention|EncDecAttention).*(q|v)$", r=2, lora_alpha=4,
        rank_pattern={r"block\.1\..*\.q": 3, "^decoder.block.0.SelfAttention.v": 5, "EncDecAttention.v": 4,
                      "decoder.block.2.SelfAttention.q": 1},
        alpha_pattern={r".*Attention\.v": 8, "q": 2.5})
    model, base_sd = peft_model(Seq2Seq, config)
    adapter = save_adapter(model, tmp_path / "adapter")
    ranks = {n.rsplit(".lora_A", 1)[0][len(PREFIX):]: p.shape[0] for n, p in model.named_parameters() if ".lora_A." in n}
    assert ranks == {"decoder.block.0.SelfAttention.q": 2, "decoder.block.0.SelfAttention.v": 5,
                     "decoder.block.0.EncDecAttention.q": 2, "decoder.block.0.EncDecAttention.v": 4,
                     "decoder.block.1.SelfAttention.q": 3, "decoder.block.1.SelfAttention.v": 2,
                     "decoder.block.1.EncDecAttention.q": 3, "decoder.block.1.EncDecAttention.v": 4,
                     "decoder.block.2.SelfAttention.q": 1, "decoder.block.2.SelfAttention.v": 2,
                     "decoder.block.2.EncDecAttention.q": 2, "decoder.block.2.EncDecAttention.v": 4}
    ref = merged_reference(model)
    save_file(base_sd, tmp_path / "base.safetensors")
    result = cli("merge", tmp_path / "base.safetensors", "--lora", adapter, "-o", tmp_path / "out.safetensors", "--json")
    assert result.code == 0, result.err
    assert result.json()["folded"] == 12
    assert_close(load_file(tmp_path / "out.safetensors"), ref)


def test_extract_lora_dry_run_over_an_existing_adapter_says_it_would_need_force(cli, tmp_path):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    base = {"lin.weight": torch.randn(6, 6, generator=g)}
    save_file(base, tmp_path / "base.safetensors")
    save_file({"lin.weight": base["lin.weight"] + torch.randn(6, 6, generator=g)}, tmp_path / "tuned.safetensors")
    args = ["extract-lora", tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", "--rank", "2",
            "-o", tmp_path / "adapter"]
    assert cli(*args).code == 0
    dry = cli(*args, "--dry-run", "--json")
    assert dry.code == 0 and dry.json()["needs_force"] == [str(tmp_path / "adapter")]
    assert cli(*args).code == 1  # the real run still refuses
