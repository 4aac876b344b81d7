"""Hostile inputs to the surfaces added with recipes, CLI gradients, diff --by-layer, the adapter
kinds and the lora group: each a small file built here that once made the tool expand a YAML
bomb, spend time as the product of two sizes, or fall through to the catch-all line. Each is
refused in one line (or read), quickly, with nothing written."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import assert_one_error_line
from safetensors.torch import save_file

from ckptsurgery.errors import CkptError
from ckptsurgery.ops.recipes import ModelRef, load_recipe, plan_recipe

# ---- recipes ---------------------------------------------------------------------------------


def test_anchors_inside_pairs_or_omap_count_towards_the_recipe_values_bound():
    """`!!pairs`/`!!omap` are read as lists of tuples: a tuple's aliases count as a list's (once
    they went uncounted, and the refusal's str() of the tuple expanded 10^9 values)."""
    levels = ["&b0 [x,x,x,x,x,x,x,x,x,x]"] + [f"&b{i} [" + ",".join([f"*b{i - 1}"] * 10) + "]" for i in range(1, 6)]
    for tag in ("!!pairs", "!!omap"):
        text = (f"merge_method: linear\nmodels: [{{model: m, parameters: {{weight: {tag} [{{k: [{', '.join(levels)}]}}]"
                f"}}}}]\n")
        with pytest.raises(CkptError, match="expands to more than"):
            load_recipe(text)


def test_a_recipe_writing_out_too_many_values_is_refused_before_any_is_built(monkeypatch):
    """4 MB of `1,` (two million values) were built by PyYAML (8 s, 750 MB) before the count
    refused them; the parser's events are counted first."""
    import yaml

    def built(*args, **kwargs):
        raise AssertionError("the recipe was built")

    monkeypatch.setattr(yaml, "load", built)
    with pytest.raises(CkptError, match="holds more than 100000 values"):
        load_recipe("merge_method: linear\nmodels: [{model: m}]\nparameters: {weight: [" + "1," * 150_000 + "1]}\n")


def models(tmp_path, layers: int = 2, count: int = 2) -> list:
    paths = []
    for i in range(count):
        sd = {"embed.weight": torch.full((3, 2), float(i)),
              **{f"layers.{n}.w": torch.full((2, 2), float(i + n)) for n in range(layers)},
              "head.weight": torch.full((3, 2), float(i))}
        path = tmp_path / f"m{i}.safetensors"
        save_file(sd, path)
        paths.append(path)
    return paths


def recipe_file(tmp_path, text: str):
    path = tmp_path / "recipe.yml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("number, code, fragment", [
    ("9" * 400, 2, "beyond a float's range"),  # float() of it overflowed in the catch-all
    ("9" * 5000, 1, "cannot be read"),  # PyYAML's int() refused it in the catch-all
])
def test_a_whole_number_no_float_holds_is_one_line(cli, tmp_path, number, code, fragment):
    a, b = models(tmp_path)
    config = recipe_file(tmp_path, f"merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: "
                                   f"[0, {number}]}}\n  - model: {b}\n    parameters: {{weight: 1}}\n")
    assert_one_error_line(cli("merge", "--config", config, "-o", tmp_path / "out"), fragment, code=code)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("model", ['"m\\0x"', '"m+a\\0b"'])
def test_a_model_path_with_a_nul_is_one_line(cli, tmp_path, model):
    config = recipe_file(tmp_path, f"merge_method: linear\nmodels: [{{model: {model}}}]\n")
    assert_one_error_line(cli("merge", "--config", config, "-o", tmp_path / "out"), "NUL", code=2)


def test_a_long_gradient_is_converted_once_not_once_per_tensor(tmp_path):
    """A gradient of n values on a model of k keys: n conversions, not n·k (a 360 KB recipe took
    29 s on a 1001-key model)."""
    recipe = load_recipe("merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: [" +
                         ",".join(["0.5"] * 1000) + "]}\n  - model: b\n    parameters: {weight: 1}\n")
    keys = {f"layers.{i}.w": (2,) for i in range(50)}
    calls = []

    def coerce(value):
        calls.append(value)
        return float(value)

    plan = plan_recipe(recipe, {ModelRef("a"): keys, ModelRef("b"): keys}, coerce={"weight": coerce})
    assert len(plan.tensors) == 50
    assert len(calls) < 1000 + 10 * 2 * 50, len(calls)


