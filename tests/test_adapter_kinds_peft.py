"""Adapter kinds beyond LoRA read from PEFT folders — DoRA (`use_dora`), IA3, LoHa, LoKr — folded
by `merge BASE --lora ADAPTER` equal to peft's own merge_and_unload() within 1e-5 relative on
float32, and to peft's forward pass on the unmerged model; hostile adapters of these kinds
refused in one line, nothing written."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from conftest import assert_one_error_line

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402

PREFIX = "base_model.model."


class Net(nn.Module):
    """One of each layer DoRA adapts: an embedding, linear layers (one square), transformers'
    Conv1D (GPT-2's [in, out] weight: peft's fan_in_fan_out) and 2-D and 1-D convs."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.lin = nn.Linear(6, 5)
        self.sq = nn.Linear(5, 5, bias=False)
        self.gpt = Conv1D(7, 5)  # 7 outputs, 5 inputs: weight [5, 7]
        self.conv = nn.Conv2d(3, 4, 3)
        self.conv1 = nn.Conv1d(4, 6, 2)

    def forward(self, tokens, image, seq):
        x = self.gpt(self.sq(self.lin(self.emb(tokens))))
        return x, self.conv(image), self.conv1(seq)


TARGETS = ["emb", "lin", "sq", "gpt", "conv", "conv1"]


def inputs():
    g = torch.Generator().manual_seed(3)
    return (torch.randint(0, 11, (2, 4), generator=g), torch.randn(2, 3, 6, 6, generator=g),
            torch.randn(2, 4, 5, generator=g))


def trained(config, seed=1, make=Net):
    """A peft model of `make` with every adapter weight given values (peft starts B at zero and
    m at ‖W‖, which would fold to W): (model, the base's state dict)."""
    torch.manual_seed(0)
    base = make()
    base_sd = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.3 * torch.randn(p.shape, generator=g))
            elif "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval(), base_sd


def fold(cli, tmp_path, base_sd, *adapters, args=()):
    save_file(base_sd, tmp_path / "base.safetensors")
    out = tmp_path / "out.safetensors"
    lora = [a for adapter in adapters for a in ("--lora", adapter)]
    result = cli("merge", tmp_path / "base.safetensors", *lora, *args, "-o", out, "--json")
    assert result.code == 0, result.err
    return load_file(out), result.json()


def assert_equal_within(got: dict, want: dict, rtol=1e-5):
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
        torch.testing.assert_close(got[k], want[k], rtol=rtol, atol=rtol * want[k].abs().max().item(), msg=k)


def assert_runs_as(net, state: dict, inputs: tuple, forward) -> None:
    """`net` with `state` loaded gives, on `inputs`, the outputs `forward` (peft's model's) gave."""
    net.load_state_dict(state)
    with torch.no_grad():
        for ours, theirs in zip(net(*inputs), forward):
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


# ---- DoRA ------------------------------------------------------------------------------------

@pytest.mark.parametrize("chunk", [None, 7])
def test_dora_folds_as_peft_merges_and_runs_as_peft_forward(cli, tmp_path, monkeypatch, chunk):
    """Linear (norm per row), Conv1D and Embedding (per column: the output is W's second axis),
    2-D and 1-D convs (per output channel); `chunk`: 7 elements at a time, so that row norms are
    made chunk by chunk and column norms over every chunk first."""
    if chunk:
        monkeypatch.setattr("ckptsurgery.ops.adapters.fold.CHUNK", chunk)
    model, base_sd = trained(LoraConfig(r=2, lora_alpha=3, target_modules=TARGETS, use_dora=True))
    model.save_pretrained(str(tmp_path / "dora"))
    saved = load_file(tmp_path / "dora" / "adapter_model.safetensors")
    magnitudes = {k.removeprefix(PREFIX) for k in saved if "magnitude" in k}
    assert magnitudes == {f"{t}.lora_magnitude_vector" for t in TARGETS}
    with torch.no_grad():
        forward = model(*inputs())
        merged = {k: v.clone() for k, v in model.merge_and_unload().state_dict().items()}
    got, doc = fold(cli, tmp_path, base_sd, tmp_path / "dora")
    assert_equal_within(got, merged)
    assert doc["adapters"][0]["kinds"] == {"dora": len(TARGETS)} and doc["folded"] == len(TARGETS)
    summary = cli("merge", tmp_path / "base.safetensors", "--lora", tmp_path / "dora", "-o", tmp_path / "2.safetensors")
    assert "(peft, 6 dora, scale 1, 6 weights)" in summary.err
    # peft's merge agrees with its own forward here (one adapter); ours too
    assert_runs_as(Net(), got, inputs(), forward)


