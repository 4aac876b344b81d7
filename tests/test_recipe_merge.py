"""merge_recipe: mergekit recipes run into a folder transformers loads, held to mergekit-yaml's own
output (run_merge on the same recipe and the same tiny seeded Llama folders): a SOLAR-style depth
up-scale, a two-model frankenmerge, a gradient SLERP and a TIES soup; reruns byte for byte; the
dry run reads no tensor data; refusals are one line each."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

from conftest import load_folder as load

from ckptsurgery.errors import CkptError, UsageError
from ckptsurgery.ops import RecipeReport, WriteOptions, merge_recipe

transformers = pytest.importorskip("transformers")

LAYERS = 4


@pytest.fixture(scope="module")
def llamas(tmp_path_factory):
    """base, and m0, m1, m2 fine-tuned from it (tiny, seeded): folders as save_pretrained writes them."""
    folder = tmp_path_factory.mktemp("llamas")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=LAYERS,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                                      tie_word_embeddings=False)
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(config)
    base.save_pretrained(folder / "base")
    for i in range(3):
        tuned = transformers.LlamaForCausalLM(config)
        tuned.load_state_dict({k: v + 0.02 * torch.randn_like(v) for k, v in base.state_dict().items()})
        tuned.save_pretrained(folder / f"m{i}")
    (folder / "base" / "tokenizer_config.json").write_text('{"model_max_length": 32}\n')
    (folder / "base" / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    return folder


SOLAR = """\
slices:
  - sources:
      - model: m0
        layer_range: [0, 3]
  - sources:
      - model: m0
        layer_range: [1, 4]
merge_method: passthrough
dtype: float32
"""

FRANKEN = """\
slices:
  - sources:
      - model: m0
        layer_range: [0, 3]
  - sources:
      - model: m1
        layer_range: [2, 4]
        parameters:
          scale:
            - filter: o_proj
              value: 0.5
            - value: 1.0
merge_method: passthrough
dtype: float32
"""

SLERP = """\
slices:
  - sources:
      - model: m0
        layer_range: [0, 4]
      - model: m1
        layer_range: [0, 4]
merge_method: slerp
base_model: m0
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: bfloat16
"""

TIES = """\
models:
  - model: m0
    parameters:
      density: [1, 0.7, 0.1]
      weight: 1.0
  - model: m1
    parameters:
      density: 0.5
      weight: [0, 0.3, 0.7, 1]
  - model: m2
    parameters:
      density: 0.33
      weight:
        - filter: mlp
          value: 0.5
        - value: 0
merge_method: ties
base_model: base
parameters:
  normalize: true
dtype: float32
"""

SLERP_MODELS = """\
models:
  - model: m0
  - model: m1
merge_method: slerp
base_model: m1
parameters:
  t: [0, 0.3, 1]
dtype: float32
"""

TIES_SLICES = """\
slices:
  - sources:
      - model: m0
        layer_range: [0, 2]
        parameters: {density: 0.5, weight: [1, 0.2]}
      - model: m1
        layer_range: [2, 4]
        parameters: {density: [0.2, 0.9], weight: 0.5}
      - model: base
        layer_range: [0, 2]
    parameters: {normalize: false}
  - sources:
      - model: m2
        layer_range: [1, 3]
        parameters: {density: 0.7, weight: 1.0}
      - model: base
        layer_range: [1, 3]
merge_method: ties
base_model: base
parameters:
  lambda: 0.9
