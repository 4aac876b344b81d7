"""--dequantize: scaled FP8 weights (DeepSeek-V3's weight_scale_inv blocks, compressed-tensors'
and FBGEMM's per-tensor / per-channel weight_scale) read back as bfloat16 (or --dtype), bit for
bit the float32 product W.float() · s then one cast, as DeepSeek's weight_dequant and
transformers' Fp8Dequantize compute it; streamed a block row at a time; refusals in one line."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import assert_one_error_line

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


def fp8(shape, dtype=E4M3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * 3).to(dtype)


def block_scales(shape, block=(128, 128), seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(-(-shape[0] // block[0]), -(-shape[1] // block[1]), generator=g) * 0.01 + 1e-4


def expected(w, s, block=(128, 128), dtype=torch.bfloat16):
    """The direct computation: the scale grid expanded over W, the float32 product, one cast."""
    if s.dim() == 2 and s.shape != (w.shape[0], 1):
        s = s.repeat_interleave(block[0], 0)[: w.shape[0]].repeat_interleave(block[1], 1)[:, : w.shape[1]]
    elif s.dim() == 1 and s.numel() == w.shape[0] and w.dim() == 2:
        s = s[:, None]
    return (w.float() * s.float()).to(dtype)


def bits(t):
    return t.contiguous().view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def convert(cli, src, out, *more):
    result = cli("convert", src, "-o", out, "--dequantize", "--json", *more)
    assert result.code == 0, result.err
    return result.json()


def test_block_scaled_ragged_edges_bit_for_bit(cli, tmp_path):
    w, s = fp8((300, 200)), block_scales((300, 200))
    norm = torch.randn(300)
    save_file({"l.weight": w, "l.weight_scale_inv": s, "norm.weight": norm}, tmp_path / "in.safetensors")
    doc = convert(cli, tmp_path / "in.safetensors", tmp_path / "out.safetensors")
    out = load_file(tmp_path / "out.safetensors")
    assert set(out) == {"l.weight", "norm.weight"}  # the scale left out
    assert torch.equal(bits(out["l.weight"]), bits(expected(w, s)))
    assert torch.equal(out["norm.weight"], norm)  # other tensors untouched without --dtype
    assert doc["dequantized"] == {"tensors": ["l.weight"], "dtype": "bfloat16", "schemes": {"block": 1},
                                  "block_size": [128, 128], "scales_dropped": ["l.weight_scale_inv"],
                                  "input_scales_dropped": []}


def test_known_answer_by_hand(cli, tmp_path):
    """A 130×130 weight of ones and twos: four blocks, each its own scale."""
    w = torch.ones(130, 130)
    w[128:, :] = 2
    s = torch.tensor([[0.5, 4.0], [3.0, 0.25]])
    save_file({"x.weight": w.to(E4M3), "x.weight_scale_inv": s}, tmp_path / "in.safetensors")
    convert(cli, tmp_path / "in.safetensors", tmp_path / "out.safetensors", "--dtype", "fp32")
    got = load_file(tmp_path / "out.safetensors")["x.weight"]
    assert got.dtype == torch.float32
    assert got[0, 0] == 0.5 and got[0, 129] == 4.0 and got[129, 0] == 6.0 and got[129, 129] == 0.5


def test_against_transformers_fp8_dequantize(cli, tmp_path):
    """transformers 5's Fp8Dequantize (its loader's dequantize=True path) runs on CPU for weights
    whose shape the block divides: the same bits."""
    finegrained = pytest.importorskip("transformers.integrations.finegrained_fp8")
    w, s = fp8((256, 384)), block_scales((256, 384))
    save_file({"l.weight": w, "l.weight_scale_inv": s}, tmp_path / "in.safetensors")
    convert(cli, tmp_path / "in.safetensors", tmp_path / "out.safetensors")
    theirs = finegrained.Fp8Dequantize(None)._dequantize_one(w, s, torch.bfloat16)
    assert torch.equal(bits(load_file(tmp_path / "out.safetensors")["l.weight"]), bits(theirs))


def test_block_size_from_config_json(cli, tmp_path):
    folder = tmp_path / "release"
    folder.mkdir()
    w, s = fp8((100, 70)), block_scales((100, 70), (64, 64))
    (folder / "config.json").write_text(json.dumps(
        {"model_type": "llama", "quantization_config": {"quant_method": "fp8", "weight_block_size": [64, 64]}}))
    save_file({"l.weight": w, "l.weight_scale_inv": s}, folder / "model.safetensors")
    for src in (folder, folder / "model.safetensors"):  # the folder, or a file beside its config.json
        doc = convert(cli, src, tmp_path / "out.safetensors", "--force")
        assert doc["dequantized"]["block_size"] == [64, 64]
        assert doc["dequantized"]["block_size_from"] == str(folder / "config.json")
        assert torch.equal(bits(load_file(tmp_path / "out.safetensors")["l.weight"]), bits(expected(w, s, (64, 64))))


@pytest.mark.parametrize("dtype", [E4M3, E5M2])
@pytest.mark.parametrize("scale_shape", [(), (1,), (6,), (6, 1)])
def test_per_tensor_and_per_channel_weight_scale(cli, tmp_path, dtype, scale_shape):
    """compressed-tensors and FBGEMM: W · weight_scale, the scale per tensor or per output row;
    the activation scale (input_scale) left out."""
    w = fp8((6, 10), dtype)
    s = (torch.arange(1, 7, dtype=torch.float32) / 16)[: max(1, torch.Size(scale_shape).numel())].reshape(scale_shape)
    save_file({"l.weight": w, "l.weight_scale": s, "l.input_scale": torch.tensor([0.1]), "l.bias": torch.zeros(6)},
              tmp_path / "in.safetensors")
    doc = convert(cli, tmp_path / "in.safetensors", tmp_path / "out.safetensors")
    out = load_file(tmp_path / "out.safetensors")
    assert set(out) == {"l.weight", "l.bias"}
    want = (w.float() * (s.reshape(-1, 1) if s.numel() == 6 else s.reshape(()))).to(torch.bfloat16)
    assert torch.equal(bits(out["l.weight"]), bits(want))
    scheme = "per-channel" if s.numel() == 6 else "per-tensor"
    assert doc["dequantized"]["schemes"] == {scheme: 1} and "block_size" not in doc["dequantized"]
    assert doc["dequantized"]["input_scales_dropped"] == ["l.input_scale"]


def test_known_answer_per_channel(tmp_path):
    from ckptsurgery.io import open_checkpoint
    from ckptsurgery.ops.dequantize import dequantize_checkpoint

    path = str(tmp_path / "in.safetensors")
    save_file({"l.weight": torch.tensor([[1.0, 2.0], [0.5, -1.0]]).to(E5M2),
               "l.weight_scale": torch.tensor([[2.0], [3.0]])}, path)
    with open_checkpoint(path) as ckpt:
        done, report = dequantize_checkpoint(ckpt, path, None)
        got = done.tensors["l.weight"].to_torch()
    assert got.tolist() == [[2.0, 4.0], [1.5, -3.0]] and report.schemes == {"per-channel": 1}


def test_streamed_one_block_row_at_a_time(cli, tmp_path, monkeypatch):
    """Each weight is a chunked tensor of whole block rows; a chunk of one block row writes the
    same bytes as the default chunk."""
    from ckptsurgery.io import open_checkpoint
    from ckptsurgery.ops import dequantize

    w, s = fp8((300, 200)), block_scales((300, 200))
    pw = fp8((50, 8), seed=3)
    save_file({"l.weight": w, "l.weight_scale_inv": s, "p.weight": pw, "p.weight_scale": torch.rand(50, 1)},
              tmp_path / "in.safetensors")
    convert(cli, tmp_path / "in.safetensors", tmp_path / "whole.safetensors")
    monkeypatch.setattr(dequantize, "CHUNK_BYTES", 1)
    convert(cli, tmp_path / "in.safetensors", tmp_path / "rows.safetensors")
    assert (tmp_path / "whole.safetensors").read_bytes() == (tmp_path / "rows.safetensors").read_bytes()
    with open_checkpoint(tmp_path / "in.safetensors") as ckpt:
        done, _ = dequantize.dequantize_checkpoint(ckpt, str(tmp_path / "in.safetensors"), None)
        assert [n for *_, n in done.tensors["l.weight"].storage.source.pieces] == [128 * 200 * 2] * 2 + [44 * 200 * 2]
        assert len(done.tensors["p.weight"].storage.source.pieces) == 50  # per channel: a row at a time


def test_pth_output_and_dtype(cli, tmp_path):
    w, s = fp8((130, 3)), block_scales((130, 3))
    save_file({"l.weight": w, "l.weight_scale_inv": s, "e.weight": torch.randn(4, 4)}, tmp_path / "in.safetensors")
    doc = convert(cli, tmp_path / "in.safetensors", tmp_path / "out.pth", "--dtype", "fp16")
    out = torch.load(tmp_path / "out.pth", weights_only=True)
    assert torch.equal(bits(out["l.weight"]), bits(expected(w, s, dtype=torch.float16)))
    assert out["e.weight"].dtype == torch.float16 and doc["dequantized"]["dtype"] == "float16"


def test_filter_drop_rename_take_it(cli, tmp_path):
    w, s = fp8((10, 4)), block_scales((10, 4))
    save_file({"a.weight": w, "a.weight_scale_inv": s, "b.weight": torch.ones(2)}, tmp_path / "in.safetensors")
    want = bits(expected(w, s))
    r = cli("filter", tmp_path / "in.safetensors", "--keep", "a", "-o", tmp_path / "f.safetensors", "--dequantize",
            "--json")
    assert r.code == 0, r.err
    assert r.json()["kept"] == ["a.weight"] and r.json()["dequantized"]["tensors"] == ["a.weight"]
    assert torch.equal(bits(load_file(tmp_path / "f.safetensors")["a.weight"]), want)
    r = cli("drop", tmp_path / "in.safetensors", "b", "-o", tmp_path / "d.safetensors", "--dequantize")
    assert r.code == 0 and "dequantized 1 float8 weight to bfloat16 (1 in blocks of 128×128); left out 1 scale" in r.err
    assert list(load_file(tmp_path / "d.safetensors")) == ["a.weight"]
    r = cli("rename", tmp_path / "in.safetensors", "--add-prefix", "model.", "-o", tmp_path / "r.safetensors",
            "--dequantize")
    assert r.code == 0, r.err
    out = load_file(tmp_path / "r.safetensors")
    assert set(out) == {"model.a.weight", "model.b.weight"} and torch.equal(bits(out["model.a.weight"]), want)


def test_nothing_to_dequantize_is_a_note(cli, tmp_path, safetensors_file):
    """Scripts run over many models: one without FP8 weights is written as it is, with a note."""
    plain = cli("convert", safetensors_file, "-o", tmp_path / "plain.safetensors")
    r = cli("convert", safetensors_file, "-o", tmp_path / "dq.safetensors", "--dequantize")
    assert plain.code == r.code == 0
    assert "note: --dequantize: no float8 weight with a scale in the input; written as it is" in r.err
    assert (tmp_path / "plain.safetensors").read_bytes() == (tmp_path / "dq.safetensors").read_bytes()


def test_without_dequantize_fp8_kept_as_is(cli, tmp_path):
    w, s = fp8((10, 4)), block_scales((10, 4))
    save_file({"a.weight": w, "a.weight_scale_inv": s}, tmp_path / "in.safetensors")
    assert cli("convert", tmp_path / "in.safetensors", "-o", tmp_path / "out.safetensors").code == 0
    out = load_file(tmp_path / "out.safetensors")
    assert out["a.weight"].dtype == E4M3 and "a.weight_scale_inv" in out


@pytest.mark.parametrize("tensors, fragments", [
    ({"a.weight": fp8((300, 200)), "a.weight_scale_inv": torch.ones(2, 2)},
     ["a.weight_scale_inv has shape [2, 2], which does not fit a.weight [300, 200]", "[3, 2]"]),
    ({"a.weight": fp8((6, 4)), "a.weight_scale": torch.ones(5)}, ["a.weight_scale has shape [5]", "[6, 1]"]),
    ({"a.weight": fp8((6, 4)), "a.weight_scale": torch.tensor([float("nan")])}, ["a.weight_scale holds NaN"]),
    ({"a.weight": fp8((6, 4)), "a.weight_scale_inv": torch.tensor([[float("inf")]])}, ["NaN or infinite"]),
    ({"a.weight": fp8((6, 4))}, ["a.weight: float8 without a scale"]),
    ({"a.weight_scale_inv": torch.ones(1, 1)}, ["a.weight_scale_inv is a scale without its weight a.weight"]),
    ({"a.weight": torch.ones(6, 4), "a.weight_scale": torch.ones(())}, ["it is float32, not float8"]),
    ({"a.weight": fp8((6, 4)), "a.weight_scale": torch.ones(6, dtype=torch.int32)}, ["not a floating scale"]),
])
def test_refusals_are_one_line(cli, tmp_path, tensors, fragments):
    save_file(tensors, tmp_path / "in.safetensors")
    r = cli("convert", tmp_path / "in.safetensors", "-o", tmp_path / "out.safetensors", "--dequantize")
    assert_one_error_line(r, *fragments)
    assert not (tmp_path / "out.safetensors").exists()


def test_bad_block_size_in_config_is_one_line(cli, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {"weight_block_size": [0, "x"]}}))
    save_file({"a.weight": fp8((6, 4)), "a.weight_scale_inv": torch.ones(1, 1)}, tmp_path / "model.safetensors")
    assert_one_error_line(cli("convert", tmp_path / "model.safetensors", "-o", tmp_path / "o.safetensors",
                              "--dequantize"), "weight_block_size")


# ---- merges: an FP8 input with --dequantize is the dequantized file, merged ---------------------

def fp8_release(path, seed):
    w, s = fp8((140, 130), seed=seed), block_scales((140, 130), seed=seed + 10)
    save_file({"l.weight": w, "l.weight_scale_inv": s, "l.bias": torch.randn(140, generator=torch.Generator().manual_seed(seed))},
              path)
    return path


def dequantized_copy(cli, src, out):
    assert cli("convert", src, "-o", out, "--dequantize").code == 0
    return out


def test_merges_take_fp8_inputs(cli, tmp_path):
    a, b = fp8_release(tmp_path / "a.safetensors", 1), fp8_release(tmp_path / "b.safetensors", 2)
    a16, b16 = dequantized_copy(cli, a, tmp_path / "a16.safetensors"), dequantized_copy(cli, b, tmp_path / "b16.safetensors")
    for options in (["--average"], ["--method", "ties", "--base", None, "--density", "0.5"]):
        fp8_options = [str(a) if o is None else o for o in options]
        bf16_options = [str(a16) if o is None else o for o in options]
        r = cli("merge", a, b, "-o", tmp_path / "m8.safetensors", "--dequantize", "--force", "--json", *fp8_options)
        assert r.code == 0, r.err
        assert r.json()["dequantized"]["schemes"] == {"block": 3 if "--base" in options else 2}
        assert cli("merge", a16, b16, "-o", tmp_path / "m16.safetensors", "--force", *bf16_options).code == 0
        m8, m16 = load_file(tmp_path / "m8.safetensors"), load_file(tmp_path / "m16.safetensors")
        assert m8.keys() == m16.keys() and all(torch.equal(bits(m8[k]), bits(m16[k])) for k in m8)
    r = cli("merge", a, b, "-o", tmp_path / "u.safetensors", "--on-conflict", "last", "--dequantize")
    assert r.code == 0 and torch.equal(bits(load_file(tmp_path / "u.safetensors")["l.weight"]),
                                       bits(load_file(b16)["l.weight"]))
    template = tmp_path / "t.safetensors"
    save_file({"l.weight": torch.zeros(140, 130, dtype=torch.bfloat16)}, template)
    r = cli("merge", a, "--into", template, "-o", tmp_path / "i.safetensors", "--dequantize")
    assert r.code == 0, r.err
    assert torch.equal(bits(load_file(tmp_path / "i.safetensors")["l.weight"]), bits(load_file(a16)["l.weight"]))


def test_lora_folds_into_an_fp8_base(cli, tmp_path):
    """Today's refusal (a LoRA folds into floating-point weights, not float8) stands without
    --dequantize; with it, the fold is the fold into the dequantized base."""
    base = fp8_release(tmp_path / "base.safetensors", 3)
    base16 = dequantized_copy(cli, base, tmp_path / "base16.safetensors")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["l"], "fan_in_fan_out": False}))
    g = torch.Generator().manual_seed(5)
    save_file({"base_model.model.l.lora_A.weight": torch.randn(2, 130, generator=g),
               "base_model.model.l.lora_B.weight": torch.randn(140, 2, generator=g)},
              adapter / "adapter_model.safetensors")
    refused = cli("merge", base, "--lora", adapter, "-o", tmp_path / "x.safetensors")
    assert_one_error_line(refused, "float8_e4m3fn")
    r = cli("merge", base, "--lora", adapter, "-o", tmp_path / "f8.safetensors", "--dequantize", "--json")
    assert r.code == 0, r.err
    assert r.json()["dequantized"]["tensors"] == ["l.weight"] and r.json()["folded"] == 1
    assert cli("merge", base16, "--lora", adapter, "-o", tmp_path / "f16.safetensors").code == 0
    f8, f16 = load_file(tmp_path / "f8.safetensors"), load_file(tmp_path / "f16.safetensors")
    assert f8.keys() == f16.keys() and all(torch.equal(bits(f8[k]), bits(f16[k])) for k in f8)
    assert cli("lora", "fold", base, adapter, "-o", tmp_path / "lf.safetensors", "--dequantize").code == 0
    assert (tmp_path / "lf.safetensors").read_bytes() == (tmp_path / "f8.safetensors").read_bytes()


def test_recipe_refuses_dequantize(cli, tmp_path):
    recipe = tmp_path / "r.yml"
    recipe.write_text("merge_method: linear\nmodels:\n  - model: a\n")
    assert_one_error_line(cli("merge", "--config", recipe, "-o", tmp_path / "o", "--dequantize"),
                          "--config does not combine with --dequantize", code=2)


# ---- a model folder in, -o DIR/ out: a model folder from_pretrained loads ------------------------

def fp8_llama_release(folder, block=(8, 8)):
    """A tiny Llama saved, then its linear weights quantized to block-scaled FP8 as a DeepSeek-style
    release holds them, config.json with its quantization_config, a generation config, a sharded index."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, vocab_size=32,
                                         max_position_embeddings=16))
    model.save_pretrained(folder, max_shard_size="8KB")
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": list(block)}
    (folder / "config.json").write_text(json.dumps(config))
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    expected_weights = {}
    for shard in sorted(set(index["weight_map"].values())):
        tensors = load_file(folder / shard)
        for name in [n for n in tensors if n.endswith("proj.weight")]:
            w = tensors[name].to(E4M3)
            s = block_scales(tuple(w.shape), block, seed=len(name))
            tensors[name], tensors[name + "_scale_inv"] = w, s
            index["weight_map"][name + "_scale_inv"] = shard
            expected_weights[name] = expected(w, s, block)
        save_file(tensors, folder / shard, metadata={"format": "pt"})
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return expected_weights