def test_dora_on_gpt2_with_a_square_conv1d_and_rslora(cli, tmp_path):
    """GPT-2's c_attn ([8, 24]) and square c_proj ([8, 8], transposed: told by its sibling), with
    rsLoRA's α/√r scale."""
    from transformers import GPT2Config, GPT2LMHeadModel

    def gpt2():
        return GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16, n_positions=8))

    config = LoraConfig(r=3, lora_alpha=5, use_rslora=True, use_dora=True, target_modules=["c_attn", "c_proj", "c_fc"])
    model, base_sd = trained(config, make=gpt2)
    model.save_pretrained(str(tmp_path / "dora"))
    merged = {k: v.clone() for k, v in model.merge_and_unload().state_dict().items()}
    base_sd.pop("lm_head.weight")  # tied to wte: safetensors keeps one
    merged.pop("lm_head.weight")
    got, _ = fold(cli, tmp_path, base_sd, tmp_path / "dora")
    assert_equal_within(got, merged)


def test_dora_scale_scales_the_delta_inside_the_norm_as_peft_does(cli, tmp_path):
    """--lora-scale S: peft's scale_layer(S) (its scaling times S), merged."""
    model, base_sd = trained(LoraConfig(r=2, lora_alpha=2, target_modules=["lin", "gpt", "conv"], use_dora=True))
    model.save_pretrained(str(tmp_path / "dora"))
    for module in model.modules():
        if hasattr(module, "scale_layer") and hasattr(module, "lora_magnitude_vector"):
            module.scale_layer(0.4)
    merged = {k: v.clone() for k, v in model.merge_and_unload().state_dict().items()}
    got, doc = fold(cli, tmp_path, base_sd, tmp_path / "dora", args=("--lora-scale", "0.4"))
    assert doc["adapters"][0]["scale"] == 0.4
    assert_equal_within(got, merged)


def test_stacked_adapters_fold_as_peft_merges_them_together(cli, tmp_path):
    """A LoRA, then two DoRA adapters on some of the same weights (rows and columns normed),
    folded in that order: peft's merge of the three loaded into one model, all active, which
    equals its forward — each DoRA's norm from the base weight alone, its rescale applied to the
    weight with the adapters before it."""
    from peft import PeftModel

    configs = {"a": LoraConfig(r=2, lora_alpha=2, target_modules=["lin", "gpt", "emb"]),
               "b": LoraConfig(r=2, lora_alpha=3, target_modules=["lin", "gpt", "conv", "emb"], use_dora=True),
               "c": LoraConfig(r=3, lora_alpha=2, target_modules=["lin", "emb"], use_dora=True)}
    for seed, (name, config) in enumerate(configs.items()):
        model, base_sd = trained(config, seed=seed + 4)
        model.save_pretrained(str(tmp_path / name))
    torch.manual_seed(0)
    model = PeftModel.from_pretrained(Net(), str(tmp_path / "a"), adapter_name="a")
    for name in "bc":
        model.load_adapter(str(tmp_path / name), adapter_name=name)
    model.base_model.set_adapter(list(configs))
    with torch.no_grad():
        forward = model(*inputs())
        merged = {k: v.clone() for k, v in model.merge_and_unload(adapter_names=list(configs)).state_dict().items()}
    got, doc = fold(cli, tmp_path, base_sd, *(tmp_path / name for name in configs))
    assert [a["kinds"] for a in doc["adapters"]] == [{"lora": 3}, {"dora": 4}, {"dora": 2}]
    assert_equal_within(got, merged)
    assert_runs_as(Net(), got, inputs(), forward)


# ---- DoRA: hostile adapters --------------------------------------------------------------------