dtype: float32
"""

RECIPES = {"solar": (SOLAR, 6), "frankenmerge": (FRANKEN, 5), "slerp": (SLERP, 4), "ties": (TIES, 4),
           "slerp_models": (SLERP_MODELS, 4), "ties_slices": (TIES_SLICES, 4)}


@pytest.fixture(scope="module")
def runs(llamas, tmp_path_factory):
    """Each recipe run by mergekit-yaml (run_merge) and by us, in the llamas' folder (the recipes'
    paths are relative to it): name -> (mergekit's folder, ours, our report)."""
    pytest.importorskip("mergekit")
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    out = tmp_path_factory.mktemp("runs")
    found = {}
    here = os.getcwd()
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        os.chdir(llamas)
        for name, (text, _) in RECIPES.items():
            (out / f"{name}.yml").write_text(text)
            run_merge(MergeConfiguration.model_validate(yaml.safe_load(text)), str(out / f"kit-{name}"),
                      options=MergeOptions(lazy_unpickle=True, copy_tokenizer=False, write_model_card=False,
                                                 clone_tensors=True))
            report = merge_recipe(out / f"{name}.yml", WriteOptions(str(out / name)))
            found[name] = (out / f"kit-{name}", out / name, report)
    finally:
        os.chdir(here)
    return found



@pytest.mark.parametrize("name", RECIPES)
def test_the_output_loads_with_every_key_and_the_right_layer_count(runs, name):
    _, ours, report = runs[name]
    assert isinstance(report, RecipeReport) and report.layers == RECIPES[name][1]
    model, info = transformers.AutoModelForCausalLM.from_pretrained(ours, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.config.num_hidden_layers == RECIPES[name][1]
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


@pytest.mark.parametrize("name", RECIPES)
def test_the_tensors_equal_mergekit_yamls(runs, name):
    kit, ours, _ = runs[name]
    want, got = load(kit), load(ours)
    assert sorted(got) == sorted(want)
    for key in want:
        assert got[key].dtype == want[key].dtype, key
        if got[key].dtype == torch.bfloat16:  # mergekit merges in bfloat16, we in float32: bf16 resolution
            torch.testing.assert_close(got[key].float(), want[key].float(), rtol=2e-2, atol=4e-3, msg=key)
        else:
            torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6, msg=key)


def test_the_folder_holds_config_tokenizer_recipe_and_card(runs, llamas):
    _, ours, report = runs["solar"]
    names = sorted(os.listdir(ours))
    assert names == ["README.md", "ckptsurgery_recipe.yml", "config.json", "generation_config.json",
                     "model.safetensors"]
    config = json.loads((ours / "config.json").read_text())
    reference = json.loads((llamas / "m0" / "config.json").read_text())
    assert config == {**reference, "num_hidden_layers": 6, "torch_dtype": "float32", "dtype": "float32"}
    assert report.config_changes == {"num_hidden_layers": 6, "torch_dtype": "float32", "dtype": "float32"}
    assert (ours / "ckptsurgery_recipe.yml").read_text() == SOLAR
    assert "passthrough" in (ours / "README.md").read_text() and "- `m0`" in (ours / "README.md").read_text()
    # tokenizer_source defaults to the base, else the first model: m0 has no tokenizer files but its generation config
    assert (ours / "generation_config.json").read_bytes() == (llamas / "m0" / "generation_config.json").read_bytes()
    _, ties, _ = runs["ties"]
    for name in ("tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert (ties / name).read_bytes() == (llamas / "base" / name).read_bytes()
    assert "base: `base`" in (ties / "README.md").read_text()


def test_duplicated_layers_are_copies_not_ties(runs):
    _, ours, report = runs["solar"]
    got = load(ours)
    assert report.tied == {} and report.copied == report.tensors
    for i, j in ((1, 3), (2, 4)):  # m0's layers 1 and 2, twice each
        key = "model.layers.{}.mlp.up_proj.weight"
        assert torch.equal(got[key.format(i)], got[key.format(j)])
    from safetensors import safe_open

    with safe_open(ours / "model.safetensors", "pt") as f:
        assert len(list(f.keys())) == report.tensors


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("name", ["frankenmerge", "ties"])
def test_a_rerun_writes_the_same_bytes(runs, llamas, tmp_path, monkeypatch, name):
    _, ours, _ = runs[name]
    monkeypatch.chdir(llamas)
    merge_recipe(ours.parent / f"{name}.yml", WriteOptions(str(tmp_path / "again")))
    assert digests(tmp_path / "again") == digests(ours)


def test_sharded_by_max_shard_size_with_an_index(llamas, tmp_path, monkeypatch):
    monkeypatch.chdir(llamas)
    (tmp_path / "r.yml").write_text(SOLAR)
    report = merge_recipe(tmp_path / "r.yml", WriteOptions(str(tmp_path / "out"), max_shard_size="20KB"))
    assert report.shards and report.shards > 1
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    model, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_a_safetensors_output_is_the_weights_alone(runs, llamas, tmp_path, monkeypatch):
    monkeypatch.chdir(llamas)
    _, ours, _ = runs["ties"]
    merge_recipe(ours.parent / "ties.yml", WriteOptions(str(tmp_path / "w.safetensors")))
    assert os.listdir(tmp_path) == ["w.safetensors"]
    assert (tmp_path / "w.safetensors").read_bytes() == (ours / "model.safetensors").read_bytes()


def test_an_existing_folder_needs_force_and_is_replaced_whole(llamas, tmp_path, monkeypatch):
    monkeypatch.chdir(llamas)
    (tmp_path / "r.yml").write_text(SOLAR)
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    with pytest.raises(CkptError, match="already exists; pass --force"):
        merge_recipe(tmp_path / "r.yml", WriteOptions(str(out)))
    assert os.listdir(out) == ["stale.txt"]
    merge_recipe(tmp_path / "r.yml", WriteOptions(str(out), force=True))
    assert "stale.txt" not in os.listdir(out) and (out / "model.safetensors").is_file()
    assert sorted(os.listdir(tmp_path)) == ["out", "r.yml"]  # nothing staged left beside it


def test_a_failed_write_leaves_nothing(llamas, tmp_path, monkeypatch):
    monkeypatch.chdir(llamas)
    (tmp_path / "r.yml").write_text(SOLAR)
    import ckptsurgery.ops.model_folder as model_folder

    def broken(folder, files):
        raise CkptError("disk full")

    monkeypatch.setattr("ckptsurgery.ops.merge.recipe.write_folder_files", broken)
    with pytest.raises(CkptError, match="disk full"):
        merge_recipe(tmp_path / "r.yml", WriteOptions(str(tmp_path / "out")))
    assert os.listdir(tmp_path) == ["r.yml"]
    assert model_folder.write_folder_files is not broken


def test_the_dry_run_plans_and_reads_no_tensor_data(llamas, tmp_path, monkeypatch):
    from ckptsurgery.io import model
    from ckptsurgery.ops import methods

    monkeypatch.chdir(llamas)
    (tmp_path / "r.yml").write_text(TIES)

    def refused(*args, **kwargs):
        raise AssertionError("tensor data read under --dry-run")

    monkeypatch.setattr(model.TensorRef, "data", refused)  # every tensor's bytes, and every merged chunk's inputs
    monkeypatch.setattr(methods, "decode", refused)
    report = merge_recipe(tmp_path / "r.yml", WriteOptions(str(tmp_path / "out"), dry_run=True))
    assert report.dry_run and not (tmp_path / "out").exists()
    assert len(report.plan) == report.tensors == report.merged
    line = next(p for p in report.plan if p.startswith("model.layers.1.mlp.up_proj.weight"))
    assert line.startswith("model.layers.1.mlp.up_proj.weight <- ties(m0:model.layers.1.mlp.up_proj.weight{")
    assert "density=0.8 weight=1.0}" in line  # layer 1 of 4: t = 1/3 on the gradient [1, 0.7, 0.1]
    assert "base:model.layers.1.mlp.up_proj.weight" in line and line.endswith("t=0.333333 normalize=True")
    assert str(tmp_path / "out" / "config.json") in report.files


def test_refusals_are_one_line(llamas, tmp_path, monkeypatch):
    monkeypatch.chdir(llamas)
    cases = [
        (TIES.replace("normalize: true", "normalise: true"), UsageError, "ties does not take 'normalise'"),
        (SLERP.replace("merge_method: slerp", "merge_method: slerpy"), UsageError, "not a merge method"),
        (SOLAR.replace("model: m0", "model: nowhere", 1), CkptError, "nowhere: no such file or folder"),
        (SOLAR.replace("dtype: float32", "parameters:\n  t: 0.5"), UsageError, "passthrough does not take 't'"),
        (TIES.replace("density: 0.5", "density: 1.5"), UsageError, "density"),
    ]
    for i, (text, kind, words) in enumerate(cases):
        (tmp_path / f"{i}.yml").write_text(text)
        with pytest.raises(kind, match=words) as refused:
            merge_recipe(tmp_path / f"{i}.yml", WriteOptions(str(tmp_path / f"out{i}")))
        assert "\n" not in str(refused.value)
        assert not (tmp_path / f"out{i}").exists()



@pytest.fixture(scope="module")
def adapter(llamas):
    """A PEFT LoRA adapter for m0 (its factors random, seeded), and m0 with it merged by peft."""
    peft = pytest.importorskip("peft")
    model = transformers.LlamaForCausalLM.from_pretrained(llamas / "m0")
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "up_proj"])
    tuned = peft.get_peft_model(model, config)
    g = torch.Generator().manual_seed(1)
    for name, p in tuned.named_parameters():
        if "lora_" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.3
    tuned.save_pretrained(llamas / "m0-lora")
    return {k: v.clone() for k, v in tuned.merge_and_unload().state_dict().items()}