def test_model_folder_out_loads_with_from_pretrained(cli, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    release = tmp_path / "release"
    want = fp8_llama_release(release)
    capsys.readouterr()  # what saving printed (deepspeed's accelerator line) is not the command's
    r = cli("convert", release, "-o", f"{tmp_path / 'bf16'}/", "--dequantize", "--json")
    assert r.code == 0, r.err
    doc = r.json()
    assert doc["model_folder"]["config_changes"] == {"torch_dtype": "bfloat16", "dtype": "bfloat16",
                                                     "quantization_config": None}
    assert "generation_config.json" in doc["model_folder"]["copied"]
    out = tmp_path / "bf16"
    assert {"config.json", "generation_config.json", "model.safetensors.index.json"} <= set(os.listdir(out))
    # sharded as the input was: the same names in the same shards, the scales gone
    theirs = json.loads((release / "model.safetensors.index.json").read_text())["weight_map"]
    ours = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert ours == {name: shard for name, shard in theirs.items() if not name.endswith("_scale_inv")}
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["torch_dtype"] == "bfloat16"
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    state = model.state_dict()
    assert all(torch.equal(bits(state[name]), bits(w)) for name, w in want.items())
    assert getattr(model.config, "quantization_config", None) is None
    capsys.readouterr()  # transformers' loading bar
    again = cli("convert", release, "-o", f"{out}/", "--dequantize", "--max-shard-size", "4KB")
    assert_one_error_line(again, "already exists; pass --force")
    assert cli("convert", release, "-o", f"{out}/", "--dequantize", "--max-shard-size", "1MB", "--force").code == 0
    assert "model.safetensors" in os.listdir(out) and "model.safetensors.index.json" not in os.listdir(out)


def test_inspect_and_diff_read_it_too(cli, tmp_path):
    w, s = fp8((130, 20)), block_scales((130, 20))
    save_file({"a.weight": w, "a.weight_scale_inv": s}, tmp_path / "fp8.safetensors")
    save_file({"a.weight": expected(w, s)}, tmp_path / "bf16.safetensors")
    r = cli("inspect", tmp_path / "fp8.safetensors", "--dequantize", "--stats", "--json")
    assert r.code == 0, r.err
    doc = r.json()
    assert [(t["name"], t["dtype"]) for t in doc["tensors"]] == [("a.weight", "bfloat16")]
    assert doc["tensors"][0]["max"] == expected(w, s).float().max().item()
    assert doc["dequantized"]["scales_dropped"] == ["a.weight_scale_inv"]
    assert cli("diff", tmp_path / "fp8.safetensors", tmp_path / "bf16.safetensors").code == 1
    r = cli("diff", tmp_path / "fp8.safetensors", tmp_path / "bf16.safetensors", "--dequantize", "--json")
    assert r.code == 0 and r.json()["identical"] and r.json()["dequantized"]["tensors"] == ["a.weight"]


def test_pth_input_bf16_scales_and_a_huge_config(cli, tmp_path, monkeypatch):
    """A .pth release, scales stored in bfloat16 (compressed-tensors often does): the float32
    product of the widened values, as for float32 scales."""
    from ckptsurgery.ops import dequantize

    w, s = fp8((7, 5), E5M2), (torch.rand(7, 1) + 0.5).to(torch.bfloat16)
    torch.save({"a.weight": w, "a.weight_scale": s}, tmp_path / "in.pth")
    convert(cli, tmp_path / "in.pth", tmp_path / "out.safetensors")
    assert torch.equal(bits(load_file(tmp_path / "out.safetensors")["a.weight"]),
                       bits((w.float() * s.float()).to(torch.bfloat16)))
    monkeypatch.setattr(dequantize, "MAX_CONFIG", 10)
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {}}))
    assert_one_error_line(cli("convert", tmp_path / "in.pth", "-o", tmp_path / "o.safetensors", "--dequantize"),
                          "not a model's config.json")


