"""Review 13: merge methods and LoRA against mergekit 0.1.5 and peft 0.21 (issue 10). Each test
is a finding that fails today; its docstring states the expected behaviour and its source."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from conftest import Net

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def tiny_gpt2(cls_name="GPT2LMHeadModel", **extra):
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


# ---- extract-lora: peft must load the adapter and reproduce TUNED --------------------------------

def test_extract_lora_of_gpt2_conv1d_weights_loads_in_peft(cli, tmp_path):
    """Issue 10 §2: "peft loads the adapter onto the base model and reproduces TUNED within the
    error the dropped singular values imply". GPT-2's attention/MLP weights are transformers
    `Conv1D` ([in, out]); peft adapts them with fan_in_fan_out=True, i.e. lora_A [r, in] and
    lora_B [out, r] with ΔW = (B·A)ᵀ (peft/tuners/lora/layer.py `dispatch_default` forces
    fan_in_fan_out for Conv1D; `Linear.get_delta_weight` transposes). extract-lora factors the
    [in, out] matrix as if it were nn.Linear's [out, in] and writes fan_in_fan_out=false, so peft
    refuses the file (size mismatch for c_attn) — and would silently transpose a square one
    (attn.c_proj). Cause: ops/lora.py extract_lora/_kind treat every 2-D `.weight` as [out, in]."""
    model = tiny_gpt2()
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
        merged = peft_merge(tiny_gpt2(), tmp_path / "adapter")
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


# ---- merge --lora: equal to peft's merge_and_unload -------------------------------------------

def test_fold_square_conv1d_beside_a_non_square_linear_is_transposed_as_peft_does(cli, tmp_path):
    """GPT-2 with a LoRA on c_attn, attn.c_proj (Conv1D, square 8×8) and the classifier `score`
    (nn.Linear, [2, 8]). peft transposes every Conv1D delta and no nn.Linear one
    (peft/tuners/lora/layer.py `dispatch_default`, `Linear.get_delta_weight`), so
    merge_and_unload() adds (B·A)ᵀ to attn.c_proj. ops/lora.py `_square_layouts` guesses a square
    weight's layout from the other weights: none shares the name `c_proj`, and the rest disagree
    (c_attn: transposed; score: not), so it falls back to "nn.Linear's" and adds B·A untransposed.
    Suggested: prefer evidence from the same parent module (`…h.0.attn.c_attn` for
    `…h.0.attn.c_proj`), and report per key which layout was chosen (or refuse a guess)."""
    model = tiny_gpt2("GPT2ForSequenceClassification", num_labels=2)
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


# ---- docs against the code and against mergekit ----------------------------------------------

def test_cookbook_average_recipe_prints_what_the_command_prints(cli, tmp_path):
    """docs/cookbook.md "Average the last three checkpoints" shows `merge ... --average` printing
    "averaged 10 tensors with weights 0.333333, ..." and "taken from the first source (not
    floating)"; since --average became --method linear the command prints "merged 10 tensors by
    linear (weights 1,1,1)" and "taken from the first model". Issue 10 "Done means": recipes
    "with their real output". Fix: re-run the recipe and paste its output."""
    text = (ROOT / "docs" / "cookbook.md").read_text()
    block = text.split("## Average the last three checkpoints", 1)[1].split("```", 2)[1]
    printed = block.split("\n$ ", 2)[1].splitlines()[1:]  # what the first command ($ merge ...) printed
    shown = [line for line in printed if line and not line.startswith("wrote")]
    assert shown
    paths = []
    for epoch in (7, 8, 9):
        torch.manual_seed(epoch)
        paths.append(tmp_path / f"epoch{epoch}.pth")
        torch.save(Net().state_dict(), paths[-1])
    result = cli("merge", *paths, "--average", "-o", tmp_path / "swa.pth")
    assert result.code == 0, result.err
    for line in shown:
        assert line in result.err, (line, result.err)
