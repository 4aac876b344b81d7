"""diffusers-format LoRA files (no adapter_config.json): `unet.`/`text_encoder.` + module +
`.lora_A.weight`/`.lora_B.weight`, the older `.lora.down.weight` and attention processors'
`to_q_lora.down.weight`, with or without `.alpha` or diffusers' `lora_adapter_metadata` —
folded by `merge BASE --lora FILE` equal, within 1e-5 relative on float32, to diffusers' own
loader (a pipeline's `lora_state_dict` + `load_lora_into_unet` on a tiny seeded
UNet2DConditionModel, its forward pass); hostile
files refused in one line, nothing written."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import assert_one_error_line

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

from diffusers import UNet2DConditionModel  # noqa: E402
from diffusers.loaders import StableDiffusionLoraLoaderMixin  # noqa: E402
from peft import LoraConfig  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1"]


def unet():
    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=8,
                                attention_head_dim=2, norm_num_groups=4).eval()


def inputs():
    g = torch.Generator().manual_seed(2)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([3, 7]), torch.randn(2, 5, 8, generator=g)


def trained(r=2, alpha=3):
    """(the base's state dict, the adapter's state dict as diffusers saves it, its LoraConfig)."""
    model = unet()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=TARGETS, init_lora_weights=False)
    model.add_adapter(config)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return base, {f"unet.{k}": v.contiguous() for k, v in get_peft_model_state_dict(model).items()}, config


def diffusers_forward(path):
    """The UNet as a pipeline's load_lora_weights leaves it: lora_state_dict, then load_lora_into_unet."""
    model = unet()
    state_dict, alphas, metadata = StableDiffusionLoraLoaderMixin.lora_state_dict(str(path), return_lora_metadata=True)
    StableDiffusionLoraLoaderMixin.load_lora_into_unet(state_dict, alphas, model, metadata=metadata)
    with torch.no_grad():
        return model(*inputs()).sample


def fold(cli, tmp_path, base, adapter, *args):
    """(the folded UNet's output, the report, the folded weights)."""
    save_file(base, tmp_path / "base.safetensors")
    out = tmp_path / "out.safetensors"
    result = cli("merge", tmp_path / "base.safetensors", "--lora", adapter, *args, "-o", out, "--json", "--force")
    assert result.code == 0, result.err
    model = unet()
    weights = load_file(out)
    model.load_state_dict(weights)
    with torch.no_grad():
        return model(*inputs()).sample, result.json(), weights


def assert_close(ours, theirs):
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5 * theirs.abs().max().item())


def old_names(sd: dict) -> dict:
    """The layout of diffusers' attention processors and LoRACompatible layers (before 0.22)."""
    out = {}
    for k, v in sd.items():
        for leaf in ("to_q", "to_k", "to_v", "to_out.0"):
            if f".{leaf}.lora_" in k:
                head, tail = k.split(f".{leaf}.lora_")
                k = f"{head}.processor.{leaf.removesuffix('.0')}_lora.{'down' if tail[0] == 'A' else 'up'}.weight"
                break
        else:
            k = k.replace(".lora_A.weight", ".lora.down.weight").replace(".lora_B.weight", ".lora.up.weight")
        out[k] = v
    return out


@pytest.mark.parametrize("layout", ["metadata", "plain", "old"])
def test_fold_equals_diffusers_load_lora_adapter(cli, tmp_path, layout):
    """metadata: saved by diffusers' save_lora_weights with its LoraConfig (α = 3, r = 2: scale
    1.5); plain: the same keys without it (diffusers takes α = r: scale 1); old: the older key
    layout, which diffusers' loader maps as we do."""
    base, sd, config = trained()
    if layout == "metadata":
        StableDiffusionLoraLoaderMixin.save_lora_weights(str(tmp_path / "lora"), unet_lora_layers=
                                                         {k.removeprefix("unet."): v for k, v in sd.items()},
                                                         unet_lora_adapter_metadata=config.to_dict())
        path = tmp_path / "lora" / "pytorch_lora_weights.safetensors"
    else:
        path = tmp_path / "lora.safetensors"
        save_file(old_names(sd) if layout == "old" else sd, str(path))
    ours, doc, weights = fold(cli, tmp_path, base, path)
    assert doc["adapters"][0]["format"] == "diffusers" and doc["adapters"][0]["prefix"]["removed"] == "unet."
    assert doc["adapters"][0]["folded"] == len(sd) // 2
    assert_close(ours, diffusers_forward(path))
    if layout == "plain":  # diffusers' scale without alphas is 1, not the training config's 1.5
        with_metadata = tmp_path / "m"
        StableDiffusionLoraLoaderMixin.save_lora_weights(str(with_metadata), unet_lora_layers=
                                                         {k.removeprefix("unet."): v for k, v in sd.items()},
                                                         unet_lora_adapter_metadata=config.to_dict())
        _, _, scaled = fold(cli, tmp_path, base, with_metadata / "pytorch_lora_weights.safetensors")
        for k in base:
            assert_close(scaled[k] - base[k], 1.5 * (weights[k] - base[k]))