# ---- every float8 byte, every output dtype: the tables looked up are torch's own products -------

EDGE_SCALES = [1.0, 0.1, 1 / 3, 1e-30, 1e-38, 1e-45, 3e38, 1e4, 65504 / 448, 2.0 ** -20]


def every_byte(rows, columns):
    """A float8 weight whose every block (and every row, when rows are wide) holds all 256 bytes,
    NaNs and infinities included."""
    r = torch.arange(rows)[:, None] * 7 + torch.arange(columns)[None, :]
    return (r % 256).to(torch.uint8)


@pytest.mark.parametrize("fmt", [E4M3, E5M2])
@pytest.mark.parametrize("dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)])
def test_every_float8_byte_against_torch(cli, tmp_path, fmt, dtype):
    """Each of the 256 bytes of both float8 formats, times scales that make float32 subnormals,
    zeros, infinities and float16 overflows, cast to each output dtype: the bits torch computes
    (NaN included), for block, per-tensor, wide and narrow per-channel scales."""
    name, torch_dtype = dtype
    w = every_byte(256, 600).view(fmt)
    blocks = torch.tensor(EDGE_SCALES, dtype=torch.float32).reshape(2, 5)
    wide = every_byte(12, 1024).view(fmt)
    narrow = every_byte(300, 9).view(fmt)
    rows_wide = torch.tensor(EDGE_SCALES + [0.5, 7.0], dtype=torch.float32)[:, None]
    rows_narrow = torch.tensor(EDGE_SCALES * 30, dtype=torch.float32)
    tensors = {"b.weight": w, "b.weight_scale_inv": blocks, "w.weight": wide, "w.weight_scale": rows_wide,
               "n.weight": narrow, "n.weight_scale": rows_narrow}
    for i, s in enumerate(EDGE_SCALES):
        tensors[f"t{i}.weight"] = every_byte(3, 256).view(fmt)
        tensors[f"t{i}.weight_scale"] = torch.tensor(s)
    save_file(tensors, tmp_path / "in.safetensors")
    convert(cli, tmp_path / "in.safetensors", tmp_path / "out.safetensors", "--dtype", name)
    out = load_file(tmp_path / "out.safetensors")
    assert torch.equal(bits(out["b.weight"]), bits(expected(w, blocks, dtype=torch_dtype)))
    assert torch.equal(bits(out["w.weight"]), bits((wide.float() * rows_wide).to(torch_dtype)))
    assert torch.equal(bits(out["n.weight"]), bits((narrow.float() * rows_narrow[:, None]).to(torch_dtype)))
    for i, s in enumerate(EDGE_SCALES):
        t = tensors[f"t{i}.weight"]
        assert torch.equal(bits(out[f"t{i}.weight"]), bits((t.float() * torch.tensor(s)).to(torch_dtype)))


def test_float8_values_are_torchs():
    """The float32 value of each float8 byte, NaN payloads included, as torch converts it."""
    from ckptsurgery.ops.dequantize import _values

    for fmt in (E4M3, E5M2):
        theirs = torch.arange(256, dtype=torch.uint8).view(fmt).float().view(torch.int32)
        assert torch.equal(torch.from_numpy(_values(str(fmt).removeprefix("torch.")).view("int32")), theirs)


# ---- chunks made ahead: any reading order, any number of cores, the same bytes -----------------

def test_chunks_in_any_order_and_on_one_core(tmp_path, monkeypatch):
    """Writers take chunks in order and the workers make the next ones ahead (across weights);
    a reader that takes them backwards, twice, or skips some gets the same bytes, and so does
    one core (nothing made ahead, nothing split)."""
    from ckptsurgery.io import open_checkpoint
    from ckptsurgery.ops import dequantize

    monkeypatch.setattr(dequantize, "CHUNK_BYTES", 1)  # a chunk per block row (per row, per channel)
    tensors = {"a.weight": fp8((700, 300)), "a.weight_scale_inv": block_scales((700, 300)),
               "b.weight": fp8((40, 600), seed=4), "b.weight_scale": torch.rand(40, 1) + 0.5,
               "c.weight": fp8((300, 130), seed=5), "c.weight_scale_inv": block_scales((300, 130), seed=6)}
    path = tmp_path / "in.safetensors"
    save_file(tensors, path)
    want = {"a": expected(tensors["a.weight"], tensors["a.weight_scale_inv"]),
            "b": (tensors["b.weight"].float() * tensors["b.weight_scale"]).to(torch.bfloat16),
            "c": expected(tensors["c.weight"], tensors["c.weight_scale_inv"])}

    def read(order):
        with open_checkpoint(path) as ckpt:
            done, _ = dequantize.dequantize_checkpoint(ckpt, str(path), None)
            pieces = {n: done.tensors[f"{n}.weight"].storage.source.pieces for n in want}
            got = {n: [None] * len(p) for n, p in pieces.items()}
            for n, k in order(pieces):
                source, offset, size = pieces[n][k]
                got[n][k] = bytes(source.view(offset, size))
        return {n: torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.bfloat16).view(want[n].shape)
                for n, chunks in got.items()}

    in_order = lambda p: [(n, k) for n in p for k in range(len(p[n]))]  # noqa: E731
    backwards = lambda p: in_order(p)[::-1]  # noqa: E731
    every_other_twice = lambda p: in_order(p)[::2] + in_order(p)[1::2] + in_order(p)[::3]  # noqa: E731
    interleaved = lambda p: sorted(in_order(p), key=lambda nk: (nk[1], nk[0]))  # noqa: E731
    for order in (in_order, backwards, every_other_twice, interleaved):
        got = read(order)
        assert all(torch.equal(bits(got[n]), bits(want[n])) for n in want), order
    monkeypatch.setattr(dequantize._ahead, "workers", 1)
    monkeypatch.setattr(dequantize._ahead, "depth", 0)
    for order in (in_order, backwards):
        got = read(order)
        assert all(torch.equal(bits(got[n]), bits(want[n])) for n in want)