def test_a_slice_of_many_sources_is_planned_in_time_linear_in_its_sources(tmp_path, monkeypatch):
    """Each source's own parameters are its entry's: never looked for among every source of the
    slice for every key (1500 sources once took minutes on a 1000-key model)."""
    n = 120
    text = "merge_method: linear\nparameters: {weight: 1}\nslices:\n  - sources: [" + ", ".join(
        f"{{model: m{i}, layer_range: [0, 2]}}" for i in range(n)) + "]\n"
    recipe = load_recipe(text)
    keys = {"layers.0.w": (2,), "layers.1.w": (2,)}
    compared = [0]
    equal = ModelRef.__eq__

    def counting(self, other):
        compared[0] += 1
        return equal(self, other)

    monkeypatch.setattr(ModelRef, "__eq__", counting)
    plan = plan_recipe(recipe, {ModelRef(f"m{i}"): keys for i in range(n)})
    assert len(plan.tensors) == 2 and len(plan.tensors[0].sources) == n
    assert compared[0] < 20 * n, compared[0]  # n² per key before


def folder(tmp_path, name: str, tokenizer_config: str | None = None, config: str | None = None):
    path = tmp_path / name
    path.mkdir()
    save_file({"layers.0.w": torch.ones(2, 2), "layers.1.w": torch.ones(2, 2)}, path / "model.safetensors")
    (path / "config.json").write_text(config or json.dumps({"num_hidden_layers": 2}))
    if tokenizer_config is not None:
        (path / "tokenizer_config.json").write_text(tokenizer_config)
    return path


@pytest.mark.parametrize("tokenizer_config, why", [
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),  # RecursionError in the catch-all
    (json.dumps({"chat_template": [{"name": [1], "template": "x"}]}), "unhashable"),  # TypeError there
])
def test_chat_template_auto_goes_on_past_a_tokenizer_config_it_cannot_read(cli, tmp_path, tokenizer_config, why):
    odd, plain = folder(tmp_path, "odd", tokenizer_config), folder(tmp_path, "plain")
    config = recipe_file(tmp_path, f"merge_method: linear\nparameters: {{weight: 1}}\nchat_template: auto\n"
                                   f"models: [{{model: {odd}}}, {{model: {plain}}}]\n")
    result = cli("merge", "--config", config, "-o", tmp_path / "out")
    assert result.code == 0, result.err
    assert why in result.err and "went on without it" in result.err
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_a_config_json_nested_too_deeply_is_one_line(cli, tmp_path):
    deep = folder(tmp_path, "deep", config='{"a": ' + "[" * 100_000 + "]" * 100_000 + "}")
    plain = folder(tmp_path, "plain")
    config = recipe_file(tmp_path, f"merge_method: linear\nparameters: {{weight: 1}}\n"
                                   f"models: [{{model: {deep}}}, {{model: {plain}}}]\n")
    assert_one_error_line(cli("merge", "--config", config, "-o", tmp_path / "out"), "nested too deeply")
    assert not (tmp_path / "out").exists()


def test_a_recipe_read_from_a_pipe_is_the_recipe_the_folder_keeps(tmp_path):
    """The recipe was read twice, the second time for the folder's copy: from `--config /dev/stdin`
    that copy (and the model card's recipe) came out empty, and a file changed between the two
    reads would be kept as a recipe other than the one that ran."""
    import subprocess
    import sys

    a, b = models(tmp_path)
    text = f"merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 1}}\n  - model: {b}\n" \
           f"    parameters: {{weight: 3}}\n"
    run = subprocess.run([sys.executable, "-m", "ckptsurgery", "merge", "--config", "/dev/stdin", "-o",
                          tmp_path / "out"], input=text, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "out" / "ckptsurgery_recipe.yml").read_text() == text
    assert text.rstrip("\n") in (tmp_path / "out" / "README.md").read_text()