def dora_folder(folder, tensors=None, **config):
    """A hand-made DoRA adapter on `lin` ([4, 3]): r=2, alpha=2."""
    folder.mkdir(parents=True, exist_ok=True)
    doc = {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["lin"], "use_dora": True, **config}
    (folder / "adapter_config.json").write_text(json.dumps(doc))
    if tensors is None:
        tensors = {}
    tensors = {f"{PREFIX}lin.lora_A.weight": torch.ones(2, 3), f"{PREFIX}lin.lora_B.weight": torch.ones(4, 2),
               f"{PREFIX}lin.lora_magnitude_vector": torch.ones(4), **tensors}
    save_file({k: v for k, v in tensors.items() if v is not None}, str(folder / "adapter_model.safetensors"))
    return folder


@pytest.mark.parametrize("magnitude, fragments", [
    (torch.ones(3), ["lora_magnitude_vector [3]", "one floating magnitude per output (4, a row each)"]),
    (torch.ones(4, 3), ["lora_magnitude_vector [4, 3]"]),
    (torch.tensor([1.0, float("nan"), 1.0, 1.0]), ["NaN or infinite"]),
    (torch.tensor([1.0, float("inf"), 1.0, 1.0]), ["NaN or infinite"]),
    (torch.ones(4, dtype=torch.int32), ["int32"]),
])
def test_a_magnitude_that_does_not_fit_is_refused(cli, tmp_path, magnitude, fragments):
    save_file({"lin.weight": torch.randn(4, 3)}, str(tmp_path / "base.safetensors"))
    adapter = dora_folder(tmp_path / "dora", {f"{PREFIX}lin.lora_magnitude_vector": magnitude})
    result = cli("merge", tmp_path / "base.safetensors", "--lora", adapter, "-o", tmp_path / "out.safetensors")
    assert_one_error_line(result, "lin", *fragments)
    assert not (tmp_path / "out.safetensors").exists()


def test_a_magnitude_of_the_wrong_axis_is_refused(cli, tmp_path):
    """A Conv1D weight [in=3, out=4]: one magnitude per output, a column; one per row is refused."""
    save_file({"lin.weight": torch.randn(3, 4)}, str(tmp_path / "base.safetensors"))
    adapter = dora_folder(tmp_path / "dora", {f"{PREFIX}lin.lora_magnitude_vector": torch.ones(3)})
    result = cli("merge", tmp_path / "base.safetensors", "--lora", adapter, "-o", tmp_path / "out.safetensors")
    assert_one_error_line(result, "lora_magnitude_vector [3]", "(4, a column each)")


@pytest.mark.parametrize("case, fragments", [
    ("no-dora", ["lora_magnitude_vector", "does not set use_dora"]),
    ("no-factors", ["other has a lora_magnitude_vector but no lora_A"]),
    ("two-names", ["two lora_magnitude_vector"]),
    ("bias", ["lora_bias", "DoRA"]),
    ("zero-row", ["a row of W + s·ΔW is all zeros"]),
])
def test_dora_files_that_disagree_are_refused(cli, tmp_path, case, fragments):
    base = torch.randn(4, 3)
    tensors, config = {}, {}
    if case == "no-dora":
        config["use_dora"] = False
    elif case == "no-factors":
        tensors[f"{PREFIX}other.lora_magnitude_vector"] = torch.ones(4)
    elif case == "two-names":
        tensors[f"{PREFIX}lin.lora_magnitude_vector.default.weight"] = torch.ones(4)
    elif case == "bias":
        tensors[f"{PREFIX}lin.lora_B.bias"] = torch.ones(4)
    else:  # W's first row 0 and B's too: nothing to normalise
        base[0] = 0
        tensors[f"{PREFIX}lin.lora_B.weight"] = torch.cat([torch.zeros(1, 2), torch.ones(3, 2)])
    save_file({"lin.weight": base, "lin.bias": torch.zeros(4)}, str(tmp_path / "base.safetensors"))
    adapter = dora_folder(tmp_path / "dora", tensors, **config)
    result = cli("merge", tmp_path / "base.safetensors", "--lora", adapter, "-o", tmp_path / "out.safetensors")
    assert_one_error_line(result, *fragments)
    assert not (tmp_path / "out.safetensors").exists()


# ---- IA3 -------------------------------------------------------------------------------------