def test_a_model_plus_lora_is_folded_first_streaming(llamas, adapter, tmp_path, monkeypatch):
    monkeypatch.chdir(llamas)
    (tmp_path / "r.yml").write_text("models:\n  - model: m0+m0-lora\n    parameters: {weight: 0.25}\n"
                                    "  - model: m1\n    parameters: {weight: 0.75}\nmerge_method: linear\n"
                                    "dtype: float32\n")
    report = merge_recipe(tmp_path / "r.yml", WriteOptions(str(tmp_path / "out")))
    assert report.sources == ["m0+m0-lora", "m1"] and report.merged == report.tensors
    got, m1 = load(tmp_path / "out"), load(llamas / "m1")
    for key, value in adapter.items():
        torch.testing.assert_close(got[key], 0.25 * value + 0.75 * m1[key], rtol=1e-5, atol=1e-6, msg=key)
    assert not torch.equal(adapter["model.layers.0.self_attn.q_proj.weight"], load(llamas / "m0")[
        "model.layers.0.self_attn.q_proj.weight"])  # the adapter changed it
    (tmp_path / "r2.yml").write_text((tmp_path / "r.yml").read_text().replace("m0-lora", "no-such-lora"))
    with pytest.raises(CkptError, match="no-such-lora: no such adapter"):
        merge_recipe(tmp_path / "r2.yml", WriteOptions(str(tmp_path / "out2")))


