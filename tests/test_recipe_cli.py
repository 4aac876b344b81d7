"""merge --config RECIPE through the real entry point: the mode, its refusals, --dry-run's plan on
stdout, the summary. The recipes' math and folders are held to mergekit in test_recipe_merge*.py."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import assert_one_error_line


@pytest.fixture
def models(tmp_path):
    """Two tiny two-layer 'models' (any state dict: no config.json, no architecture)."""
    paths = []
    for i in range(2):
        g = torch.Generator().manual_seed(i)
        sd = {"embed.weight": torch.randn(6, 4, generator=g),
              **{f"layers.{n}.w": torch.randn(4, 4, generator=g) for n in range(2)},
              "head.weight": torch.randn(6, 4, generator=g)}
        save_file(sd, tmp_path / f"m{i}.safetensors")
        paths.append(tmp_path / f"m{i}.safetensors")
    return paths


def recipe(tmp_path, text: str):
    path = tmp_path / "recipe.yml"
    path.write_text(text)
    return path


LINEAR = """
merge_method: linear
models:
  - model: {a}
    parameters: {{weight: 1.0}}
  - model: {b}
    parameters: {{weight: 3.0}}
"""


def test_a_recipe_writes_the_weighted_mean_and_its_folder(cli, tmp_path, models):
    config = recipe(tmp_path, LINEAR.format(a=models[0], b=models[1]))
    result = cli("merge", "--config", config, "-o", tmp_path / "out")
    assert result.code == 0, result.err
    a, b = load_file(models[0]), load_file(models[1])
    got = load_file(tmp_path / "out" / "model.safetensors")
    assert set(got) == set(a) and all(torch.allclose(got[k], (a[k] + 3 * b[k]) / 4, atol=1e-6) for k in a)
    assert (tmp_path / "out" / "ckptsurgery_recipe.yml").read_text() == config.read_text()
    assert "merged 4 tensors" in result.err and "linear" in result.err


def test_the_report_names_the_recipe_mode(cli, tmp_path, models):
    config = recipe(tmp_path, LINEAR.format(a=models[0], b=models[1]))
    report = cli("merge", "--config", config, "-o", tmp_path / "w.safetensors", "--json").json()
    assert report["mode"] == "recipe" and report["merge_method"] == "linear" and report["merged"] == 4


def test_the_dry_run_prints_the_plan_on_stdout_and_writes_nothing(cli, tmp_path, models):
    config = recipe(tmp_path, LINEAR.format(a=models[0], b=models[1]))
    result = cli("merge", "--config", config, "-o", tmp_path / "out", "--dry-run")
    assert result.code == 0 and not (tmp_path / "out").exists()
    lines = result.out.splitlines()
    assert all("<- linear(" in line for line in lines[:4]) and "<-" not in "".join(lines[4:]), lines


@pytest.mark.parametrize("extra, message", [
    (["{a}"], "--config takes the models from the recipe: give no SOURCE"),
    (["--method", "ties"], "--config does not combine with --method"),
    (["--dtype", "bf16"], "--config does not combine with --dtype"),
    (["--root", "model"], "give no --root"),
])
def test_options_a_recipe_decides_are_refused(cli, tmp_path, models, extra, message):
    config = recipe(tmp_path, LINEAR.format(a=models[0], b=models[1]))
    args = [str(models[0]) if e == "{a}" else e for e in extra]
    assert_one_error_line(cli("merge", *args, "--config", config, "-o", tmp_path / "o"), message, code=2)


def test_a_parameter_the_method_does_not_take_exits_2(cli, tmp_path, models):
    config = recipe(tmp_path, LINEAR.format(a=models[0], b=models[1]).replace("{weight: 3.0}",
                                                                                "{weight: 3.0, density: 0.5}"))
    assert_one_error_line(cli("merge", "--config", config, "-o", tmp_path / "o"), "density", code=2)


def test_a_model_that_does_not_exist_exits_1(cli, tmp_path, models):
    config = recipe(tmp_path, LINEAR.format(a=models[0], b=tmp_path / "missing"))
    assert_one_error_line(cli("merge", "--config", config, "-o", tmp_path / "o"), "missing")


def test_a_layer_pattern_without_a_recipe_is_refused(cli, tmp_path, models):
    assert_one_error_line(cli("merge", *map(str, models), "--layer-pattern", r"layers\.(\d+)", "-o", tmp_path / "o"),
                          "--layer-pattern applies to --method (or --average) or --config only", code=2)