class IaNet(nn.Module):
    """What peft's IA3 adapts — nn.Linear, transformers' Conv1D, Conv2d (a grouped one too) and
    Conv3d — each as an output module (the vector scales W's outputs and the bias) and as a
    feed-forward one (its inputs); two square linear weights, whose shape cannot tell."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 5)
        self.ff = nn.Linear(5, 7)
        self.sq = nn.Linear(7, 7)
        self.sqff = nn.Linear(7, 7, bias=False)
        self.gpt = Conv1D(4, 7)  # weight [7, 4]
        self.gptff = Conv1D(3, 4)  # weight [4, 3]
        self.conv = nn.Conv2d(3, 4, 3)
        self.convff = nn.Conv2d(4, 6, 3, groups=2)
        self.conv3 = nn.Conv3d(2, 3, 1)
        for conv1d in (self.gpt, self.gptff):  # Conv1D starts its bias at zero: a scaled one would not show
            nn.init.normal_(conv1d.bias)

    def forward(self, x, image, volume):
        y = self.gptff(self.gpt(self.sqff(self.sq(self.ff(self.lin(x))))))
        return y, self.convff(self.conv(image)), self.conv3(volume)


IA3_TARGETS = ["lin", "ff", "sq", "sqff", "gpt", "gptff", "conv", "convff", "conv3"]


def ia3_inputs():
    g = torch.Generator().manual_seed(4)
    return torch.randn(2, 6, generator=g), torch.randn(2, 3, 7, 7, generator=g), torch.randn(2, 2, 3, 3, 3, generator=g)


def ia3_trained(feedforward, seed=1, targets=IA3_TARGETS):
    from peft import IA3Config

    torch.manual_seed(0)
    base = IaNet()
    base_sd = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, IA3Config(target_modules=targets, feedforward_modules=feedforward))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ia3_l" in name:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
    return model.eval(), base_sd


# peft's rule for a list is a plain `endswith`: "ff" names sqff, gptff and convff too
@pytest.mark.parametrize("feedforward", [["ff", "conv3"], "(ff|gptff|conv3)"])
@pytest.mark.parametrize("chunk", [None, 5])
def test_ia3_folds_as_peft_merges_and_runs_as_peft_forward(cli, tmp_path, monkeypatch, feedforward, chunk):
    if chunk:
        monkeypatch.setattr("ckptsurgery.ops.adapters.fold.CHUNK", chunk)
    model, base_sd = ia3_trained(feedforward)
    model.save_pretrained(str(tmp_path / "ia3"))
    saved = load_file(tmp_path / "ia3" / "adapter_model.safetensors")
    assert sorted(saved) == sorted(f"{PREFIX}{t}.ia3_l" for t in IA3_TARGETS)
    with torch.no_grad():
        forward = model(*ia3_inputs())
        merged = {k: v.clone() for k, v in model.merge_and_unload().state_dict().items()}
    got, doc = fold(cli, tmp_path, base_sd, tmp_path / "ia3")
    assert_equal_within(got, merged)
    # an output module's bias is scaled too, a feed-forward one's not
    outputs = {"lin", "sq", "gpt", "conv"} | ({"sqff", "convff"} if isinstance(feedforward, str) else set())
    changed = {k for k in base_sd if not torch.equal(got[k], base_sd[k])}
    assert changed == {f"{t}.weight" for t in IA3_TARGETS} | {f"{t}.bias" for t in outputs if f"{t}.bias" in base_sd}
    assert doc["adapters"][0]["kinds"] == {"ia3": len(IA3_TARGETS)}
    assert_runs_as(IaNet(), got, ia3_inputs(), forward)


def test_lora_and_ia3_adapters_fold_in_order(cli, tmp_path):
    """A LoRA, then an IA3 on the same weights: (W + ΔW) ⊙ l — as two runs."""
    from peft import LoraConfig as Lora

    torch.manual_seed(0)
    lora = get_peft_model(IaNet(), Lora(r=2, lora_alpha=2, target_modules=["lin", "gpt"], init_lora_weights=False))
    lora.save_pretrained(str(tmp_path / "lora"))
    ia3, base_sd = ia3_trained(["ff"], targets=["lin", "ff", "gpt"])
    ia3.save_pretrained(str(tmp_path / "ia3"))
    both, doc = fold(cli, tmp_path, base_sd, tmp_path / "lora", tmp_path / "ia3")
    assert [a["kinds"] for a in doc["adapters"]] == [{"lora": 2}, {"ia3": 3}]
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    first, _ = fold(cli, tmp_path / "one", base_sd, tmp_path / "lora")
    second, _ = fold(cli, tmp_path / "two", first, tmp_path / "ia3")
    assert_equal_within(both, second)


# ---- IA3: hostile adapters -----------------------------------------------------------------------

def ia3_folder(folder, vector, **config):
    folder.mkdir(parents=True, exist_ok=True)
    doc = {"peft_type": "IA3", "target_modules": ["lin"], "feedforward_modules": [], **config}
    (folder / "adapter_config.json").write_text(json.dumps(doc))
    tensors = vector if isinstance(vector, dict) else {f"{PREFIX}lin.ia3_l": vector}
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder


@pytest.mark.parametrize("vector, config, fragments", [
    (torch.ones(1, 4), {}, ["ia3_l [1, 4]", "one floating value per output of the layer, shaped [4, 1]"]),
    (torch.ones(4, 1), {"feedforward_modules": ["lin"]}, ["ia3_l [4, 1]", "per input", "shaped [1, 4]"]),
    (torch.ones(5, 1), {}, ["ia3_l [5, 1]"]),
    (torch.tensor([[1.0], [float("nan")], [1.0], [1.0]]), {}, ["NaN or infinite"]),
    (torch.ones(4, 1, dtype=torch.int64), {}, ["int64"]),
    (torch.ones(4, 1), {"feedforward_modules": None}, ["feedforward_modules", "write it in"]),
    (torch.ones(4, 1), {"feedforward_modules": "(a+)+b"}, ["feedforward_modules", "not run"]),
    ({f"{PREFIX}lin.ia3_l": torch.ones(4, 1), f"{PREFIX}lin.lora_A.weight": torch.ones(2, 3)}, {},
     ["lin.lora_A.weight: a lora weight, which IA3 adapters"]),
    ({f"{PREFIX}lin.ia3_l": torch.ones(4, 1), f"{PREFIX}lin.ia3_l.default": torch.ones(4, 1)}, {},
     ["two ia3_l"]),
])
def test_ia3_vectors_that_do_not_fit_are_refused(cli, tmp_path, vector, config, fragments):
    save_file({"lin.weight": torch.randn(4, 3), "lin.bias": torch.zeros(4)}, str(tmp_path / "base.safetensors"))
    adapter = ia3_folder(tmp_path / "ia3", vector, **config)
    result = cli("merge", tmp_path / "base.safetensors", "--lora", adapter, "-o", tmp_path / "out.safetensors")
    assert_one_error_line(result, *fragments)
    assert not (tmp_path / "out.safetensors").exists()


def test_ia3_takes_no_scale_and_a_bias_that_does_not_fit_is_refused(cli, tmp_path):
    adapter = ia3_folder(tmp_path / "ia3", torch.full((4, 1), 2.0))
    save_file({"lin.weight": torch.ones(4, 3), "lin.bias": torch.zeros(4)}, str(tmp_path / "base.safetensors"))
    out = tmp_path / "out.safetensors"
    assert_one_error_line(cli("merge", tmp_path / "base.safetensors", "--lora", adapter, "--lora-scale", "0.5",
                              "-o", out), "--lora-scale 0.5", "IA3", code=2)
    save_file({"lin.weight": torch.ones(4, 3), "lin.bias": torch.zeros(2, 2)}, str(tmp_path / "odd.safetensors"))
    assert_one_error_line(cli("merge", tmp_path / "odd.safetensors", "--lora", adapter, "-o", out),
                          "lin.bias", "[2, 2]")
    assert not out.exists()
    save_file({"lin.weight": torch.ones(4, 3)}, str(tmp_path / "nobias.safetensors"))  # peft: no bias, none scaled
    assert cli("merge", tmp_path / "nobias.safetensors", "--lora", adapter, "-o", out).code == 0
    assert torch.equal(load_file(out)["lin.weight"], torch.full((4, 3), 2.0))


# ---- LoHa and LoKr ---------------------------------------------------------------------------

class ConvNet(nn.Module):
    """What peft's LoHa and LoKr adapt: nn.Linear, Conv2d (a 1×1 one too) and Conv1d, sized so that
    LoKr's factorisation is not trivial (out and in of 12, 8, 6, 4)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 12)
        self.sq = nn.Linear(12, 12, bias=False)
        self.conv = nn.Conv2d(4, 8, 3)
        self.point = nn.Conv2d(8, 6, 1)
        self.conv1 = nn.Conv1d(4, 6, 3)

    def forward(self, x, image, seq):
        return self.sq(self.lin(x)), self.point(self.conv(image)), self.conv1(seq)