# mergekit 0.1.5's own tests/test_basic_merges.py configurations (its picollamas: ours), bfloat16 as there
BASIC = {
    "passthrough_scale": "models:\n  - model: m0\n    parameters:\n      scale:\n        - filter: o_proj\n"
                         "          value: 0\n        - value: 1\nmerge_method: passthrough\n",
    "linear": "{two}merge_method: linear\ndtype: bfloat16\n",
    "slerp": "{two_unweighted}merge_method: slerp\nbase_model: m0\nparameters:\n  t: 0.35\ndtype: bfloat16\n",
    "task_arithmetic": "{two}merge_method: task_arithmetic\nbase_model: m2\ndtype: bfloat16\n",
    "breadcrumbs": "{two}merge_method: breadcrumbs\nbase_model: m2\ndtype: bfloat16\n",
    "ties": "{two}merge_method: ties\nbase_model: m2\nparameters:\n  density: 0.3\ndtype: bfloat16\n",
    "model_stock": "{two_unweighted}merge_method: model_stock\nbase_model: base\ndtype: bfloat16\n",
    "model_stock_filterwise": "{two_unweighted}merge_method: model_stock\nbase_model: base\nparameters:\n"
                              "  filter_wise: true\ndtype: bfloat16\n",
}
TWO = "models:\n  - model: m0\n    parameters:\n      weight: 0.6\n  - model: m1\n    parameters:\n      weight: 0.4\n"
TWO_UNWEIGHTED = "models:\n  - model: m0\n  - model: m1\n"


