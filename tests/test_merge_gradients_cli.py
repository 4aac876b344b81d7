"""merge --method with a gradient over the layers (`--t 0,0.5,1`), through the real entry point:
the same tensors as the equivalent recipe (which test_recipe_merge*.py holds to mergekit's own
output), a value per layer worked out by hand, the refusals (one line each), and the report."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import assert_one_error_line

LAYERS = 5


def llama_shaped(seed: int, stack: str = "model.layers") -> dict[str, torch.Tensor]:
    """A tiny state dict named as a Llama's: embeddings, LAYERS layers, final norm and head."""
    g = torch.Generator().manual_seed(seed)
    layers = {f"{stack}.{i}.{name}": torch.randn(shape, generator=g) for i in range(LAYERS)
              for name, shape in (("self_attn.q_proj.weight", (8, 8)), ("mlp.up_proj.weight", (12, 8)),
                                  ("input_layernorm.weight", (8,)))}
    return {"model.embed_tokens.weight": torch.randn(16, 8, generator=g), **layers,
            "model.norm.weight": torch.randn(8, generator=g), "lm_head.weight": torch.randn(16, 8, generator=g)}


@pytest.fixture
def models(tmp_path):
    paths = []
    for seed in range(2):
        save_file(llama_shaped(seed), tmp_path / f"m{seed}.safetensors")
        paths.append(tmp_path / f"m{seed}.safetensors")
    return paths


def test_a_slerp_gradient_writes_what_the_same_recipe_writes(cli, tmp_path, models):
    a, b = models
    (tmp_path / "slerp.yml").write_text(f"models:\n  - model: {a}\n  - model: {b}\nmerge_method: slerp\n"
                                        f"base_model: {a}\nparameters:\n  t: [0, 0.3, 1]\n")
    by_recipe = cli("merge", "--config", tmp_path / "slerp.yml", "-o", tmp_path / "recipe.safetensors")
    by_method = cli("merge", a, b, "--method", "slerp", "--t", "0,0.3,1", "-o", tmp_path / "method.safetensors")
    assert by_recipe.code == 0 and by_method.code == 0, (by_recipe.err, by_method.err)
    ours, recipe = load_file(tmp_path / "method.safetensors"), load_file(tmp_path / "recipe.safetensors")
    assert list(ours) == list(recipe)
    assert all(torch.equal(ours[k], recipe[k]) for k in ours), [k for k in ours if not torch.equal(ours[k], recipe[k])]
    # the gradient did something: the first layer is the first model's, the last the second's
    first, last = load_file(a), load_file(b)
    assert torch.equal(ours["model.layers.0.mlp.up_proj.weight"], first["model.layers.0.mlp.up_proj.weight"])
    assert torch.allclose(ours["model.layers.4.mlp.up_proj.weight"], last["model.layers.4.mlp.up_proj.weight"])
    assert "merged 18 tensors by slerp (t 0 → 0.3 → 1 over 5 layers)" in by_method.err


def test_each_layer_takes_its_value_of_the_gradient(cli, tmp_path, models):
    """passthrough, λ·θ: --scale 0,1,3 over layers 0..4 is t = i/4 read at t·2 of [0, 1, 3] —
    0, 0.5, 1, 2, 3; keys outside the layers take t = 0: λ = 0."""
    out = tmp_path / "scaled.safetensors"
    assert cli("merge", models[0], "--method", "passthrough", "--scale", "0,1,3", "-o", out).code == 0
    given, got = load_file(models[0]), load_file(out)
    for key, value in given.items():
        layer = int(key.split(".")[2]) if key.startswith("model.layers.") else None
        scale = 0.0 if layer is None else [0.0, 0.5, 1.0, 2.0, 3.0][layer]
        assert torch.equal(got[key], value * scale), key


def test_the_report_shows_the_gradient_as_given(cli, tmp_path, models):
    report = cli("merge", *models, "--method", "slerp", "--t", "0,0.3,1", "-o", tmp_path / "o.safetensors",
                 "--json").json()
    assert report["parameters"] == {"t": [0, 0.3, 1]} and report["layers"] == LAYERS and report["merged"] == 18
    single = cli("merge", *models, "--method", "slerp", "--t", "0.3", "-o", tmp_path / "o.safetensors", "--force",
                 "--json").json()
    assert single["parameters"] == {"t": 0.3} and single["layers"] == 0