CONV_TARGETS = ["lin", "sq", "conv", "point", "conv1"]


def conv_inputs():
    g = torch.Generator().manual_seed(5)
    return torch.randn(2, 8, generator=g), torch.randn(2, 4, 6, 6, generator=g), torch.randn(2, 4, 7, generator=g)


def lycoris_trained(config, seed=1):
    torch.manual_seed(0)
    base = ConvNet()
    base_sd = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "hada_" in name or "lokr_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval(), base_sd


def lycoris_configs():
    from peft import LoHaConfig, LoKrConfig

    return {
        "loha": LoHaConfig(r=2, alpha=3, target_modules=CONV_TARGETS),
        "loha-tucker": LoHaConfig(r=3, alpha=2, target_modules=CONV_TARGETS, use_effective_conv2d=True,
                                  rank_pattern={"lin": 4}, alpha_pattern={"conv1": 5}),
        "lokr": LoKrConfig(r=2, alpha=3, target_modules=CONV_TARGETS),  # w1 whole, w2 = w2_a·w2_b
        "lokr-both": LoKrConfig(r=1, alpha=2, target_modules=CONV_TARGETS, decompose_both=True, decompose_factor=2),
        "lokr-whole": LoKrConfig(r=8, alpha=4, target_modules=CONV_TARGETS),  # r large: w1 and w2 whole
        # not conv1: peft's own LoKr fails on a Conv1d's rank-1 core (torch.kron on a non-contiguous view)
        "lokr-tucker": LoKrConfig(r=1, alpha=1.5, target_modules=["lin", "sq", "conv", "point"],
                                  use_effective_conv2d=True),
    }