@pytest.mark.parametrize("name", BASIC)
def test_mergekits_basic_merges(llamas, tmp_path, monkeypatch, name):
    """Each within bfloat16's resolution of mergekit's (it merges in bfloat16, we in float32 from
    inputs rounded to bfloat16); the output loads."""
    pytest.importorskip("mergekit")
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    monkeypatch.chdir(llamas)
    text = BASIC[name].format(two=TWO, two_unweighted=TWO_UNWEIGHTED)
    (tmp_path / "r.yml").write_text(text)
    run_merge(MergeConfiguration.model_validate(yaml.safe_load(text)), str(tmp_path / "kit"),
              options=MergeOptions(lazy_unpickle=True, copy_tokenizer=False, write_model_card=False,
                                   clone_tensors=True))
    merge_recipe(tmp_path / "r.yml", WriteOptions(str(tmp_path / "ours")))
    want, got = load(tmp_path / "kit"), load(tmp_path / "ours")
    assert sorted(got) == sorted(want)
    for key in want:
        assert got[key].dtype == want[key].dtype, key
        apart = ~torch.isclose(got[key].float(), want[key].float(), rtol=2e-2, atol=4e-3)
        # a ranked selection (ties, breadcrumbs) may keep another of two deltas equal in bfloat16 at its cut
        allowed = 0.01 * apart.numel() if name in ("ties", "breadcrumbs") else 0
        assert apart.sum() <= allowed, (key, apart.sum().item())
    if name == "passthrough_scale":
        assert all((v == 0).all() == ("o_proj" in k) for k, v in got.items())
    _, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_a_weight_given_to_a_method_that_takes_none_is_refused(llamas, tmp_path, monkeypatch):
    """mergekit ignores `weight` under slerp (its test_basic_merges sets one); we refuse it, naming
    where it is set: a recipe that sets a value the method never reads says something it does not do."""
    monkeypatch.chdir(llamas)
    (tmp_path / "r.yml").write_text(TWO + "merge_method: slerp\nbase_model: m0\nparameters:\n  t: 0.35\n")
    with pytest.raises(UsageError, match=r"models\[0\]\.parameters\.weight: slerp does not take 'weight'"):
        merge_recipe(tmp_path / "r.yml", WriteOptions(str(tmp_path / "out")))


@pytest.mark.parametrize("dtypes", ["dtype: float16\nout_dtype: bfloat16\n", "dtype: bfloat16\nout_dtype: float32\n",
                                    "out_dtype: float16\n"])
def test_the_working_dtype_rounds_the_inputs_as_mergekit_casts_them(llamas, tmp_path, monkeypatch, dtypes):
    """dtype is what mergekit merges in (every input cast to it), out_dtype what it writes: a
    passthrough through float16 into bfloat16 is the same bits as mergekit's."""
    pytest.importorskip("mergekit")
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    monkeypatch.chdir(llamas)
    text = SOLAR.replace("dtype: float32\n", dtypes)
    (tmp_path / "r.yml").write_text(text)
    run_merge(MergeConfiguration.model_validate(yaml.safe_load(text)), str(tmp_path / "kit"),
              options=MergeOptions(lazy_unpickle=True, copy_tokenizer=False, write_model_card=False,
                                   clone_tensors=True))
    report = merge_recipe(tmp_path / "r.yml", WriteOptions(str(tmp_path / "ours")))
    want, got = load(tmp_path / "kit"), load(tmp_path / "ours")
    assert sorted(got) == sorted(want)
    for key in want:
        assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), key
    assert report.copied == (0 if "dtype: " in dtypes.replace("out_dtype", "") else report.tensors)