def test_a_tokenizer_file_linking_out_of_its_folder_is_not_copied_into_the_merge(cli, tmp_path):
    """A stranger's model folder whose tokenizer.json links to a secret of this machine (as
    /proc/self/environ or ~/.ssh/id_rsa would be) made the merged folder — made to be
    published — carry the secret's bytes; so did chat_template: auto reading a linked template.
    Links out of the folder are not followed there (said on stderr); links within it are."""
    secret = tmp_path / "secret.txt"
    secret.write_text("TOKEN=hf_not_for_the_hub")
    odd, plain = folder(tmp_path, "odd"), folder(tmp_path, "plain")
    (odd / "tokenizer.json").symlink_to(secret)
    (odd / "chat_template.jinja").symlink_to(secret)
    (odd / "inside").mkdir()
    (odd / "inside" / "vocab.json").write_text('{"a": 0}')
    (odd / "vocab.json").symlink_to(odd / "inside" / "vocab.json")
    config = recipe_file(tmp_path, f"merge_method: linear\nparameters: {{weight: 1}}\nchat_template: auto\n"
                                   f"models: [{{model: {odd}}}, {{model: {plain}}}]\n")
    result = cli("merge", "--config", config, "-o", tmp_path / "out")
    assert result.code == 0, result.err
    out = tmp_path / "out"
    assert not (out / "tokenizer.json").exists() and not (out / "chat_template.jinja").exists()
    assert (out / "vocab.json").read_text() == '{"a": 0}'
    assert not any(b"hf_not_for_the_hub" in p.read_bytes() for p in out.iterdir())
    assert "tokenizer.json: not copied, it links out of its folder" in result.err


def test_a_hub_cache_snapshot_links_to_its_blobs_and_they_are_copied(cli, tmp_path):
    repo = tmp_path / "models--org--name"
    snapshot = repo / "snapshots" / "0123abcd"
    (repo / "blobs").mkdir(parents=True)
    snapshot.parent.mkdir()
    made = folder(tmp_path, "made")
    made.rename(snapshot)
    (repo / "blobs" / "f00d").write_text('{"model": {}}')
    (snapshot / "tokenizer.json").symlink_to("../../blobs/f00d")
    plain = folder(tmp_path, "plain")
    config = recipe_file(tmp_path, f"merge_method: linear\nparameters: {{weight: 1}}\n"
                                   f"models: [{{model: {snapshot}}}, {{model: {plain}}}]\n")
    result = cli("merge", "--config", config, "-o", tmp_path / "out")
    assert result.code == 0, result.err
    assert (tmp_path / "out" / "tokenizer.json").read_text() == '{"model": {}}' and "links out" not in result.err


# ---- layers: diff --by-layer and recipes -----------------------------------------------------

def test_a_key_numbered_with_thousands_of_digits_is_outside_the_layers(cli, tmp_path):
    """int() of a 5000-digit segment raised in the catch-all; such a number is no layer's."""
    path = tmp_path / "a.safetensors"
    save_file({"layers.0.w": torch.ones(1), "layers.1.w": torch.ones(1), "layers." + "9" * 5000 + ".w": torch.ones(1)},
              path)
    report = cli("diff", path, path, "--by-layer", "--json")
    assert report.code == 0, report.err
    rows = report.json()["layers"]
    assert [r["layer"] for r in rows] == [0, 1, None] and rows[-1]["tensors"] == 1
    refused = cli("diff", path, path, "--by-layer", "--layer-pattern", r"^layers\.(\d+)\.")
    assert_one_error_line(refused, "not a layer number", code=2)


# ---- adapters --------------------------------------------------------------------------------

def peft_folder(tmp_path, name: str, config: dict, tensors: dict):
    path = tmp_path / name
    path.mkdir()
    save_file({f"base_model.model.lin.{k}": v for k, v in tensors.items()}, path / "adapter_model.safetensors")
    (path / "adapter_config.json").write_text(json.dumps({"target_modules": ["lin"], **config}))
    return path


@pytest.fixture
def base(tmp_path):
    path = tmp_path / "base.safetensors"
    save_file({"lin.weight": torch.ones(4, 6)}, path)
    return path