@pytest.mark.parametrize("name", ["loha", "loha-tucker", "lokr", "lokr-both", "lokr-whole", "lokr-tucker"])
@pytest.mark.parametrize("chunk", [None, 11])
def test_loha_and_lokr_fold_as_peft_merges_and_runs_as_peft_forward(cli, tmp_path, monkeypatch, name, chunk):
    if chunk:
        monkeypatch.setattr("ckptsurgery.ops.adapters.fold.CHUNK", chunk)
    config = lycoris_configs()[name]
    model, base_sd = lycoris_trained(config)
    model.save_pretrained(str(tmp_path / name))
    saved = load_file(tmp_path / name / "adapter_model.safetensors")
    if "tucker" in name:
        assert any(k.endswith(("hada_t1", "lokr_t2")) for k in saved)
    if name == "lokr-whole":
        assert any(k.endswith("conv1.lokr_w2") and saved[k].dim() == 3 for k in saved)
    with torch.no_grad():
        forward = model(*conv_inputs())
        merged = {k: v.clone() for k, v in model.merge_and_unload().state_dict().items()}
    got, doc = fold(cli, tmp_path, base_sd, tmp_path / name)
    assert_equal_within(got, merged)
    assert doc["adapters"][0]["kinds"] == {name.split("-")[0]: len(config.target_modules)}
    assert_runs_as(ConvNet(), got, conv_inputs(), forward)


def test_loha_scale_scales_the_delta_as_peft_does(cli, tmp_path):
    model, base_sd = lycoris_trained(lycoris_configs()["lokr"])
    model.save_pretrained(str(tmp_path / "lokr"))
    for module in model.modules():
        if hasattr(module, "scale_layer") and hasattr(module, "lokr_w1"):
            module.scale_layer(-0.5)
    merged = {k: v.clone() for k, v in model.merge_and_unload().state_dict().items()}
    got, _ = fold(cli, tmp_path, base_sd, tmp_path / "lokr", args=("--lora-scale", "-0.5"))
    assert_equal_within(got, merged)


def lycoris_folder(folder, peft_type, tensors, **config):
    folder.mkdir(parents=True, exist_ok=True)
    doc = {"peft_type": peft_type, "r": 2, "alpha": 2, "target_modules": ["lin"], **config}
    (folder / "adapter_config.json").write_text(json.dumps(doc))
    save_file({f"{PREFIX}{k}": v for k, v in tensors.items()}, str(folder / "adapter_model.safetensors"))
    return folder