def test_a_chunk_made_ahead_that_fails_fails_its_own_read(tmp_path, monkeypatch):
    """Making the next weight's first chunk ahead may fail (its bytes unreadable): the weight
    being read is unaffected, and the error comes when (if) that chunk is read."""
    from ckptsurgery.io import open_checkpoint
    from ckptsurgery.ops import dequantize

    path = tmp_path / "in.safetensors"
    save_file({"a.weight": fp8((130, 20)), "a.weight_scale_inv": block_scales((130, 20)),
               "b.weight": fp8((130, 20), seed=2), "b.weight_scale_inv": block_scales((130, 20))}, path)
    parts = dequantize._Weight.parts

    def failing(self, j):
        if self.shape and self.plan.weight is failing.b:
            raise OSError("unreadable")
        return parts(self, j)

    monkeypatch.setattr(dequantize._Weight, "parts", failing)
    with open_checkpoint(path) as ckpt:
        done, _ = dequantize.dequantize_checkpoint(ckpt, str(path), None)
        failing.b = ckpt.tensors["b.weight"]
        assert torch.equal(bits(done.tensors["a.weight"].to_torch()),
                           bits(expected(ckpt.tensors["a.weight"].to_torch(), ckpt.tensors["a.weight_scale_inv"].to_torch())))
        with pytest.raises(OSError, match="unreadable"):
            done.tensors["b.weight"].to_torch()


