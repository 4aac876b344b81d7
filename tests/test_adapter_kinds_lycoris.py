"""LyCORIS / kohya single-file adapters — LoHa, LoKr, LoCon (with its Tucker `lora_mid`), full
(`diff`, `diff_b`) and `dora_scale` on them — folded by `merge BASE --lora FILE` equal to
lycoris-lora's own forward pass within 1e-5 relative on float32: its modules made by
`create_lycoris` on tiny seeded Linear, Conv2d and Conv1d layers, their weights given values,
saved by the network's own `save_weights` (`lycoris_…` keys) and as kohya names them
(`lora_unet_…`). The forward pass is the reference: lycoris-lora's `merge_to` scales a LoHa's and
a LoKr's ΔW by α/r twice (checked below). Hostile files refused in one line, nothing written."""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from conftest import assert_one_error_line

lycoris = pytest.importorskip("lycoris")

from lycoris import create_lycoris  # noqa: E402

logging.getLogger("LyCORIS").setLevel(logging.ERROR)


class Net(nn.Module):
    """Layers LyCORIS adapts, large enough that LoKr decomposes its factors: a Linear of 64
    inputs (8 × 8), a Conv2d of 16 → 32 channels, a Conv1d and a small Linear (LoKr: whole)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(64, 32)
        self.conv = nn.Conv2d(16, 32, 3)
        self.conv1 = nn.Conv1d(8, 12, 3)
        self.small = nn.Linear(6, 4)

    def forward(self, x, image, seq, y):
        return self.lin(x), self.conv(image), self.conv1(seq), self.small(y)


def inputs():
    g = torch.Generator().manual_seed(5)
    return (torch.randn(3, 64, generator=g), torch.randn(2, 16, 6, 6, generator=g), torch.randn(2, 8, 7, generator=g),
            torch.randn(3, 6, generator=g))


CASES = {
    "loha": dict(algo="loha"),
    "loha-tucker": dict(algo="loha", use_tucker=True),
    "lokr": dict(algo="lokr"),  # w2 decomposed on the large layers, whole on the small
    "lokr-both": dict(algo="lokr", decompose_both=True, linear_dim=1, conv_dim=1),
    "lokr-tucker": dict(algo="lokr", use_tucker=True),
    "lokr-whole": dict(algo="lokr", full_matrix=True),  # neither side decomposed: scale 1, whatever α
    "locon": dict(algo="locon"),
    "locon-tucker": dict(algo="locon", use_tucker=True),
    "full": dict(algo="full"),
    "loha-dora": dict(algo="loha", dora_wd=True),
    "lokr-dora-on-input": dict(algo="lokr", dora_wd=True, wd_on_output=False),
    "locon-tucker-dora": dict(algo="locon", use_tucker=True, dora_wd=True),
    "locon-dora-on-input": dict(algo="locon", dora_wd=True, wd_on_output=False),
}


def trained(case: str, seed=1, multiplier=1.0, dim=2, alpha=3.0):
    """(the base's state dict, the network applied to a Net, the network): LyCORIS's modules with
    every weight given values (LyCORIS starts one factor at zero, which would fold to W)."""
    kwargs = dict(CASES[case])
    algo = kwargs.pop("algo")
    torch.manual_seed(0)
    net = Net()
    base_sd = {k: v.clone() for k, v in net.state_dict().items()}
    kwargs.setdefault("linear_dim", dim)
    kwargs.setdefault("conv_dim", dim)
    network = create_lycoris(net, multiplier, linear_alpha=alpha, conv_alpha=alpha, algo=algo, **kwargs)
    network.apply_to()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in network.named_parameters():
            if "dora_scale" in name:
                p.mul_(1 + 0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith((".weight", ".bias")) and algo == "full":
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return base_sd, net.eval(), network


def fold(cli, tmp_path, base_sd, adapter, *args):
    save_file(base_sd, tmp_path / "base.safetensors")
    out = tmp_path / "out.safetensors"
    result = cli("merge", tmp_path / "base.safetensors", "--lora", adapter, *args, "-o", out, "--json")
    assert result.code == 0, result.err
    return load_file(out), result.json()


def assert_forward_equal(got: dict, want):
    net = Net()
    net.load_state_dict(got)
    with torch.no_grad():
        for ours, theirs in zip(net(*inputs()), want):
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5 * theirs.abs().max().item())


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("multiplier", [1.0, 0.5])
def test_fold_equals_lycoris_forward(cli, tmp_path, case, multiplier):
    """α = 3, r = 2 (α ≠ r); --lora-scale is LyCORIS's multiplier."""
    base_sd, net, network = trained(case, multiplier=multiplier)
    network.save_weights(str(tmp_path / "adapter.safetensors"), None, None)
    saved = load_file(tmp_path / "adapter.safetensors")
    assert all(k.startswith(("lycoris_lin.", "lycoris_conv.", "lycoris_conv1.", "lycoris_small.")) for k in saved)
    with torch.no_grad():
        forward = net(*inputs())
    got, doc = fold(cli, tmp_path, base_sd, tmp_path / "adapter.safetensors", "--lora-scale", str(multiplier))
    assert doc["adapters"][0]["format"] == "kohya" and doc["adapters"][0]["folded"] == (8 if case == "full" else 4)
    kind = {"locon": "dora" if "dora" in case else "lora"}.get(case.split("-")[0], case.split("-")[0])
    assert doc["adapters"][0]["kinds"] == {kind: 4}
    assert_forward_equal(got, forward)


@pytest.mark.parametrize("chunk", [11, 300])
def test_chunks_and_kohya_names(cli, tmp_path, monkeypatch, chunk):
    """A few elements at a time (per-input norms measured over every chunk first; a LoKr's rows
    each from their own rows of w1 and w2), and the same file under kohya's `lora_unet_` names
    in a checkpoint whose keys have a prefix."""
    monkeypatch.setattr("ckptsurgery.ops.adapters.fold.CHUNK", chunk)
    for case in ("lokr-dora-on-input", "loha-tucker", "locon-dora-on-input"):
        base_sd, net, network = trained(case)
        sd = {k.replace("lycoris_", "lora_unet_", 1): v.contiguous() for k, v in network.state_dict().items()}
        save_file(sd, tmp_path / f"{case}.safetensors")
        with torch.no_grad():
            forward = net(*inputs())
        prefixed = {f"model.diffusion_model.{k}": v for k, v in base_sd.items()}
        got, _ = fold(cli, tmp_path, prefixed, tmp_path / f"{case}.safetensors", "--force")
        assert_forward_equal({k.removeprefix("model.diffusion_model."): v for k, v in got.items()}, forward)


@pytest.mark.parametrize("case", ["loha", "lokr"])
def test_lycoris_merge_to_scales_twice_where_its_forward_scales_once(case):
    """lycoris-lora 4.1.3: a LoHa's or LoKr's get_weight already holds α/r and get_diff_weight
    (merge_to's) multiplies by it again; its forward multiplies once. With α = r both agree."""
    for alpha, agree in ((3.0, False), (2.0, True)):
        base_sd, net, network = trained(case, alpha=alpha)
        with torch.no_grad():
            forward = net(*inputs())
            network.merge_to(1.0)
            network.restore()
            merged = net(*inputs())
        same = all(torch.allclose(a, b, rtol=1e-5, atol=1e-5) for a, b in zip(forward, merged))
        assert same == agree, (case, alpha)


# ---- hostile files ---------------------------------------------------------------------------------

def base_file(tmp_path):
    path = tmp_path / "base.safetensors"
    save_file({"lin.weight": torch.ones(4, 6), "lin.bias": torch.zeros(4), "fc.weight": torch.ones(4, 6)}, str(path))
    return path


LOHA = {"hada_w1_a": torch.ones(4, 2), "hada_w1_b": torch.ones(2, 6), "hada_w2_a": torch.ones(4, 2),
        "hada_w2_b": torch.ones(2, 6), "alpha": torch.tensor(2.0)}


@pytest.mark.parametrize("parts, fragments", [
    ({**LOHA, "hada_w2_b": torch.ones(2, 5)}, ["lycoris_lin", "do not make the base's lin.weight [4, 6]"]),
    ({**LOHA, "alpha": torch.tensor(float("nan"))}, ["lycoris_lin.alpha", "not a finite number"]),
    ({**LOHA, "dora_scale": torch.ones(6, 1)}, ["dora_scale [6, 1]", "[4, 1] or [1, 6]"]),
    ({**LOHA, "dora_scale": torch.tensor([[1.0], [float("inf")], [1.0], [1.0]])}, ["dora_scale", "NaN or infinite"]),
    ({**LOHA, "lokr_w1": torch.ones(2, 2)}, ["several kinds", "loha", "lokr"]),
    ({"lokr_w1": torch.ones(2, 3), "lokr_w2_a": torch.ones(2, 1), "lokr_w2_b": torch.ones(1, 2),
      "lokr_w1_b": torch.ones(1, 3)}, ["LoKr w1"]),
    ({"lokr_w1_a": torch.ones(2, 1), "lokr_w1_b": torch.ones(1, 3), "lokr_w2_a": torch.ones(2, 2),
      "lokr_w2_b": torch.ones(2, 2)}, ["not one rank"]),
    ({"lora_down.weight": torch.ones(2, 6), "lora_up.weight": torch.ones(4, 2),
      "lora_mid.weight": torch.ones(2, 2, 3, 3)}, ["lora_mid [2, 2, 3, 3]", "lin.weight [4, 6]"]),
    ({"diff": torch.ones(4, 6), "diff_b": torch.ones(5)}, ["diff_b [5]", "lin.bias [4]"]),
    ({"diff": torch.ones(4, 6), "alpha": torch.tensor(1.0)}, ["alpha beside diff"]),
    ({"oft_blocks": torch.ones(2, 2, 2)}, ["lycoris_lin.oft_blocks", "not supported"]),
    ({"alpha": torch.tensor(1.0)}, ["no factors"]),
])
def test_hostile_lycoris_modules_are_refused_in_one_line(cli, tmp_path, parts, fragments):
    adapter = tmp_path / "bad.safetensors"
    save_file({f"lycoris_lin.{k}": v for k, v in parts.items()}, str(adapter))
    result = cli("merge", base_file(tmp_path), "--lora", adapter, "-o", tmp_path / "out.safetensors")
    assert_one_error_line(result, *fragments)
    assert not (tmp_path / "out.safetensors").exists()


def test_a_huge_lokr_product_from_a_tiny_file_is_refused_before_any_work(cli, tmp_path):
    """w1 [4096, 4096] ⊗ w2 of 1×1 factors would be 16 M rows × ...: the product must be the base
    weight's shape, checked from the shapes alone; and a LoKr's chunk of rows is made from those
    rows of each side, never the whole side."""
    adapter = tmp_path / "kron.safetensors"
    save_file({"lycoris_lin.lokr_w1_a": torch.ones(65536, 1), "lycoris_lin.lokr_w1_b": torch.ones(1, 65536),
               "lycoris_lin.lokr_w2": torch.ones(1, 1)}, str(adapter))
    result = cli("merge", base_file(tmp_path), "--lora", adapter, "-o", tmp_path / "out.safetensors")
    assert_one_error_line(result, "do not make the base's lin.weight [4, 6]")


def test_names_matching_two_modules_are_refused(cli, tmp_path):
    base = tmp_path / "base.safetensors"
    save_file({"a.lin.weight": torch.ones(4, 6), "b.lin.weight": torch.ones(4, 6)}, str(base))
    adapter = tmp_path / "two.safetensors"
    save_file({f"lycoris_lin.{k}": v for k, v in LOHA.items()}, str(adapter))
    result = cli("merge", base, "--lora", adapter, "-o", tmp_path / "out.safetensors")
    assert_one_error_line(result, "lycoris_lin", "a.lin", "b.lin")


@pytest.mark.parametrize("case", ["loha", "loha-dora", "lokr", "lokr-whole", "locon-tucker-dora", "full"])
def test_a_float16_file_folds_as_lycoris_loads_it(cli, tmp_path, case):
    """A file saved in float16 (save_weights' dtype) and read back by LyCORIS's own loader
    (create_lycoris_from_weights, into a float32 model): its forward is our fold's."""
    from lycoris import create_lycoris_from_weights

    base_sd, _, network = trained(case)
    path = tmp_path / "half.safetensors"
    network.save_weights(str(path), torch.float16, None)
    assert {v.dtype for v in load_file(path).values()} == {torch.float16}
    torch.manual_seed(0)
    net = Net()
    loaded, _ = create_lycoris_from_weights(1.0, str(path), net)
    loaded.apply_to()
    with torch.no_grad():
        forward = net.eval()(*inputs())
    got, _ = fold(cli, tmp_path, base_sd, path)
    assert_forward_equal(got, forward)