LOHA_LIN = {"lin.hada_w1_a": torch.ones(4, 2), "lin.hada_w1_b": torch.ones(2, 3),
            "lin.hada_w2_a": torch.ones(4, 2), "lin.hada_w2_b": torch.ones(2, 3)}
LOKR_LIN = {"lin.lokr_w1": torch.ones(2, 1), "lin.lokr_w2_a": torch.ones(2, 2), "lin.lokr_w2_b": torch.ones(2, 3)}


@pytest.mark.parametrize("peft_type, tensors, config, fragments", [
    ("LOHA", {**LOHA_LIN, "lin.hada_w2_b": torch.ones(2, 4)}, {}, ["LoHa factors", "do not make the base's lin"]),
    ("LOHA", {k: v for k, v in LOHA_LIN.items() if "w2_b" not in k}, {}, ["without hada_w2_b"]),
    ("LOHA", {**LOHA_LIN, "lin.hada_t1": torch.ones(2, 2, 1, 1)}, {}, ["without hada_t2"]),
    ("LOHA", {**LOHA_LIN, "lin.hada_w3": torch.ones(2, 2)}, {}, ["w3 is not a factor of a loha module"]),
    ("LOHA", LOHA_LIN, {"r": 3}, ["hada_w1_b has rank 2", "r=3"]),
    ("LOHA", {**LOHA_LIN, "lin.lora_A.weight": torch.ones(2, 3)}, {}, ["a lora weight, which LOHA adapters"]),
    ("LOHA", {**LOHA_LIN, "lin.lokr_w1": torch.ones(2, 1)}, {}, ["lin.lokr_w1: a lokr weight, which LOHA"]),
    ("LOHA", {**LOHA_LIN, "lin.hada_w1_a": torch.ones(4, 2, dtype=torch.int32)}, {}, ["int32"]),
    ("LOKR", {**LOKR_LIN, "lin.lokr_w1": torch.ones(3, 1)}, {}, ["LoKr factors", "lin.weight [4, 3]"]),
    ("LOKR", {**LOKR_LIN, "lin.lokr_w1_a": torch.ones(2, 2)}, {}, ["its LoKr w1 is lokr_w1, lokr_w1_a"]),
    ("LOKR", {k: v for k, v in LOKR_LIN.items() if "w2_a" not in k}, {}, ["its LoKr w2 is lokr_w2_b"]),
    ("LOKR", LOKR_LIN, {"rank_pattern": {"lin": 5}}, ["lokr_w2_b has rank 2", "r=5"]),
    ("LOKR", LOKR_LIN, {"alpha": float("nan")}, ["alpha nan is not a positive number"]),
])
def test_loha_and_lokr_factors_that_do_not_fit_are_refused(cli, tmp_path, peft_type, tensors, config, fragments):
    save_file({"lin.weight": torch.randn(4, 3)}, str(tmp_path / "base.safetensors"))
    adapter = lycoris_folder(tmp_path / "adapter", peft_type, tensors, **config)
    result = cli("merge", tmp_path / "base.safetensors", "--lora", adapter, "-o", tmp_path / "out.safetensors")
    assert_one_error_line(result, *fragments)
    assert not (tmp_path / "out.safetensors").exists()


# ---- every kind: names that meet two modules, keys of another kind --------------------------------