def test_a_tokenizer_source_is_a_folder_its_files_are_copied_from(llamas, tmp_path, monkeypatch):
    monkeypatch.chdir(llamas)
    tokenizer = tmp_path / "tok"
    tokenizer.mkdir()
    (tokenizer / "tokenizer.json").write_text('{"version": "1.0"}')
    (tmp_path / "r.yml").write_text(SOLAR + f"tokenizer_source: {tokenizer}\n")
    merge_recipe(tmp_path / "r.yml", WriteOptions(str(tmp_path / "out")))
    assert (tmp_path / "out" / "tokenizer.json").read_text() == '{"version": "1.0"}'
    assert not (tmp_path / "out" / "generation_config.json").exists()  # m0's: not the tokenizer's source
    (tmp_path / "r.yml").write_text(SOLAR + "tokenizer_source: nowhere\n")
    with pytest.raises(CkptError, match="nowhere: no such folder"):
        merge_recipe(tmp_path / "r.yml", WriteOptions(str(tmp_path / "out2")))


def test_a_passthrough_slice_recipe_copies_in_the_kernel(llamas, tmp_path, monkeypatch):
    """Its tensors are the inputs' bytes as they lie: copied file to file (copy_file_range), never
    decoded, so that it costs about a `cp` of what it writes."""
    from ckptsurgery.ops import methods

    monkeypatch.chdir(llamas)
    (tmp_path / "r.yml").write_text(SOLAR)
    copied = []
    real = os.copy_file_range

    def counting(source, out, count, *args):
        done = real(source, out, count, *args)
        copied.append(done)
        return done

    monkeypatch.setattr(os, "copy_file_range", counting)
    monkeypatch.setattr("ckptsurgery.io.write.SMALL_COPY", 0)  # tiny tensors too (else through memory)
    monkeypatch.setattr(methods, "decode", lambda *a: pytest.fail("a passthrough tensor was decoded"))
    report = merge_recipe(tmp_path / "r.yml", WriteOptions(str(tmp_path / "out")))
    assert sum(copied) == report.total_bytes and report.copied == report.tensors


@pytest.fixture(scope="module")
def vocabularies(llamas):
    """m1 with 8 tokens added (72 rows) and m2 with its last 4 cut (60 rows), beside m0's 64."""
    from safetensors.torch import save_file

    for name, source, rows in (("wide", "m1", 72), ("narrow", "m2", 60)):
        tensors = load(llamas / source)
        for key in ("model.embed_tokens.weight", "lm_head.weight"):
            extra = torch.randn(max(rows - 64, 0), tensors[key].shape[1], generator=torch.Generator().manual_seed(3))
            tensors[key] = torch.cat([tensors[key], extra])[:rows].contiguous()
        (llamas / name).mkdir(exist_ok=True)
        save_file(tensors, llamas / name / "model.safetensors", metadata={"format": "pt"})
        config = json.loads((llamas / source / "config.json").read_text())
        (llamas / name / "config.json").write_text(json.dumps({**config, "vocab_size": rows}))
    return llamas


VOCABULARIES = """\
models:
  - model: m0
    parameters: {weight: 0.5}
  - model: wide
    parameters: {weight: 0.3}
  - model: narrow
    parameters: {weight: 0.2}
merge_method: linear
dtype: float32
"""


def test_different_vocabularies_are_fitted_to_the_bases_with_tokenizer_source_base(vocabularies, tmp_path,
                                                                                      monkeypatch):
    monkeypatch.chdir(vocabularies)
    (tmp_path / "r.yml").write_text(VOCABULARIES)
    with pytest.raises(CkptError, match="different vocabularies: set `tokenizer_source: base`"):
        merge_recipe(tmp_path / "r.yml", WriteOptions(str(tmp_path / "refused")))
    (tmp_path / "r.yml").write_text(VOCABULARIES + "tokenizer_source: base\n")
    report = merge_recipe(tmp_path / "r.yml", WriteOptions(str(tmp_path / "out")))
    got, m0, wide, narrow = (load(p) for p in (tmp_path / "out", vocabularies / "m0", vocabularies / "wide",
                                               vocabularies / "narrow"))
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        want = 0.5 * m0[key] + 0.3 * wide[key][:64] + 0.2 * torch.cat([narrow[key], m0[key][60:]])
        torch.testing.assert_close(got[key], want, rtol=1e-5, atol=1e-6)
        assert report.tensor_notes[key] == "rows fitted to m0's 64: wide cut from 72, narrow filled from 60"
    torch.testing.assert_close(got["model.norm.weight"], 0.5 * m0["model.norm.weight"] + 0.3 * wide[
        "model.norm.weight"] + 0.2 * narrow["model.norm.weight"])
    _, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]