def test_a_lokr_scale_alpha_over_r_that_is_not_finite_is_refused(cli, tmp_path, base):
    """Whole w1 and w2 leave r unchecked: alpha 1e300 over r 1e-300 folded as infinity."""
    adapter = peft_folder(tmp_path, "lokr", {"peft_type": "LOKR", "r": 1e-300, "alpha": 1e300},
                          {"lokr_w1": torch.ones(2, 2), "lokr_w2": torch.ones(2, 3)})
    assert_one_error_line(cli("merge", base, "--lora", adapter, "-o", tmp_path / "o.safetensors"),
                          "alpha/r", "not a finite number")
    assert not (tmp_path / "o.safetensors").exists()


@pytest.mark.parametrize("options, config", [
    (["--lora-scale", "1e39"], {"lora_alpha": 1}),
    ([], {"lora_alpha": 1e300}),
])
def test_a_fold_scale_beyond_float32_is_one_line_and_nothing_written(cli, tmp_path, base, options, config):
    """torch's add_(alpha=1e39) on float32 raised in the catch-all, mid-write."""
    adapter = peft_folder(tmp_path, "lora", {"peft_type": "LORA", "r": 1, **config},
                          {"lora_A.weight": torch.ones(1, 6), "lora_B.weight": torch.ones(4, 1)})
    result = cli("merge", base, "--lora", adapter, *options, "-o", tmp_path / "o.safetensors")
    assert_one_error_line(result, "beyond the range of the float32")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith((".o", "o."))] == []


def test_lora_merge_svd_of_weights_overflowing_float64_is_one_line(cli, tmp_path):
    """LAPACK's "failed to converge" on infinities came out of the catch-all."""
    adapter = peft_folder(tmp_path, "lora", {"peft_type": "LORA", "r": 1, "lora_alpha": 1},
                          {"lora_A.weight": torch.ones(1, 6), "lora_B.weight": torch.ones(4, 1)})
    result = cli("lora", "merge", adapter, adapter, "--weights", "1e308,1e308", "--combine", "svd",
                 "-o", tmp_path / "merged")
    assert_one_error_line(result, "overflow float64")
    assert not (tmp_path / "merged").exists()


def stride0_adapter(tmp_path, rank: int = 600):
    """A 2 KB .bin adapter whose factors claim rank 600 from one stored float each (stride 0)."""
    path = tmp_path / "stride0"
    path.mkdir()
    torch.save({"base_model.model.lin.lora_A.weight": torch.ones(1).expand(rank, 600),
                "base_model.model.lin.lora_B.weight": torch.ones(1).expand(4, rank)}, path / "adapter_model.bin")
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": rank, "lora_alpha": rank,
                                                          "target_modules": ["lin"]}))
    return path


@pytest.mark.parametrize("command", [["resize", "--rank", "1"], ["merge", "--combine", "svd"]])
def test_the_lora_group_refuses_factors_repeated_far_past_what_the_file_holds(cli, tmp_path, command):
    """A 1.9 KB .bin with rank-16000 stride-0 factors held lora resize for 317 s of CPU and 1.5 GB
    (and SIGTERM waited for LAPACK); its work is bounded by what the file holds, as extract's."""
    adapter = stride0_adapter(tmp_path)
    extra = [adapter] if command[0] == "merge" else []
    result = cli("lora", command[0], adapter, *extra, *command[1:], "-o", tmp_path / "out")
    assert_one_error_line(result, "stride 0", "[600, 600]")
    assert not (tmp_path / "out").exists()


def test_the_lora_groups_svd_runs_where_ctrl_c_and_sigterm_need_not_wait_for_it(cli, tmp_path, monkeypatch):
    """QR and SVD run in extract's worker thread: the main thread waits in Python, where a signal
    is handled at once (a QR of a large factor is minutes in LAPACK)."""
    import threading

    adapter = peft_folder(tmp_path, "lora", {"peft_type": "LORA", "r": 2, "lora_alpha": 2},
                          {"lora_A.weight": torch.randn(2, 6), "lora_B.weight": torch.randn(4, 2)})
    threads, qr = [], torch.linalg.qr

    def recorded(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return qr(*args, **kwargs)

    monkeypatch.setattr(torch.linalg, "qr", recorded)
    result = cli("lora", "resize", adapter, "--rank", "1", "-o", tmp_path / "out")
    assert result.code == 0, result.err
    assert threads and set(threads) == {"ckptsurgery-svd"}, threads