@pytest.mark.parametrize("peft_type, factors", [
    ("LORA", {"lora_A.weight": (2, 3), "lora_B.weight": (4, 2), "lora_magnitude_vector": (4,)}),
    ("IA3", {"ia3_l": (4, 1)}),
    ("LOHA", {"hada_w1_a": (4, 2), "hada_w1_b": (2, 3), "hada_w2_a": (4, 2), "hada_w2_b": (2, 3)}),
    ("LOKR", {"lokr_w1": (2, 1), "lokr_w2_a": (2, 2), "lokr_w2_b": (2, 3)}),
])
def test_two_modules_of_one_adapter_on_one_weight_are_refused_for_every_kind(cli, tmp_path, peft_type, factors):
    """`lin` and `m.lin` both meet the base's `lin.weight` (the second with its prefix removed):
    folding both would fold twice."""
    folder = tmp_path / "adapter"
    folder.mkdir()
    config = {"peft_type": peft_type, "r": 2, "lora_alpha": 2, "alpha": 2, "target_modules": None,
              "use_dora": peft_type == "LORA", "feedforward_modules": []}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    save_file({f"{PREFIX}{m}.{f}": torch.ones(s) for m in ("lin", "m.lin") for f, s in factors.items()},
              str(folder / "adapter_model.safetensors"))
    save_file({"lin.weight": torch.randn(4, 3)}, str(tmp_path / "base.safetensors"))
    result = cli("merge", tmp_path / "base.safetensors", "--lora", folder, "-o", tmp_path / "out.safetensors")
    assert_one_error_line(result, "lin", "m.lin", "both fold into the base's lin.weight")
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("peft_type, key", [
    ("LORA", "lin.ia3_l"), ("LORA", "lin.hada_w1_a"), ("IA3", "lin.lokr_w1"), ("LORA", "lin.vera_lambda_b")])
def test_a_key_of_another_kind_is_refused_not_taken_for_a_whole_tensor(cli, tmp_path, peft_type, key):
    """With --allow-unmatched a whole tensor the base lacks is left out: a weight of another kind
    must not be — it is refused, naming it."""
    folder = tmp_path / "adapter"
    folder.mkdir()
    own = {"LORA": {"lin.lora_A.weight": torch.ones(2, 3), "lin.lora_B.weight": torch.ones(4, 2)},
           "IA3": {"lin.ia3_l": torch.ones(4, 1)}}[peft_type]
    config = {"peft_type": peft_type, "r": 2, "lora_alpha": 2, "target_modules": ["lin"], "feedforward_modules": []}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    tensors = {f"{PREFIX}{k}": v for k, v in {**own, key: torch.ones(2, 2)}.items()}
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    save_file({"lin.weight": torch.randn(4, 3)}, str(tmp_path / "base.safetensors"))
    result = cli("merge", tmp_path / "base.safetensors", "--lora", folder, "--allow-unmatched", "-o",
                 tmp_path / "out.safetensors")
    assert_one_error_line(result, key, f"which {peft_type} adapters")


# ---- streaming -------------------------------------------------------------------------------------

def test_a_folded_weight_is_made_a_chunk_at_a_time_and_each_chunk_once(tmp_path, monkeypatch):
    """A 1024 × 1280 weight folds in two chunks of whole rows (CHUNK = 2^20 elements); a recipe's
    merge reads it a method's chunk (2^18 elements) at a time, and each chunk is still made once."""
    import numpy as np

    from ckptsurgery.io import open_checkpoint
    from ckptsurgery.ops.adapters import fold_into, kind_lora, read_adapter
    from ckptsurgery.ops.merge.by_method import read_values

    rows, columns = 1024, 1280
    base = {"lin.weight": torch.randn(rows, columns)}
    save_file(base, str(tmp_path / "base.safetensors"))
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2,
                                                            "target_modules": ["lin"]}))
    a, b = torch.randn(2, columns), torch.randn(rows, 2)
    save_file({f"{PREFIX}lin.lora_A.weight": a, f"{PREFIX}lin.lora_B.weight": b},
              str(folder / "adapter_model.safetensors"))
    made = []
    for name in ("delta_rows", "delta_rows_numpy"):  # torch's, and numpy's (this fold's: plain float32 factors)
        monkeypatch.setattr(kind_lora, name, lambda m, layout, lo, hi, *rest, made_by=getattr(kind_lora, name):
                            made.append((lo, hi)) or made_by(m, layout, lo, hi, *rest))
    with open_checkpoint(str(tmp_path / "base.safetensors")) as ckpt, read_adapter(str(folder)) as adapter:
        folded, _ = fold_into(ckpt, [(adapter, 1.0)])
        read = read_values(folded["lin.weight"], "float32")
        span = 1 << 18
        values = [read(start, min(span, rows * columns - start)) for start in range(0, rows * columns, span)]
    assert made == [(0, 819), (819, 1024)]  # 819 rows of 1280: the most whole rows in 2^20 elements
    got = torch.from_numpy(np.concatenate(values)).view(rows, columns)
    torch.testing.assert_close(got, base["lin.weight"] + b @ a, rtol=1e-5, atol=1e-5)