def test_a_frankenmerge_of_two_vocabularies_is_fitted_or_refused(vocabularies, tmp_path, monkeypatch):
    """The embeddings come from the first slice's model, the head from the last's: of two
    vocabularies they would not fit one config.json."""
    monkeypatch.chdir(vocabularies)
    text = FRANKEN.replace("model: m0", "model: wide")
    (tmp_path / "r.yml").write_text(text)
    with pytest.raises(CkptError, match=r"lm_head.weight: m1's has shape \[64, 16\], wide's .* \[72, 16\]"):
        merge_recipe(tmp_path / "r.yml", WriteOptions(str(tmp_path / "refused")))
    (tmp_path / "r.yml").write_text(text + "tokenizer_source: base\n")
    report = merge_recipe(tmp_path / "r.yml", WriteOptions(str(tmp_path / "out")))
    got, wide, m1 = load(tmp_path / "out"), load(vocabularies / "wide"), load(vocabularies / "m1")
    assert torch.equal(got["lm_head.weight"], torch.cat([m1["lm_head.weight"], wide["lm_head.weight"][64:]]))
    assert torch.equal(got["model.embed_tokens.weight"], wide["model.embed_tokens.weight"])
    assert report.tensor_notes == {"lm_head.weight": "rows fitted to wide's 72: m1 filled from 64"}
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == 72
    _, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]


def test_a_recipe_of_models_on_the_hub_writes_what_their_local_copies_give(llamas, tmp_path, monkeypatch, cli):
    """`model: hf://ORG/REPO`: the weights read by range requests, config.json, the tokenizer's
    files and the chat template fetched (tests/remote_server.py serves copies of the folders);
    every output file the same bytes as from the local folders but the two that name the models."""
    import shutil

    from remote_server import RangeServer

    for name in ("base", "m0", "m1"):
        shutil.copytree(llamas / name, tmp_path / "hub" / "org" / name)
    recipe = ("models:\n  - model: {p}m0\n    parameters: {{weight: 0.6, density: 0.5}}\n"
              "  - model: {p}m1\n    parameters: {{weight: 0.4, density: 0.5}}\n"
              "merge_method: ties\nbase_model: {p}base\nchat_template: auto\ndtype: float32\n")
    monkeypatch.chdir(llamas)
    (tmp_path / "local.yml").write_text(recipe.format(p=""))
    assert cli("merge", "--config", tmp_path / "local.yml", "-o", tmp_path / "local").code == 0
    (tmp_path / "remote.yml").write_text(recipe.format(p="hf://org/"))
    with RangeServer(str(tmp_path / "hub")) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.delenv("HF_TOKEN", raising=False)
        monkeypatch.setenv("HF_TOKEN_PATH", str(tmp_path / "no-token"))
        result = cli("merge", "--config", tmp_path / "remote.yml", "-o", tmp_path / "remote", "--json")
    assert result.code == 0, result.err
    names = sorted(os.listdir(tmp_path / "local"))
    assert names == sorted(os.listdir(tmp_path / "remote"))
    assert {"config.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"} <= set(names)
    for name in set(names) - {"ckptsurgery_recipe.yml", "README.md"}:
        assert (tmp_path / "local" / name).read_bytes() == (tmp_path / "remote" / name).read_bytes(), name
    fetched = json.loads(result.out)["fetched"]
    assert fetched["bytes"] > 0 and {f["url"].split("/")[-1] for f in fetched["files"]} >= {
        "model.safetensors", "config.json", "tokenizer_config.json", "chat_template.jinja"}


def test_a_hub_revision_is_written_as_an_hf_path(tmp_path):
    (tmp_path / "r.yml").write_text("models:\n  - model: org/m@main\nmerge_method: linear\n")
    with pytest.raises(UsageError, match="hf://ORG/REPO@REVISION"):
        merge_recipe(tmp_path / "r.yml", WriteOptions(str(tmp_path / "out")))