def test_buffers_reused_only_when_nothing_holds_them(tmp_path):
    """Chunk buffers are used again once dropped, never while the reader (or a view) holds one:
    a reader holding a view of every chunk at once still sees each chunk's own bytes."""
    from ckptsurgery.io import open_checkpoint
    from ckptsurgery.ops import dequantize

    pool = dequantize._Buffers()
    if pool.refcount is None:
        pytest.skip("references are not counted here: buffers are never reused")
    a = pool.get(100)
    first = id(a.base)
    assert id(pool.get(100).base) != first  # `a` still held
    del a
    b = pool.get(60)
    assert id(b.base) == first  # dropped: reused
    view = memoryview(b)[10:20]
    del b
    assert id(pool.get(60).base) != first  # a view of it alive: not reused
    del view
    assert id(pool.get(60).base) == first

    w, s = fp8((1000, 256)), block_scales((1000, 256))
    path = tmp_path / "in.safetensors"
    save_file({"l.weight": w, "l.weight_scale_inv": s}, path)
    with open_checkpoint(path) as ckpt:
        done, _ = dequantize.dequantize_checkpoint(ckpt, str(path), None)
        pieces = done.tensors["l.weight"].storage.source.pieces
        assert len(pieces) == 1
    with open_checkpoint(path) as ckpt, pytest.MonkeyPatch.context() as m:
        m.setattr(dequantize, "CHUNK_BYTES", 1)
        done, _ = dequantize.dequantize_checkpoint(ckpt, str(path), None)
        pieces = done.tensors["l.weight"].storage.source.pieces
        views = [source.view(offset, size) for source, offset, size in pieces]  # all held, none copied
        assert len(views) == 8
        got = torch.frombuffer(bytearray(b"".join(views)), dtype=torch.bfloat16).view(1000, 256)
    assert torch.equal(bits(got), bits(expected(w, s)))