def test_a_dry_run_says_what_it_would_merge_and_writes_nothing(cli, tmp_path, models):
    result = cli("merge", *models, "--method", "slerp", "--t", "0,1", "-o", tmp_path / "o.safetensors", "--dry-run")
    assert result.code == 0 and not (tmp_path / "o.safetensors").exists()
    assert "merged 18 tensors by slerp (t 0 → 1 over 5 layers)" in result.out  # a dry run reports on stdout


def test_layer_pattern_names_the_layers_of_a_model_with_two_stacks(cli, tmp_path):
    """Two stacks of as many layers: which are the layers is ambiguous until --layer-pattern says."""
    paths = []
    for seed in range(2):
        two = {**llama_shaped(seed, "encoder.block"), **llama_shaped(seed + 10, "decoder.block")}
        save_file(two, tmp_path / f"t{seed}.safetensors")
        paths.append(tmp_path / f"t{seed}.safetensors")
    args = ["merge", *paths, "--method", "slerp", "--t", "0,1", "-o", tmp_path / "o.safetensors"]
    assert_one_error_line(cli(*args), "ambiguous", "--layer-pattern", code=2)
    report = cli(*args, "--layer-pattern", r"decoder\.block\.(\d+)\.", "--json").json()
    assert report["layers"] == LAYERS and report["parameters"] == {"t": [0, 1]}


@pytest.mark.parametrize("args, message", [
    (["--method", "dare-ties", "--base", "{a}", "--seed", "0,1"], "--seed '0,1': takes one whole number"),
    (["--method", "karcher", "--max-iter", "3,4"], "--max-iter '3,4': takes one whole number"),
    (["--method", "ties", "--base", "{a}", "--weights", "[1,0],[0,1]"], "a gradient over the layers per model needs a "
                                                                        "recipe (merge --config RECIPE.yml)"),
    (["--method", "ties", "--base", "{a}", "--density", "[0.5,1],[1,1]"], "needs a recipe"),
    (["--method", "slerp", "--t", "0.5", "--layer-pattern", r"layers\.(\d+)\."],
     "--layer-pattern goes with a gradient (--t 0,0.5,1) or --config"),
    (["--method", "slerp", "--t", "0,1.5,1"], "--t '0,1.5,1': every value must be in [0, 1] ('1.5' is not)"),
    (["--method", "slerp", "--t", "0.5,"], "--t '0.5,': a gradient over the layers is 2 or more numbers"),
])
def test_what_takes_no_gradient_is_refused_in_one_line(cli, tmp_path, models, args, message):
    args = [str(models[0]) if a == "{a}" else a for a in args]
    assert_one_error_line(cli("merge", *models, *args, "-o", tmp_path / "o.safetensors"), message, code=2)
    assert not (tmp_path / "o.safetensors").exists()


def test_a_flag_takes_no_gradient_either(tmp_path, models):
    """A flag has no comma list on the command line; the library refuses a list for it."""
    from ckptsurgery.errors import UsageError
    from ckptsurgery.ops import WriteOptions, merge_checkpoints

    with pytest.raises(UsageError, match=r"^--normalize \[True, False\]: takes true or false for every tensor"):
        merge_checkpoints([str(models[1])], WriteOptions(str(tmp_path / "o.safetensors")), method="ties",
                          base=str(models[0]), normalize=[True, False])


def test_a_gradient_needs_layers(cli, tmp_path):
    for seed in range(2):
        save_file({"embed.weight": torch.randn(4, 2), "head.weight": torch.randn(4, 2)}, tmp_path / f"f{seed}.safetensors")
    result = cli("merge", tmp_path / "f0.safetensors", tmp_path / "f1.safetensors", "--method", "slerp", "--t", "0,1",
                 "-o", tmp_path / "o.safetensors")
    assert_one_error_line(result, "no layers found", "--layer-pattern", code=2)