def test_alpha_tensors_scale_by_alpha_over_rank(cli, tmp_path):
    """`<module>.alpha` beside its factors (kohya-trained files in diffusers' layout, as Flux's
    and the other transformer loaders of diffusers take them): W + (α/r)·B·A."""
    base, sd, _ = trained()
    with_alpha = dict(sd)
    modules = {k.rsplit(".lora_", 1)[0] for k in sd}
    alphas = {m: float(i % 3 + 1) for i, m in enumerate(sorted(modules))}
    with_alpha.update({f"{m}.alpha": torch.tensor(a) for m, a in alphas.items()})
    save_file(with_alpha, tmp_path / "alpha.safetensors")
    save_file(base, tmp_path / "base.safetensors")
    result = cli("merge", tmp_path / "base.safetensors", "--lora", tmp_path / "alpha.safetensors",
                 "-o", tmp_path / "out.safetensors")
    assert result.code == 0, result.err
    got = load_file(tmp_path / "out.safetensors")
    for m, a in alphas.items():
        key = m.removeprefix("unet.") + ".weight"
        down, up = sd[f"{m}.lora_A.weight"], sd[f"{m}.lora_B.weight"]
        want = base[key] + a / down.shape[0] * (up.flatten(1) @ down.flatten(1)).reshape(base[key].shape)
        torch.testing.assert_close(got[key], want, rtol=1e-5, atol=1e-6)


# ---- hostile files ---------------------------------------------------------------------------------

def small_base(tmp_path):
    path = tmp_path / "base.safetensors"
    save_file({"lin.weight": torch.ones(4, 6), "x.unet.to_q.weight": torch.ones(4, 6), "to_q.weight": torch.ones(4, 6)},
              str(path))
    return path


PAIR = {"unet.lin.lora_A.weight": torch.ones(2, 6), "unet.lin.lora_B.weight": torch.ones(4, 2)}


@pytest.mark.parametrize("tensors, fragments", [
    ({**PAIR, "unet.lin.lora_B.weight": torch.ones(4, 3)}, ["unet.lin", "lora_B [4, 3] does not follow"]),
    ({**PAIR, "unet.lin.lora_A.weight": torch.ones(2, 5)}, ["unet.lin", "lin.weight [4, 6]"]),
    ({**PAIR, "unet.lin.alpha": torch.tensor(float("nan"))}, ["unet.lin.alpha", "not a finite number"]),
    ({**PAIR, "unet.lin.alpha": torch.tensor(-2.0)}, ["unet.lin.alpha", "positive"]),
    ({"unet.lin.lora_A.weight": torch.ones(2, 6)}, ["unet.lin", "lora_B"]),
    ({**PAIR, "unet.lin.lora.down.weight": torch.ones(2, 6)}, ["unet.lin", "two A weights"]),
    ({**PAIR, "unet.lin.lora_magnitude_vector": torch.ones(4)}, ["lora_magnitude_vector", "not supported"]),
    ({"unet.to_q.lora_A.weight": torch.ones(2, 6), "unet.to_q.lora_B.weight": torch.ones(4, 2)},
     ["unet.to_q", "x.unet.to_q.weight", "to_q.weight"]),  # a name two of the base's could be
])
def test_hostile_diffusers_files_are_refused_in_one_line(cli, tmp_path, tensors, fragments):
    adapter = tmp_path / "bad.safetensors"
    save_file(tensors, str(adapter))
    result = cli("merge", small_base(tmp_path), "--lora", adapter, "-o", tmp_path / "out.safetensors")
    assert_one_error_line(result, *fragments)
    assert not (tmp_path / "out.safetensors").exists()


def test_metadata_that_is_not_json_is_refused(cli, tmp_path):
    adapter = tmp_path / "meta.safetensors"
    save_file(PAIR, str(adapter), metadata={"lora_adapter_metadata": "{not json"})
    result = cli("merge", small_base(tmp_path), "--lora", adapter, "-o", tmp_path / "out.safetensors")
    assert_one_error_line(result, "lora_adapter_metadata", "not readable JSON")


def test_the_lora_group_refuses_a_diffusers_file_in_one_line(cli, tmp_path):
    adapter = tmp_path / "d.safetensors"
    save_file(PAIR, str(adapter))
    result = cli("lora", "resize", adapter, "--rank", "1", "-o", tmp_path / "r.safetensors")
    assert_one_error_line(result, "diffusers", "merge --lora")
